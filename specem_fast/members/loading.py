"""Loading an ensemble's members: names checked, memory checked, weights loaded."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from specem_fast.config import EngineConfig
from specem_fast.errors import SpecEMError
from specem_fast.hub.fetch import resolve_model, resolve_tokenizer
from specem_fast.members.interface import Member
from specem_fast.hub.registry import DEFAULT_MODELS
from specem_fast.model.runner import ModelRunner, available_memory, memory_needs, resolve_dtype

BACKENDS = ("auto", "native", "transformers")
_BACKEND_PREFIXES = {"hf:": "transformers", "native:": "native"}


PLACEMENTS = ("local", "ray")


@dataclass(frozen=True)
class MemberSpec:
    """One member as named by the user: a registry name or folder (in this process),
    ``ray:NAME`` (in a Ray actor) or ``vllm:URL#MODEL`` (served by vLLM over HTTP)."""

    name: str  # as written: the member's name in results
    kind: str  # local | ray | vllm
    model: str  # registry name or folder: the weights (local, ray) or the tokenizer (vllm)
    url: str | None = None  # vllm: the server's base URL
    options: tuple[tuple[str, str], ...] = ()  # vllm: ;name=value options after MODEL (vllm_member.OPTIONS)
    backend: str | None = None  # local, ray: forced by a spec prefix (hf:PATH, native:PATH); None: as asked


def _backend_prefix(spec: str, model: str) -> tuple[str, str | None]:
    for prefix, backend in _BACKEND_PREFIXES.items():
        if model.startswith(prefix):
            model = model[len(prefix):].strip()
            if not model:
                raise SpecEMError(f"member {spec!r} names no model; write {prefix}NAME with a registry name or folder")
            return model, backend
    return model, None


def parse_spec(spec: str, placement: str = "local") -> MemberSpec:
    if spec.startswith("ray:"):
        model = spec[4:].strip()
        if not model:
            raise SpecEMError(f"member {spec!r} names no model; write ray:NAME with a registry name or folder")
        model, backend = _backend_prefix(spec, model)
        return MemberSpec(spec, "ray", model, backend=backend)
    if spec.startswith("vllm:"):
        from specem_fast.members.vllm import split_options

        url, sep, model = spec[5:].partition("#")
        model, options = split_options(model)
        if not sep or not model or not url.startswith(("http://", "https://")):
            raise SpecEMError(f"member {spec!r} is not vllm:URL#MODEL[;name=value...] (e.g. vllm:http://127.0.0.1:8001#"
                              "qwen2.5-coder-0.5b-instruct, MODEL naming the served model and its tokenizer; "
                              "options: served=NAME, key_env=VAR, timeout=S, retries=N, verify=prompt_logprobs|cached)")
        return MemberSpec(spec, "vllm", model, url.rstrip("/"), tuple(options.items()))
    model, backend = _backend_prefix(spec, spec)
    return MemberSpec(spec, "ray" if placement == "ray" else "local", model, backend=backend)


def _requested_backends(backend, drafters: list[str], names: list[str]) -> dict[str, str]:
    """Per member name, the backend asked for: one for all (a string), one per model (a list, like
    ``dtypes``), or a mapping from member name (unnamed members: auto)."""
    if backend is None or isinstance(backend, str):
        asked = dict.fromkeys(names, backend or "auto")
    elif isinstance(backend, dict):
        unknown = sorted(set(backend) - set(names))
        if unknown:
            raise SpecEMError(f"backend names {', '.join(unknown)}, which is not a member; members: {', '.join(names)}")
        asked = {n: backend.get(n, "auto") for n in names}
    else:
        per_model = list(backend)
        if len(per_model) != len(drafters):
            raise SpecEMError(f"backend lists {len(per_model)} entries for {len(drafters)} models; give one per model")
        asked = {**dict.fromkeys(names, "auto"), **dict(zip(drafters, per_model))}
    for n, b in asked.items():
        if b not in BACKENDS:
            raise SpecEMError(f"backend of member {n} must be one of {', '.join(BACKENDS)} (got {b!r})")
    return asked


def choose_backend(name: str, folder, asked: str) -> str:
    """"native" or "transformers" for a member: auto takes native where the native runtime
    implements the folder's architecture (its config.json reads cleanly), else transformers;
    a quantization the native runtime refuses goes to transformers when its quantizer is
    installed (otherwise the native loader refuses it with the ways out)."""
    from specem_fast.model.modeling.args import SUPPORTED_ARCHITECTURES, ModelArgs
    from specem_fast.model.modeling.loader import read_config
    from specem_fast.model.quant import quantization_refusal, quantizer_installed

    if asked == "transformers":
        return asked
    cfg = read_config(folder)
    try:
        ModelArgs.from_hf_config(cfg)
    except SpecEMError as exc:
        if asked == "native":
            raise SpecEMError(f"member {name} ({folder}): the native runtime cannot run it ({exc}); natively run: "
                              f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}; use backend='transformers' "
                              "(--backend transformers, or the spec hf:PATH) or 'auto'") from None
        return "transformers"
    if asked == "auto" and quantization_refusal(folder, cfg) and quantizer_installed(cfg):
        return "transformers"
    return "native"


