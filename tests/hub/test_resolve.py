"""Hub ids resolve through huggingface_hub's cache the way transformers resolves them, with the
same checks as a local folder; tokenizer-only folders for vLLM members. The tests lay out a real
cache in huggingface_hub's own layout (models--ORG--NAME/{blobs,snapshots,refs}) in tmp and never
touch the network (HF_HUB_OFFLINE=1; the one online case uses a stand-in for snapshot_download)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from specem_fast.errors import SpecEMError
from specem_fast.hub.fetch import resolve_model, resolve_tokenizer
from specem_fast.hub.resolve import hub_cache_dir, parse_hub_id

COMMIT_A = "a" * 8 + "0123456789abcdef0123456789abcdef"
COMMIT_B = "b" * 8 + "0123456789abcdef0123456789abcdef"
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def lay_out(cache: Path, repo: str, commit: str, files: dict[str, bytes], ref: str | None = "main") -> Path:
    """huggingface_hub's layout: blobs named by content hash, snapshot files linking to them, refs/REF = commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (root / "blobs" / sha).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "blobs" / sha, link.parent))
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


def folder_files(folder: Path, names=None, config_edit=None) -> dict[str, bytes]:
    out = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and (names is None or p.name in names)}
    if config_edit and "config.json" in out:
        cfg = json.loads(out["config.json"])
        config_edit(cfg)
        out["config.json"] = json.dumps(cfg).encode()
    return out


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face environment whose cache is in tmp."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def tiny(tiny_dirs):
    return tiny_dirs["llama"]


def test_parse_hub_id():
    assert parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for bad in ("smollm2-135m-instruct", "a/b/c", "org/na--me", "org/name@", "/abs/path", "org/../x"):
        assert parse_hub_id(bad) is None, bad


