"""Loading untrusted model folders: malformed safetensors, configs that do not fit the
weights, and non-finite weights are refused with one-line errors naming the fix."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specem_fast.hub import fetch
from specem_fast.errors import SpecEMError
from specem_fast.hub.fetch import MARKER, model_dir, resolve_model
from specem_fast.model.modeling.args import ModelArgs
from specem_fast.model.modeling.loader import load_transformer, read_config

CPU = torch.device("cpu")


@pytest.fixture
def copy_of(tmp_path, tiny_dirs):
    """A private copy of a tiny model folder (the session's folders stay intact)."""

    def make(arch: str = "llama") -> Path:
        dst = tmp_path / f"copy-{arch}"
        shutil.copytree(tiny_dirs[arch], dst)
        return dst

    return make


def _load(folder: Path, dtype=torch.float32):
    return load_transformer(folder, CPU, dtype)


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_the_tiny_models_load(copy_of):
    for arch in ("llama", "qwen2", "gemma3_text", "mistral"):
        assert _load(copy_of(arch)).args.arch == arch


# ------------------------------------------------------------ safetensors framing


def test_truncated_safetensors(copy_of):
    d = copy_of()
    f = d / "model.safetensors"
    size = f.stat().st_size
    os.truncate(f, size // 2)
    with pytest.raises(SpecEMError) as ei:
        _load(d)
    msg = _one_line(ei)
    assert msg.startswith(f"{f} is truncated: its tensors need ")
    assert f"it has {size // 2 - 8 - int.from_bytes(f.read_bytes()[:8], 'little')}" in msg
    assert msg.endswith("re-save the model with save_pretrained(..., safe_serialization=True)")

    os.truncate(f, 5)
    with pytest.raises(SpecEMError, match=r"is truncated \(5 bytes, too short for a safetensors header\)"):
        _load(d)
    os.truncate(f, 100)  # inside the header
    with pytest.raises(SpecEMError, match=r"is truncated: its header needs \d+ bytes, the file has 100"):
        _load(d)


def test_oversized_and_garbled_header(copy_of):
    d = copy_of()
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    f.write_bytes((1 << 40).to_bytes(8, "little") + bytes(data[8:]))
    with pytest.raises(SpecEMError) as ei:
        _load(d)
    assert _one_line(ei).startswith(f"{f} declares a {1 << 40}-byte header, more than safetensors allows")

    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(SpecEMError, match=r"has a damaged header \(not JSON\)"):
        _load(d)


def test_file_longer_than_its_header(copy_of):
    d = copy_of()
    with open(d / "model.safetensors", "ab") as f:
        f.write(b"\x00" * 16)
    with pytest.raises(SpecEMError, match="is longer than its header describes"):
        _load(d)


# ------------------------------------------------------------------ config.json


def test_config_that_is_not_an_object(copy_of):
    d = copy_of()
    (d / "config.json").write_text("[1, 2, 3]")
    for attempt in (lambda: read_config(d), lambda: resolve_model(str(d))):
        with pytest.raises(SpecEMError) as ei:
            attempt()
        assert "config.json holds a JSON list, not an object" in _one_line(ei)
    with pytest.raises(SpecEMError, match="holds a JSON list"):
        ModelArgs.from_hf_config([1, 2])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": "64"}, "config.json: hidden_size must be a positive integer (got '64')"),
        ({"num_hidden_layers": 0}, "config.json: num_hidden_layers must be a positive integer (got 0)"),
        ({"vocab_size": None}, "config.json has no vocab_size"),
        ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        ({"rms_norm_eps": -1}, "config.json: rms_norm_eps must be a positive number (got -1)"),
        ({"hidden_act": "relu"}, "activation 'relu' is not supported"),
        ({"rope_theta": "big"}, "rope_theta must be a number greater than 1 (got 'big')"),
        ({"layer_types": ["full_attention"]}, "layer_types must be a list of 3"),
    ],
)
def test_bad_config_values(copy_of, change, message):
    d = copy_of("gemma3_text" if "layer_types" in change else "llama")
    cfg = json.loads((d / "config.json").read_text())
    if "rope_theta" in change and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"]["rope_theta"] = change["rope_theta"]
    else:
        cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecEMError) as ei:
        _load(d)
    assert message in _one_line(ei)