def load_members(models: Sequence[str] | str | None, verifiers: Sequence[str] | str | None, config: EngineConfig,
                 progress: bool = False, placement: str = "local", ray_address: str | None = None,
                 backend: str | Sequence[str] | dict | None = "auto",
                 ) -> tuple[dict[str, ModelRunner], dict[str, Member], list[str], list[str]]:
    """(native local runners, every other member (transformers backend, Ray actors, vLLM
    endpoints), drafters, verifiers): every name resolved and checked, and the local KV cache
    checked against the memory of each device, before any weights load. ``backend``: auto,
    native or transformers, for all members, one per model, or by member name."""
    plan = _plan(models, verifiers, config, placement, backend)
    local = [n for n in plan.names if plan.specs[n].kind == "local"]
    _check_memory({n: (plan.folders[n], *plan.where[n]) for n in local}, config,
                  {n for n in local if plan.backends[n] != "native"})
    runners, remote = {}, {}
    for n in tqdm(plan.names, desc="loading models", unit="model", disable=not progress, leave=False):
        member = _load_one(n, plan, config, ray_address)
        (runners if isinstance(member, ModelRunner) else remote)[n] = member
    return runners, remote, plan.drafters, plan.verifiers


@dataclass(frozen=True)
class _MemberPlan:
    """Every member resolved and checked, nothing loaded yet."""

    specs: dict[str, MemberSpec]
    folders: dict[str, Path]
    backends: dict[str, str]  # local and Ray members: native or transformers
    drafters: list[str]
    verifiers: list[str]
    names: list[str]  # drafters, then verifiers that do not draft
    where: dict[str, tuple]  # (device, dtype) per member


def _plan(models, verifiers, config: EngineConfig, placement: str, backend) -> _MemberPlan:
    if placement not in PLACEMENTS:
        raise SpecEMError(f"placement must be one of {', '.join(PLACEMENTS)} (got {placement!r})")
    drafters = _name_list(models, "models") if models is not None else [m.name for m in DEFAULT_MODELS]
    verifiers_ = _name_list(verifiers, "verifiers") if verifiers is not None else list(drafters)
    for what, per_model in (("devices", config.devices), ("dtypes", config.dtypes)):
        if per_model and len(per_model) != len(drafters):
            raise SpecEMError(f"{what} lists {len(per_model)} entries for {len(drafters)} models; give one per model")
    specs = {n: parse_spec(n, placement) for n in dict.fromkeys(drafters + verifiers_)}
    if config.batch_invariant and (served := [n for n, sp in specs.items() if sp.kind == "vllm"]):
        raise SpecEMError(f"batch_invariant cannot hold for vLLM members ({', '.join(served)}): vLLM batches "
                          "requests on its server; use local or Ray members, or leave batch_invariant off")
    asked = _requested_backends(backend, drafters, list(specs))
    asked = {n: sp.backend or asked[n] for n, sp in specs.items()}
    # a vLLM member needs only a tokenizer here (folder or Hub id): its weights and architecture are the server's
    folders = {n: resolve_tokenizer(sp.model) if sp.kind == "vllm" else resolve_model(sp.model, check_architecture=False)
               for n, sp in specs.items()}
    backends = {n: choose_backend(n, folders[n], asked[n]) for n, sp in specs.items() if sp.kind != "vllm"}
    # one model under two spellings (a registry name and its folder, ./x and x/) is one model
    keys = {n: (sp.kind, sp.url, folders[n].resolve(), dict(sp.options).get("served")) for n, sp in specs.items()}
    drafters = _distinct(drafters, keys, "models")
    verifiers_ = _distinct(verifiers_, keys, "verifiers")
    same = {keys[d]: d for d in drafters}
    verifiers_ = [same.get(keys[v], v) for v in verifiers_]
    names = drafters + [v for v in verifiers_ if v not in drafters]
    placement_of = dict(zip(drafters, config.devices))
    precision = dict(zip(drafters, config.dtypes))
    where = {n: (placement_of.get(n, config.device), precision.get(n, config.dtype)) for n in names}
    return _MemberPlan(specs, folders, backends, drafters, verifiers_, names, where)