def test_a_cached_hub_id_resolves_offline_to_its_snapshot(hub, tiny):
    snap = lay_out(hub, "org/tiny", COMMIT_A, folder_files(tiny))
    got = resolve_model("org/tiny")
    assert got == snap.resolve()
    # huggingface_hub itself resolves the same folder from the same cache
    from huggingface_hub import snapshot_download

    assert Path(snapshot_download("org/tiny", cache_dir=str(hub), local_files_only=True)).resolve() == got
    # and it loads: the same weights as the folder it was made from
    from specem_fast.model.modeling.loader import load_transformer

    a = load_transformer(got, torch.device("cpu"), torch.float32).state_dict()
    b = load_transformer(tiny, torch.device("cpu"), torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_revisions_branches_and_commits(hub, tiny):
    lay_out(hub, "org/tiny", COMMIT_A, folder_files(tiny))
    snap_b = lay_out(hub, "org/tiny", COMMIT_B, folder_files(tiny, config_edit=lambda c: c.update(rms_norm_eps=1e-5)),
                     ref="v2")
    assert resolve_model("org/tiny@v2") == snap_b.resolve()
    assert resolve_model(f"org/tiny@{COMMIT_A}").name == COMMIT_A
    assert resolve_model("org/tiny").name == COMMIT_A  # refs/main
    with pytest.raises(SpecEMError, match=r"not in the Hugging Face cache.*--revision v3"):
        resolve_model("org/tiny@v3")


def test_hf_home_locates_the_cache(tmp_path, monkeypatch, tiny):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    snap = lay_out(tmp_path / "home" / "hub", "org/tiny", COMMIT_A, folder_files(tiny))
    assert resolve_model("org/tiny") == snap.resolve()


def test_an_id_not_cached_offline_says_how_to_get_it(hub):
    with pytest.raises(SpecEMError) as e:
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    msg = str(e.value)
    assert "\n" not in msg
    assert "Qwen/Qwen2.5-0.5B-Instruct is not in the Hugging Face cache" in msg and str(hub) in msg
    assert "HF_HUB_OFFLINE" in msg and "hf download Qwen/Qwen2.5-0.5B-Instruct" in msg


def test_an_incomplete_snapshot_names_the_id_and_the_download(hub, tiny):
    lay_out(hub, "org/half", COMMIT_A, folder_files(tiny, names={"config.json", *TOKENIZER}))
    with pytest.raises(SpecEMError) as e:
        resolve_model("org/half")
    msg = str(e.value)
    assert msg.startswith("Hub id org/half:") and "has no *.safetensors" in msg and "hf download org/half" in msg


def test_the_checks_of_a_local_folder_apply_to_hub_ids(hub, tiny):
    lay_out(hub, "org/remote", COMMIT_A, folder_files(
        tiny, config_edit=lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_x.X"})))
    with pytest.raises(SpecEMError, match="Hub id org/remote: .*wants to run its own Python code"):
        resolve_model("org/remote")
    lay_out(hub, "org/gpt2ish", COMMIT_A, folder_files(tiny, config_edit=lambda c: c.update(model_type="gpt2")))
    with pytest.raises(SpecEMError, match="Hub id org/gpt2ish: .*is a 'gpt2' model"):
        resolve_model("org/gpt2ish")
    assert resolve_model("org/gpt2ish", check_architecture=False).name == COMMIT_A  # the transformers backend's way
    lay_out(hub, "org/bnb", COMMIT_A, folder_files(
        tiny, config_edit=lambda c: c.update(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})))
    with pytest.raises(SpecEMError, match="Hub id org/bnb: .*quantized with 'bitsandbytes'.*transformers backend"):
        resolve_model("org/bnb")


def test_a_local_folder_wins_over_a_hub_id_of_the_same_spelling(hub, tiny, tmp_path, monkeypatch):
    lay_out(hub, "org/tiny", COMMIT_A, folder_files(tiny))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny, tmp_path / "org" / "tiny")
    assert resolve_model("org/tiny") == (tmp_path / "org" / "tiny").resolve()


def test_not_a_folder_and_not_an_id_is_unknown(hub):
    for spec in ("no-such-model", "./no/such/folder", "a/b/c"):
        with pytest.raises(SpecEMError, match="unknown model"):
            resolve_model(spec)


def test_online_resolution_downloads_only_the_members_files_with_the_users_token(hub, tiny, monkeypatch):
    """Where the environment allows downloads, huggingface_hub does them (a stand-in here: no network)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        snap = hub / ("models--" + repo_id.replace("/", "--")) / "snapshots" / COMMIT_A
        return str(snap if snap.is_dir() else lay_out(hub, repo_id, COMMIT_A, folder_files(tiny)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model("org/new@main").name == COMMIT_A
    (repo, first), (_, second) = calls
    assert repo == "org/new" and first["revision"] == "main" and first["local_files_only"] is False
    assert first["cache_dir"] == str(hub) and first["token"] == "hf_test_token"
    assert "*.json" in first["allow_patterns"] and not any("safetensors" in p or "bin" in p
                                                           for p in first["allow_patterns"])
    # the weights in a second step, at the commit the first one resolved; no index: every *.safetensors
    assert second["revision"] == COMMIT_A and second["allow_patterns"] == ["*.safetensors"]
    calls.clear()
    resolve_tokenizer("org/new")
    assert len(calls) == 1 and "*.safetensors" not in calls[0][1]["allow_patterns"]  # a tokenizer: no weights


def _sharded(src: Path, dst: Path) -> Path:
    """A sharded copy (model.safetensors.index.json + shards) with a stray consolidated.safetensors beside it."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    sd = load_file(str(src / "model.safetensors"))
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(dst / name), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, str(dst / "consolidated.safetensors"))
    return dst


