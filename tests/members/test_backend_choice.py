"""Which backend a member gets under backend="auto": native where our runtime reads the
checkpoint, transformers for an architecture it lacks, and transformers for a quantization
it refuses when that quantizer is installed (otherwise the native refusal with its ways out)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from specem_fast.members.loading import choose_backend
from specem_fast.model import quant


def _folder(tmp_path, name, model_type="llama", quantization=None):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, vocab_size=1000)
    folder = tmp_path / name
    cfg.save_pretrained(folder)
    if quantization is not None:
        data = json.loads((folder / "config.json").read_text())
        data["quantization_config"] = quantization
        (folder / "config.json").write_text(json.dumps(data))
    return folder


@pytest.fixture
def installed(monkeypatch):
    """Pretend exactly these modules are importable."""
    have: set[str] = set()
    real = importlib.util.find_spec
    monkeypatch.setattr(quant.importlib.util, "find_spec",
                        lambda name, *a: object() if name in have else (None if name in quant._QUANTIZER_MODULE.values() else real(name, *a)))
    return have


BNB = {"quant_method": "bitsandbytes", "load_in_4bit": True}
GPTQ4 = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}


def test_plain_native_architecture_is_native(tmp_path, installed):
    assert choose_backend("m", _folder(tmp_path, "plain"), "auto") == "native"


def test_architecture_the_runtime_lacks_goes_to_transformers(tmp_path, installed):
    assert choose_backend("m", _folder(tmp_path, "falcon", "falcon_h1"), "auto") == "transformers"


def test_refused_quantization_goes_to_transformers_only_when_its_quantizer_is_installed(tmp_path, installed):
    folder = _folder(tmp_path, "bnb", quantization=BNB)
    assert quant.quantization_refusal(folder, json.loads((folder / "config.json").read_text()))
    assert choose_backend("m", folder, "auto") == "native"  # the native loader refuses it, with the ways out
    installed.add("bitsandbytes")
    assert choose_backend("m", folder, "auto") == "transformers"
    assert choose_backend("m", folder, "native") == "native"  # forced: the user asked for the refusal


def test_quantization_the_runtime_reads_stays_native(tmp_path, installed):
    installed.add("gptqmodel")
    assert choose_backend("m", _folder(tmp_path, "gptq", quantization=GPTQ4), "auto") == "native"


def test_quantizer_installed_reads_the_method(installed):
    assert not quant.quantizer_installed({"quantization_config": BNB})
    installed.add("bitsandbytes")
    assert quant.quantizer_installed({"quantization_config": BNB})
    assert not quant.quantizer_installed({"quantization_config": {"quant_method": "no-such-method"}})
    assert not quant.quantizer_installed({})