def test_config_sizes_that_do_not_match_the_weights(copy_of):
    d = copy_of()
    _edit_config(d, intermediate_size=96)
    with pytest.raises(SpecEMError) as ei:
        _load(d)
    msg = _one_line(ei)
    assert "tensor model.layers.0.mlp.down_proj.weight has shape [64, 128] but config.json implies [64, 96]" in msg
    assert "config.json does not belong to these weights" in msg

    d = copy_of("qwen2")
    _edit_config(d, vocab_size=1000)
    with pytest.raises(SpecEMError, match=r"tensor (lm_head|model.embed_tokens).weight has shape \[151936, 64\] but config.json implies \[1000, 64\]"):
        _load(d)


def test_config_with_fewer_layers_than_the_checkpoint(copy_of):
    d = copy_of()
    _edit_config(d, num_hidden_layers=1)
    with pytest.raises(SpecEMError) as ei:
        _load(d)
    assert _one_line(ei) == (
        f"{d}: the weights have 2 layers but config.json says num_hidden_layers=1; loading would silently "
        "drop layers: fix num_hidden_layers in config.json"
    )


def test_checkpoint_tensors_the_config_does_not_describe(copy_of):
    d = copy_of("qwen2")  # qwen2 has q/k/v biases; a config without them would drop them
    _edit_config(d, attention_bias=False)
    with pytest.raises(SpecEMError) as ei:
        _load(d)
    assert re.search(r"the weights hold model.layers.0.self_attn.[qkv]_proj.bias, which config.json does not describe", _one_line(ei))
    # a tied checkpoint that also saved its head is fine
    d = copy_of()
    state = load_file(d / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, d / "model.safetensors")
    assert _load(d).args.tie_embeddings


# -------------------------------------------------------------------- weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(copy_of, bad):
    d = copy_of()
    state = load_file(d / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    save_file(state, d / "model.safetensors")
    with pytest.raises(SpecEMError) as ei:
        _load(d)
    assert _one_line(ei) == (
        f"{d}: tensor model.layers.1.mlp.up_proj.weight holds 1 NaN/inf values: the weights are damaged; "
        "re-save the model with save_pretrained(..., safe_serialization=True)"
    )


def test_weights_beyond_float16(copy_of):
    d = copy_of()
    state = load_file(d / "model.safetensors")
    state["model.norm.weight"][0] = 1e6
    save_file(state, d / "model.safetensors")
    assert _load(d, torch.float32) is not None
    with pytest.raises(SpecEMError, match="has values beyond the range of float16; load the model in bfloat16 or float32"):
        _load(d, torch.float16)


# ------------------------------------------------- a damaged converted default model


@pytest.fixture
def fake_cache(tmp_path, monkeypatch, tiny_dirs):
    """SPECEM_FAST_HOME holding a tiny model as 'smollm2-135m-instruct', as `models fetch` would leave it."""
    monkeypatch.setenv("SPECEM_FAST_HOME", str(tmp_path / "home"))
    d = model_dir("smollm2-135m-instruct")
    shutil.copytree(tiny_dirs["llama"], d)
    marker = {"format": fetch.MARKER_FORMAT, "name": "smollm2-135m-instruct", "files": fetch.file_records(d)}
    (d / MARKER).write_text(json.dumps(marker))
    return d


def _damage_data(f: Path, seed: int = 0) -> None:
    """Random bytes over the second half of the tensor data (the header stays intact)."""
    raw = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    mid = start + (len(raw) - start) // 2
    g = torch.Generator().manual_seed(seed)
    raw[mid:] = bytes(torch.randint(0, 256, (len(raw) - mid,), generator=g, dtype=torch.uint8).tolist())
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["random data", "random file", "truncated"])
def test_damaged_default_model_names_the_repair(fake_cache, damage, capsys):
    from specem_fast import Ensemble
    from specem_fast.cli import main

    f = fake_cache / "model.safetensors"
    if damage == "random data":
        _damage_data(f)
    elif damage == "random file":
        f.write_bytes(os.urandom(f.stat().st_size))
    else:
        os.truncate(f, f.stat().st_size - 1000)
    with pytest.raises(SpecEMError) as ei:
        Ensemble.from_pretrained(["smollm2-135m-instruct"], cache_tokens=64, max_batch=1)
    assert _one_line(ei).endswith("run `specem-fast models fetch --force smollm2-135m-instruct` to convert it again")
    assert main(["generate", "--models", "smollm2-135m-instruct", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "loading models" not in line and line.strip()]
    assert len(err) == 1 and err[0].startswith("specem-fast: error: ") and "models fetch --force" in err[0]
    # and `models verify` sees every kind of damage
    assert fetch.verify_model("smollm2-135m-instruct") != []
