"""Every refusal names the member's folder (or Hub id) and a fix, in one line: several members
load at once, and a message that does not say which one, or what to do, leaves the user stuck."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from specem_fast.errors import SpecEMError
from specem_fast.hub.fetch import resolve_model
from specem_fast.model.modeling.loader import load_transformer

FIXES = ("fix config.json", "transformers backend", "re-save", "save_pretrained", "remove quantization_config",
         "hf download", "quantization_config")


def _variant(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _refusal(folder: Path) -> str:
    with pytest.raises(SpecEMError) as e:
        resolve_model(str(folder), check_architecture=False)  # the checks every member gets
        load_transformer(folder, torch.device("cpu"), torch.float32)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert str(folder) in msg, msg
    assert any(f in msg for f in FIXES), msg
    return msg


@pytest.mark.parametrize("changes,says", [
    ({"rope_parameters": {"rope_type": "never-heard-of", "rope_theta": 10000.0, "factor": 2.0}}, "never-heard-of"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "relu_squared_ish"}, "relu_squared_ish"),
    ({"quantization_config": {"quant_method": "hqq"}}, "'hqq'"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}}, "no quantized tensors"),
])
def test_config_refusals_name_the_folder_and_a_fix(tiny_dirs, tmp_path, changes, says):
    msg = _refusal(_variant(tiny_dirs["llama"], tmp_path / "m", **changes))
    assert says in msg


def test_unknown_rope_kind_points_to_another_backend(tiny_dirs, tmp_path):
    msg = _refusal(_variant(tiny_dirs["llama"], tmp_path / "m",
                            rope_parameters={"rope_type": "su-perfancy", "rope_theta": 10000.0, "factor": 2.0}))
    assert "transformers backend" in msg and "vllm:" in msg


def test_hub_id_refusals_name_the_id(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpecEMError, match=r"Hub id org/absent is not in the Hugging Face cache .*hf download org/absent"):
        resolve_model("org/absent")