def test_a_sharded_repo_downloads_and_loads_only_its_indexed_shards(hub, tiny, tmp_path, monkeypatch):
    import huggingface_hub

    from specem_fast.model.modeling.loader import load_transformer

    sharded = _sharded(tiny, tmp_path / "sharded")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append(kw["allow_patterns"])
        snap = hub / "models--org--sharded" / "snapshots" / COMMIT_A
        return str(snap if snap.is_dir() else lay_out(hub, repo_id, COMMIT_A, folder_files(sharded)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    got = resolve_model("org/sharded")
    assert calls[1] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    a = load_transformer(got, torch.device("cpu"), torch.float32).state_dict()  # consolidated.* not read
    b = load_transformer(tiny, torch.device("cpu"), torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sharded_folder_missing_a_shard_or_with_a_damaged_index_is_refused(tiny, tmp_path):
    from specem_fast.model.modeling.loader import load_transformer

    folder = _sharded(tiny, tmp_path / "s")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SpecEMError, match=r"names 1 shard\(s\) the folder lacks \(first: model-00002-of-00002"):
        load_transformer(folder, torch.device("cpu"), torch.float32)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    with pytest.raises(SpecEMError, match="model.safetensors.index.json is damaged"):
        load_transformer(folder, torch.device("cpu"), torch.float32)


# ------------------------------------------------------------ tokenizer-only folders (vLLM members)


def test_a_tokenizer_only_folder_or_id_resolves_for_a_vllm_member(hub, tiny, tmp_path):
    only = tmp_path / "tok"
    only.mkdir()
    for f in TOKENIZER:
        if (tiny / f).is_file():
            shutil.copy(tiny / f, only / f)
    assert resolve_tokenizer(str(only)) == only.resolve()
    with pytest.raises(SpecEMError, match="has no config.json"):
        resolve_model(str(only))  # a local member needs the weights
    snap = lay_out(hub, "org/tok", COMMIT_A, folder_files(tiny, names=set(TOKENIZER)))
    assert resolve_tokenizer("org/tok") == snap.resolve()
    # any architecture: the model runs on the server
    lay_out(hub, "org/exotic", COMMIT_A, folder_files(tiny, names={"config.json", *TOKENIZER},
                                                     config_edit=lambda c: c.update(model_type="mamba2")))
    assert resolve_tokenizer("org/exotic").name == COMMIT_A
    assert resolve_tokenizer("smollm2-135m-instruct").name == "smollm2-135m-instruct"


def test_a_tokenizer_folder_still_refuses_missing_tokenizers_and_remote_code(hub, tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SpecEMError, match="has no tokenizer"):
        resolve_tokenizer(str(empty))
    lay_out(hub, "org/notok", COMMIT_A, folder_files(tiny, names={"config.json"}))
    with pytest.raises(SpecEMError, match="Hub id org/notok: .*has no tokenizer.*hf download org/notok"):
        resolve_tokenizer("org/notok")
    code = tmp_path / "code"
    code.mkdir()
    for f in TOKENIZER:
        if (tiny / f).is_file():
            shutil.copy(tiny / f, code / f)
    cfg = json.loads((code / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tok.MyTok", None]}
    (code / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecEMError, match="wants to run its own Python code"):
        resolve_tokenizer(str(code))


def test_a_hub_id_member_joins_an_ensemble(hub, tiny_dirs):
    """The id is the member's name; it writes the same text as its folder does."""
    from specem_fast import Ensemble

    lay_out(hub, "org/tiny-llama", COMMIT_A, folder_files(tiny_dirs["llama"]))
    other = str(tiny_dirs["qwen2"])
    got = []
    for first in ("org/tiny-llama", str(tiny_dirs["llama"])):
        ens = Ensemble.from_pretrained([first, other], cache_tokens=256, max_batch=1, dtype="float32", kernels="torch")
        try:
            assert first in ens.model_names
            res = ens.generate("List three colours.", max_new_tokens=20, window=5)
        finally:
            ens.close()
        got.append((res.text, [r.winner_model == first for r in res.rounds]))
    assert got[0] == got[1] and got[0][0]
