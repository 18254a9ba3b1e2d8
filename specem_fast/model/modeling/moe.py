"""Routed mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

Per token: router logits ``x @ gate.T`` [E], softmax over the experts in fp32,
the top-k experts by probability, optionally their weights renormalised to sum
to 1 (Mixtral always; Qwen's ``norm_topk_prob``); the output is the weighted
sum of those experts' gated MLPs, plus, for Qwen2-MoE, a shared expert scaled
by ``sigmoid(x @ shared_expert_gate.T)``.

Weights are held stacked, as transformers 5 holds them in memory:
``experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows) and
``experts.down_proj`` [E, H, I]. Checkpoints store them either that way or one
tensor per expert and projection (``experts.{e}.gate_proj.weight``; Mixtral's
``block_sparse_moe.experts.{e}.w1/w3/w2.weight``): :class:`ExpertStacker`
gathers those into the stacked tensors at load time.

Two ways to compute, the same numbers:

* grouped (the default): tokens are grouped by expert (one host read of the
  per-expert counts) and each expert hit runs once over its tokens, reading its
  weights in place;
* gathered, for a few tokens on a GPU or inside torch.compile (the compiled
  draft step): each (token, chosen expert) pair gathers its expert's weights
  and runs a batched matmul: no data-dependent shapes and no host sync. On the
  CPU that copy of the chosen experts' weights costs more than the host read
  it saves (measured: 3-5x the grouped path), so eager CPU code never takes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from specem_fast.errors import SpecEMError

__all__ = ["ExpertStacker", "MoE", "MoeSpec", "activation", "moe_spec"]

# (token, expert) pairs up to which the gathered (sync-free) path runs on a GPU or under torch.compile
GATHER_MAX_PAIRS = 64
GATHER_ON_CPU = False  # tests: take the gathered path in eager CPU code too


@dataclass(frozen=True)
class MoeSpec:
    """A routed MLP's shape and routing rule, read from config.json (see :func:`moe_spec`)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    norm_topk: bool  # renormalise the top-k probabilities to sum to 1
    shared_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    weights_fp32: bool = False  # apply the routing weights in fp32, then cast (Mixtral), else cast first (Qwen)
    layers: tuple[bool, ...] = ()  # per layer: routed (True) or a dense MLP of the config's intermediate_size


# How each family names its settings (transformers' configuration_<type>.py; defaults there too).
_KINDS: dict[str, dict[str, Any]] = {
    # Mixtral: softmax, top-k, always renormalised; every layer routed
    "mixtral": dict(experts="num_local_experts", experts_default=8, size="intermediate_size", norm=True,
                    norm_key=None, shared=False, sparse=False, fp32=True),
    # Qwen2-MoE: shared expert with a sigmoid gate; norm_topk_prob default False
    "qwen2_moe": dict(experts="num_experts", experts_default=60, size="moe_intermediate_size", norm=False,
                      norm_key="norm_topk_prob", shared=True, sparse=True, fp32=False),
    # Qwen3-MoE: no shared expert; norm_topk_prob (False by default, True in the released models)
    "qwen3_moe": dict(experts="num_experts", experts_default=128, size="moe_intermediate_size", norm=False,
                      norm_key="norm_topk_prob", shared=False, sparse=True, fp32=False),
}
MOE_KINDS = tuple(_KINDS)


