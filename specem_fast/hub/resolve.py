"""A member's model as the user names it -> a checked local folder.

Three spellings, tried in this order (the order transformers uses):

1. a registry name (``smollm2-135m-instruct``): the folder ``models fetch`` converted
   (fetch.resolve_model and fetch.resolve_tokenizer take these first, then call this module);
2. a local folder;
3. a Hugging Face Hub id, ``ORG/NAME`` or ``ORG/NAME@REVISION`` (a branch, tag or
   commit): resolved through huggingface_hub's own cache and environment, as
   transformers would: ``HF_HUB_CACHE`` (or ``HF_HOME``/hub, default
   ``~/.cache/huggingface/hub``), ``HF_TOKEN`` for gated or private repos, and
   ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) to use the cache only. The
   environment is read at each call. Only the files a member needs are downloaded
   (configs, safetensors, tokenizer files; never .bin/.pt/.gguf), and only where
   the environment allows it.

The checks are separate steps so a caller can apply what its member needs:
:func:`check_model_folder` (config, safetensors weights, a tokenizer, no remote
code) for any local member, :func:`native_refusal` (architecture and quantization)
for the native runtime only, :func:`check_tokenizer_folder` for a vLLM member,
whose weights live on its server.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from specem_fast.errors import SpecEMError
from specem_fast.hub.registry import model_names
from specem_fast.model.modeling.args import SUPPORTED_ARCHITECTURES
from specem_fast.model.quant import quantization_refusal
from specem_fast.model.text import refuse_remote_code

# what a local member needs from a Hub repo, and what a vLLM member (its tokenizer) needs
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]
TOKENIZER_FILES = ["*.json", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = {"1", "on", "yes", "true"}


# ------------------------------------------------------------------ environment


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, from the environment as it is now."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``ORG/NAME[@REVISION]`` -> (repo id, revision or None); None when ``spec`` is not one."""
    repo, sep, rev = spec.strip().partition("@")
    if not _REPO.match(repo) or "--" in repo or ".." in repo or repo.endswith(".git"):
        return None
    if sep and not rev.strip():
        return None
    return repo, (rev.strip() or None)


# ---------------------------------------------------------------------- the hub


def _download_hint(repo: str, rev: str | None) -> str:
    at = f" --revision {rev}" if rev else ""
    return (f"download it once where the network is allowed (`hf download {repo}{at}`, or "
            f"`huggingface-cli download {repo}{at}`) into the same cache, or pass a local folder")


def hub_snapshot(repo: str, rev: str | None, files: list[str]) -> Path:
    """The snapshot folder of ``repo`` at ``rev`` in huggingface_hub's cache, downloading the
    ``files`` patterns first unless the environment says offline. Weights come in a second
    step, as transformers takes them: the shards model.safetensors.index.json names where the
    repo has one (a repo may also carry other exports, e.g. Mistral's consolidated.safetensors)."""
    if hub_offline():
        return _snapshot(repo, rev, files, offline=True)
    rest = [f for f in files if f != "*.safetensors"]
    path = _snapshot(repo, rev, rest, offline=False)
    if len(rest) == len(files):
        return path
    shards = ["*.safetensors"]
    try:
        weight_map = json.loads((path / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
        shards = sorted({v for v in weight_map.values() if isinstance(v, str)}) or shards
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return _snapshot(repo, path.name, shards, offline=False)  # the commit the first step resolved


def _snapshot(repo: str, rev: str | None, files: list[str], offline: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise SpecEMError(f"{repo} looks like a Hugging Face Hub id, but huggingface_hub is not installed; "
                          "install it (`pip install huggingface_hub`) or pass a local folder") from None
    cache = hub_cache_dir()
    name = f"{repo}@{rev}" if rev else repo
    try:
        path = snapshot_download(repo, revision=rev, cache_dir=str(cache), local_files_only=offline,
                                 allow_patterns=files, token=os.environ.get("HF_TOKEN") or None)
    except hf_errors.GatedRepoError:
        raise SpecEMError(f"Hub id {name} is a gated repo: accept its terms on huggingface.co and set HF_TOKEN "
                          "to a token of that account") from None
    except hf_errors.RepositoryNotFoundError:
        raise SpecEMError(f"Hub id {name}: no such repo on the Hub (or a private one: set HF_TOKEN); check the "
                          f"spelling, or pass a local folder (known registry models: {', '.join(model_names())})") from None
    except hf_errors.RevisionNotFoundError:
        raise SpecEMError(f"Hub id {name}: the repo has no revision {rev!r}; name a branch, tag or commit it has") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, FileNotFoundError):
        if offline:
            raise SpecEMError(f"Hub id {name} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set, "
                              f"so nothing is downloaded; {_download_hint(repo, rev)}") from None
        raise SpecEMError(f"Hub id {name} is not in the Hugging Face cache ({cache}) and could not be downloaded "
                          f"(is the Hub reachable?); {_download_hint(repo, rev)}") from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as exc:
        raise SpecEMError(f"Hub id {name} could not be resolved ({type(exc).__name__}: {str(exc)[:200]}); "
                          f"{_download_hint(repo, rev)}") from None
    return Path(path)


# ---------------------------------------------------------------------- checks


def _check_folder_files(path: Path) -> None:
    """Name the first missing piece of a HF folder, with how to produce it."""
    if not path.is_dir():
        raise SpecEMError(
            f"{path} is a file, not a model folder; pass a folder holding config.json, "
            "*.safetensors weights and tokenizer.json, or a registry name "
            f"({', '.join(model_names())})"
        )
    if not (path / "config.json").is_file():
        raise SpecEMError(
            f"{path} has no config.json; point to a Hugging Face model folder "
            "(config.json, *.safetensors, tokenizer.json)"
        )
    if not any(path.glob("*.safetensors")):
        extra = " (it has .bin/.pt weights: convert them to safetensors first)" if (
            any(path.glob("*.bin")) or any(path.glob("*.pt"))
        ) else ""
        raise SpecEMError(
            f"{path} has no *.safetensors weights{extra}; save the model with "
            "`save_pretrained(..., safe_serialization=True)` into that folder"
        )
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise SpecEMError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model); save the "
            "tokenizer with `AutoTokenizer.from_pretrained(...).save_pretrained(folder)`"
        )


