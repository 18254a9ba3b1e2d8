"""Loading an ensemble's members: names checked, memory checked, weights loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from specem_fast.config import EngineConfig
from specem_fast.errors import SpecEMError
from specem_fast.hub.fetch import resolve_model
from specem_fast.members.interface import Member
from specem_fast.hub.registry import DEFAULT_MODELS
from specem_fast.model.runner import ModelRunner, available_memory, memory_needs, resolve_dtype


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


def parse_spec(spec: str, placement: str = "local") -> MemberSpec:
    if spec.startswith("ray:"):
        model = spec[4:].strip()
        if not model:
            raise SpecEMError(f"member {spec!r} names no model; write ray:NAME with a registry name or folder")
        return MemberSpec(spec, "ray", model)
    if spec.startswith("vllm:"):
        from specem_fast.members.vllm import split_options

        url, sep, model = spec[5:].partition("#")
        model, options = split_options(model)
        if not sep or not model or not url.startswith(("http://", "https://")):
            raise SpecEMError(f"member {spec!r} is not vllm:URL#MODEL[;name=value...] (e.g. vllm:http://127.0.0.1:8001#"
                              "qwen2.5-coder-0.5b-instruct, MODEL naming the served model and its tokenizer; "
                              "options: served=NAME, key_env=VAR, timeout=S, retries=N, verify=prompt_logprobs|cached)")
        return MemberSpec(spec, "vllm", model, url.rstrip("/"), tuple(options.items()))
    return MemberSpec(spec, "ray" if placement == "ray" else "local", spec)


def load_members(models: Sequence[str] | str | None, verifiers: Sequence[str] | str | None, config: EngineConfig,
                 progress: bool = False, placement: str = "local", ray_address: str | None = None,
                 ) -> tuple[dict[str, ModelRunner], dict[str, Member], list[str], list[str]]:
    """(local runners, members in other processes or servers, drafters, verifiers): every name
    resolved and checked, and the local KV cache checked against the memory of each device,
    before any weights load."""
    if placement not in PLACEMENTS:
        raise SpecEMError(f"placement must be one of {', '.join(PLACEMENTS)} (got {placement!r})")
    drafters = _name_list(models, "models") if models is not None else [m.name for m in DEFAULT_MODELS]
    verifiers_ = _name_list(verifiers, "verifiers") if verifiers is not None else list(drafters)
    for what, per_model in (("devices", config.devices), ("dtypes", config.dtypes)):
        if per_model and len(per_model) != len(drafters):
            raise SpecEMError(f"{what} lists {len(per_model)} entries for {len(drafters)} models; give one per model")
    specs = {n: parse_spec(n, placement) for n in dict.fromkeys(drafters + verifiers_)}
    # one model under two spellings (a registry name and its folder, ./x and x/) is one model
    folders = {n: resolve_model(sp.model) for n, sp in specs.items()}
    keys = {n: (sp.kind, sp.url, folders[n].resolve(), dict(sp.options).get("served")) for n, sp in specs.items()}
    drafters = _distinct(drafters, keys, "models")
    verifiers_ = _distinct(verifiers_, keys, "verifiers")
    same = {keys[d]: d for d in drafters}
    verifiers_ = [same.get(keys[v], v) for v in verifiers_]
    all_names = drafters + [v for v in verifiers_ if v not in drafters]
    placement_of = dict(zip(drafters, config.devices))
    precision = dict(zip(drafters, config.dtypes))
    where = {n: (placement_of.get(n, config.device), precision.get(n, config.dtype)) for n in all_names}
    local = [n for n in all_names if specs[n].kind == "local"]
    _check_memory({n: (folders[n], *where[n]) for n in local}, config)
    runners, remote = {}, {}
    for n in tqdm(all_names, desc="loading models", unit="model", disable=not progress, leave=False):
        sp = specs[n]
        if sp.kind == "local":
            runners[n] = ModelRunner(n, folders[n], *where[n], config.kernels, config.flash_attn, config.compile)
        elif sp.kind == "ray":
            from specem_fast.members.ray import RayMember

            remote[n] = RayMember.start(n, folders[n], *where[n], config, ray_address=ray_address,
                                        members=sum(specs[m].kind == "ray" for m in all_names))
        else:
            from specem_fast.members.vllm import VLLMMember

            remote[n] = VLLMMember(n, sp.url, sp.model, folders[n], config, **dict(sp.options))
    return runners, remote, drafters, verifiers_


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


def _check_memory(models: dict[str, tuple], config: EngineConfig) -> None:
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