def _load_one(n: str, plan: _MemberPlan, config: EngineConfig, ray_address: str | None) -> ModelRunner | Member:
    """A native runner, or the member of another kind (transformers backend, Ray actor, vLLM)."""
    sp, folder, where = plan.specs[n], plan.folders[n], plan.where[n]
    if sp.kind == "local" and plan.backends[n] == "transformers":
        from specem_fast.members.local.hf_member import HFMember
        from specem_fast.model.hf_runner import HFRunner

        hf = HFRunner(n, folder, *where)
        _announce(hf.describe())
        return HFMember(hf, config.cache_tokens, config.batch_invariant)
    if sp.kind == "local":
        r = ModelRunner(n, folder, *where, config.kernels, config.flash_attn, config.compile)
        _announce(f"{n}: backend native ({r.model.args.arch}, {str(r.dtype)[6:]} on {r.device}, "
                  f"kernels {r.kernel_path})")
        return r
    if sp.kind == "ray":
        from specem_fast.members.ray import RayMember

        member = RayMember.start(n, folder, *where, config, ray_address=ray_address,
                                 members=sum(plan.specs[m].kind == "ray" for m in plan.names), backend=plan.backends[n])
        _announce(f"{n}: backend {plan.backends[n]} in a Ray actor")
        return member
    from specem_fast.members.vllm import VLLMMember

    return VLLMMember(n, sp.url, sp.model, folder, config, **dict(sp.options))


def _announce(line: str) -> None:
    """One line per member at load, on stderr (stdout may carry JSON)."""
    print(f"specem-fast: member {line}", file=sys.stderr, flush=True)


def _name_list(value: Sequence[str] | str, what: str) -> list[str]:
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    if not names or any(not n for n in names):
        raise SpecEMError(f"the {what} list is empty or has an empty entry; name at least one model")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecEMError(f"the {what} list names {', '.join(dup)} more than once; list each model once")
    return names


def _distinct(names: list[str], keys: dict, what: str) -> list[str]:
    """Refuse one model listed under two spellings (same kind, endpoint and folder once
    symlinks and relative parts are resolved): it would be loaded twice and vote twice."""
    seen: dict = {}
    for n in names:
        real = keys[n]
        if real in seen:
            raise SpecEMError(
                f"the {what} list names one model twice: {seen[real]!r} and {n!r} are both {str(real[2])!r}; "
                "list each model once"
            )
        seen[real] = n
    return names


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _check_memory(models: dict[str, tuple], config: EngineConfig, transformers: set[str] = frozenset()) -> None:
    """Refuse cache_tokens x max_batch whose KV cache (plus the weights) cannot fit on
    its device, before any weights load; the message says what fits.

    ``models``: name -> (folder, device, dtype setting). The KV cache is
    ``2 * layers * kv_heads * head_dim * dtype size`` bytes per token and slot.
    """
    per_device: dict = {}
    for name, (folder, dev, dt) in models.items():
        d = torch.device(dev)
        if d.type == "cuda" and d.index is None and torch.cuda.is_available():
            d = torch.device("cuda", torch.cuda.current_device())
        if name in transformers:
            from specem_fast.model.hf_runner import hf_memory_needs

            kv, weights = hf_memory_needs(folder, resolve_dtype(d, dt))
        else:
            kv, weights = memory_needs(folder, resolve_dtype(d, dt))
        per_device.setdefault(d, []).append((name, kv, weights))
    slots, tokens = config.max_batch, config.cache_tokens
    for dev, rows in per_device.items():
        avail = available_memory(dev)
        if avail is None:
            continue
        per_token = sum(kv for _, kv, _ in rows)  # bytes per cache token and slot, all models on dev
        weights = sum(w for _, _, w in rows)
        need = per_token * tokens * slots
        if need + weights <= avail:
            continue
        each = ", ".join(f"{n}: {_gib(kv * tokens * slots)}" for n, kv, _ in rows)
        room = avail - weights
        if room < per_token * 16 * slots and room < per_token * tokens:
            fits = "the weights alone nearly fill it; use fewer or smaller models, a smaller dtype or another device"
        else:
            fit_tokens = room // (per_token * slots)
            fit_slots = room // (per_token * tokens)
            options = []
            if fit_tokens >= 16:
                options.append(f"cache_tokens={fit_tokens} with max_batch={slots}")
            if fit_slots >= 1:
                options.append(f"max_batch={fit_slots} with cache_tokens={tokens}")
            fits = "at most " + " or ".join(options) + " fits; lower --cache-tokens or max_batch (--batch)"
        raise SpecEMError(
            f"cache_tokens={tokens} x max_batch={slots} needs {_gib(need)} of KV cache on {dev} ({each}) "
            f"plus {_gib(weights)} of weights, but only {_gib(avail)} is available; {fits}"
        )