def _check_architecture(path: Path) -> None:
    """Refuse unsupported model types before loading, not deep inside it."""
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SpecEMError(f"{cfg_path} is not valid JSON ({exc}); fix or re-save the config") from None
    if not isinstance(cfg, dict):
        raise SpecEMError(
            f"{cfg_path} holds a JSON {type(cfg).__name__}, not an object; a Hugging Face config.json is "
            "one object of settings: re-save the model's config"
        )
    mtype = cfg.get("model_type")
    text = cfg.get("text_config")
    if mtype == "gemma3" and isinstance(text, dict) and text.get("model_type") == "gemma3_text":
        mtype = "gemma3_text"
    if mtype not in SUPPORTED_ARCHITECTURES:
        raise SpecEMError(
            f"{path} is a {mtype!r} model, which specem_fast does not support; supported "
            f"architectures (config model_type): {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )


def check_model_folder(path: Path) -> None:
    """What any local member needs: config.json, safetensors weights, a tokenizer, no remote code."""
    _check_folder_files(path)
    refuse_remote_code(path)


def check_tokenizer_folder(path: Path) -> None:
    """What a vLLM member needs locally: a tokenizer (no config, no weights, any architecture)."""
    if not path.is_dir():
        raise SpecEMError(f"{path} is a file, not a folder; a vLLM member's MODEL names a folder or Hub id holding "
                          "the served model's tokenizer (tokenizer.json or tokenizer.model)")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise SpecEMError(f"{path} has no tokenizer (tokenizer.json or tokenizer.model); save the served model's "
                          "tokenizer there with `AutoTokenizer.from_pretrained(...).save_pretrained(folder)`")
    refuse_remote_code(path)


def native_refusal(path: Path) -> str | None:
    """Why the native runtime cannot load this folder (architecture, quantization), or None."""
    try:
        _check_architecture(path)
    except SpecEMError as exc:
        return str(exc)
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return quantization_refusal(path, cfg)


def check_native(path: Path) -> None:
    why = native_refusal(path)
    if why:
        raise SpecEMError(why)


# ---------------------------------------------------------------------- resolve


def _unknown(spec: str) -> str:
    return (f"unknown model {spec!r}: known models are {', '.join(model_names())}. "
            "A path to a local Hugging Face model folder or a Hub id (ORG/NAME[@REVISION]) also works.")


def _locate(spec: str, files: list[str]) -> tuple[Path, str | None]:
    """(folder, Hub id or None) for a local folder or a Hub id; registry names are handled by the callers."""
    path = Path(spec).expanduser()
    if path.exists():
        return path, None
    hub = parse_hub_id(spec)
    if hub is None or spec.startswith(("/", ".", "~")):
        raise SpecEMError(_unknown(spec))
    return hub_snapshot(*hub, files), spec


def _in_hub_terms(spec: str, exc: SpecEMError, offline_hint: bool) -> SpecEMError:
    hub = parse_hub_id(spec)
    hint = f"; {_download_hint(*hub)}" if offline_hint and hub else ""
    return SpecEMError(f"Hub id {spec}: {exc}{hint}")


def resolve_folder(spec: str, check_architecture: bool = True) -> Path:
    """A local folder or Hub id -> a checked model folder (fetch.resolve_model handles registry
    names first, then calls this).

    Checks up front what a local member needs (config, safetensors weights, a tokenizer,
    no remote code) so the user gets a fixable message instead of a traceback deep inside
    loading. ``check_architecture``: also what the native runtime needs (a supported
    architecture, a quantization it reads); False lets any architecture through (the
    member loader then picks the native runtime or the transformers backend).
    """
    path, hub = _locate(spec, MODEL_FILES)
    try:
        check_model_folder(path)
        if check_architecture:
            check_native(path)
    except SpecEMError as exc:
        if hub is None:
            raise
        raise _in_hub_terms(spec, exc, "has no" in str(exc)) from None  # "has no": an incomplete snapshot
    return path.resolve()


def resolve_tokenizer_folder(spec: str) -> Path:
    """A local folder or Hub id -> a folder holding a tokenizer (a vLLM member's MODEL): no
    weights, no config and no architecture are needed, only no remote code."""
    path, hub = _locate(spec, TOKENIZER_FILES)
    try:
        check_tokenizer_folder(path)
    except SpecEMError as exc:
        if hub is None:
            raise
        raise _in_hub_terms(spec, exc, "has no" in str(exc)) from None
    return path.resolve()


__all__ = [
    "MODEL_FILES",
    "TOKENIZER_FILES",
    "check_model_folder",
    "check_native",
    "check_tokenizer_folder",
    "hub_cache_dir",
    "hub_offline",
    "hub_snapshot",
    "native_refusal",
    "parse_hub_id",
    "resolve_folder",
    "resolve_tokenizer_folder",
]