def _int(cfg: dict[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise SpecEMError(f"config.json has no {key}; it is needed to build the model: re-save the model's config")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecEMError(f"config.json: {key} must be an integer >= {minimum} (got {value!r}); "
                          "fix config.json to match the weights")
    return value


def moe_spec(kind: str, cfg: dict[str, Any], num_layers: int) -> MoeSpec:
    """The routed MLP of a ``kind`` ("mixtral", "qwen2_moe", "qwen3_moe") config; bad values raise SpecEMError."""
    k = _KINDS[kind]
    key = k["experts"]
    if cfg.get(key) is None and cfg.get("num_local_experts") is not None:  # transformers' attribute_map alias
        key = "num_local_experts"
    experts = _int(cfg, key, k["experts_default"])
    top_k = _int(cfg, "num_experts_per_tok", 2 if kind == "mixtral" else 4 if kind == "qwen2_moe" else 8)
    if top_k > experts:
        raise SpecEMError(f"config.json: num_experts_per_tok={top_k} exceeds the {experts} experts; "
                          "fix config.json to match the weights")
    size = _int(cfg, k["size"])
    norm = bool(cfg.get(k["norm_key"], k["norm"])) if k["norm_key"] else k["norm"]
    shared = _int(cfg, "shared_expert_intermediate_size", minimum=0) if k["shared"] else 0
    routed = [True] * num_layers
    if k["sparse"]:
        step = _int(cfg, "decoder_sparse_step", 1)
        dense = cfg.get("mlp_only_layers") or []
        if not isinstance(dense, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in dense):
            raise SpecEMError(f"config.json: mlp_only_layers must be a list of layer numbers (got {dense!r}); "
                              "fix config.json to match the weights")
        routed = [i not in dense and (i + 1) % step == 0 for i in range(num_layers)]
    return MoeSpec(num_experts=experts, top_k=top_k, intermediate_size=size, norm_topk=norm,
                   shared_intermediate_size=shared, weights_fp32=k["fp32"], layers=tuple(routed))


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The experts' activation by ModelArgs.hidden_act name ("silu", "gelu_tanh" or "gelu")."""
    if name == "silu":
        return F.silu
    approximate = "tanh" if name == "gelu_tanh" else "none"
    return lambda x: F.gelu(x, approximate=approximate)


def route(logits: torch.Tensor, top_k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] fp32, expert ids [T, k]): softmax in fp32, top-k, optionally renormalised."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    if norm:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, idx


class Experts(nn.Module):
    """E gated MLPs, stacked: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.inter = inter
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))


class SharedExpert(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


class MoE(nn.Module):
    """The routed MLP of one layer (parameter names as transformers 5 holds them under ``mlp.``)."""

    def __init__(self, spec: MoeSpec, hidden: int, act: Callable[[torch.Tensor], torch.Tensor] = F.silu):
        super().__init__()
        self.spec = spec
        self.act = act
        self.gate = nn.Linear(hidden, spec.num_experts, bias=False)  # the router
        self.experts = Experts(spec.num_experts, hidden, spec.intermediate_size)
        if spec.shared_intermediate_size:
            self.shared_expert = SharedExpert(hidden, spec.shared_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [T, H] -> [T, H] in x's dtype."""
        s = self.spec
        w, idx = route(self.gate(x), s.top_k, s.norm_topk)
        if not s.weights_fp32:
            w = w.to(x.dtype)
        if x.shape[0] * s.top_k <= GATHER_MAX_PAIRS and (
                x.device.type != "cpu" or GATHER_ON_CPU or torch.compiler.is_compiling()):
            out = self._gathered(x, w, idx)
        else:
            out = self._grouped(x, w, idx)
        if s.shared_intermediate_size:
            se = self.shared_expert
            shared = se.down_proj(self.act(se.gate_proj(x)) * se.up_proj(x))
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out

    def _expert_rows(self, h: torch.Tensor, gu: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        inter = self.experts.inter
        z = h @ gu.transpose(-1, -2) if gu.dim() == 2 else torch.bmm(gu, h.unsqueeze(-1)).squeeze(-1)
        y = self.act(z[..., :inter]) * z[..., inter:]
        return y @ down.transpose(-1, -2) if down.dim() == 2 else torch.bmm(down, y.unsqueeze(-1)).squeeze(-1)

    def _gathered(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair with its own gathered weights: no host sync, static shapes."""
        t, k = idx.shape
        flat = idx.reshape(-1)
        h = x.repeat_interleave(k, dim=0)  # [T*k, H], pair p = (token p // k, choice p % k)
        y = self._expert_rows(h, self.experts.gate_up_proj[flat], self.experts.down_proj[flat])  # [T*k, H]
        y = y.view(t, k, -1) * w.unsqueeze(-1)
        return y.sum(1).to(x.dtype) if self.spec.weights_fp32 else y.sum(1)

    def _grouped(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Tokens grouped by expert; each expert hit runs once (one host read of the counts)."""
        t, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.spec.num_experts).tolist()
        tok = order // k
        wsorted = w.reshape(-1)[order]
        out = torch.zeros(x.shape, dtype=w.dtype if self.spec.weights_fp32 else x.dtype, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            rows = tok[start : start + n]
            y = self._expert_rows(x[rows], self.experts.gate_up_proj[e], self.experts.down_proj[e])
            out.index_add_(0, rows, (y * wsorted[start : start + n, None]).to(out.dtype))
            start += n
        return out.to(x.dtype)


# -- loading --------------------------------------------------------------------------------------------------

_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def moe_key(name: str) -> str:
    """A checkpoint key under our names: Mixtral's ``block_sparse_moe.`` becomes ``mlp.``."""
    return name.replace(".block_sparse_moe.", ".mlp.", 1) if ".block_sparse_moe." in name else name


class ExpertStacker:
    """Gathers per-expert checkpoint tensors into the stacked ``experts.*`` tensors at load.

    ``claims(name)`` says whether a (normalised) checkpoint key is one expert's
    projection; ``add`` takes it and returns the finished stacked tensors
    (``[(our name, tensor)]``) once a layer's last piece arrived; ``finish``
    refuses a layer with pieces missing. ``expected`` maps our parameter names
    to their shapes (the model built on the meta device).
    """

    def __init__(self, expected: dict[str, tuple[int, ...]], folder: Any, fix: str):
        self.expected = expected
        self.folder = folder
        self.fix = fix
        self.pending: dict[str, dict[tuple[int, str], torch.Tensor]] = {}

    def claims(self, name: str) -> bool:
        m = _PER_EXPERT.match(name)
        return bool(m) and m.group(3) in _PART and (m.group(1) + "mlp.experts.down_proj") in self.expected

    def add(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        m = _PER_EXPERT.match(name)
        layer, e, part = m.group(1), int(m.group(2)), _PART[m.group(3)]
        gu, dn = layer + "mlp.experts.gate_up_proj", layer + "mlp.experts.down_proj"
        n_exp, two_i, hidden = self.expected[gu]
        inter = two_i // 2
        want = (hidden, inter) if part == "down" else (inter, hidden)
        if e >= n_exp:
            raise SpecEMError(f"{self.folder}: the weights hold {name}, expert {e}, but config.json says "
                              f"{n_exp} experts; fix config.json to match the weights")
        if tuple(t.shape) != want:
            raise SpecEMError(f"{self.folder}: tensor {name} has shape {list(t.shape)} but config.json implies "
                              f"{list(want)}; config.json does not belong to these weights ({self.fix})")
        got = self.pending.setdefault(layer, {})
        if (e, part) in got:
            raise SpecEMError(f"{self.folder}: the weights hold {name} twice; the checkpoint is inconsistent: re-save it")
        got[(e, part)] = t
        if len(got) < 3 * n_exp:
            return []
        del self.pending[layer]
        stacked_gu = torch.stack([torch.cat([got[(i, "gate")], got[(i, "up")]], dim=0) for i in range(n_exp)])
        stacked_dn = torch.stack([got[(i, "down")] for i in range(n_exp)])
        return [(gu, stacked_gu), (dn, stacked_dn)]

    def finish(self) -> None:
        for layer, got in self.pending.items():
            n_exp = self.expected[layer + "mlp.experts.down_proj"][0]
            missing = [f"{e}.{p}" for e in range(n_exp) for p in ("gate", "up", "down") if (e, p) not in got]
            raise SpecEMError(f"{self.folder}: the weights of {layer}mlp.experts miss {len(missing)} expert "
                              f"projections (first: expert {missing[0]}); is this a complete checkpoint?")
