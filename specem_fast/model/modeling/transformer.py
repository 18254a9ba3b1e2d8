"""The decoder of every native family, built from a ModelArgs (families.py says what differs).

Parameter names mirror the Hugging Face checkpoints so a safetensors state dict
loads as is. The forward takes a flat list of tokens from any number of
requests; where each token's K/V goes and what it may attend to is described
by :class:`AttnMeta`, so prefill, batched decode and packed multi-branch
verification are all the same call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from specem_fast.model.modeling.args import ModelArgs, NormSpec
from specem_fast.model.modeling.moe import MoE, activation


@dataclass
class AttnMeta:
    """Per-token placement in the slotted KV cache (all [T] int64 tensors)."""

    slot: torch.Tensor  # cache slot (request) of the token
    qpos: torch.Tensor  # physical cache position the token's K/V is written to
    prefix_len: torch.Tensor  # keys [0, prefix_len) are visible
    branch_start: torch.Tensor  # and keys [branch_start, qpos]
    positions: torch.Tensor  # logical position (for rotary embeddings)
    max_prefix: int = 0  # longest prefix_len (host copy, picks the attention path without a sync)
    # Launch plans, built from host-side values before the forward (no device->host
    # read) or, failing that, by the first layer, and reused by every layer.
    plan: object | None = None  # Triton branch kernel
    cascade: object | None = None  # the flash-attn cascade path
    ref_plan: object | None = None  # torch reference (rows of each slot, keys they see)


# attend(layer, q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D], meta, scale, window[, softcap=]) -> [T,Hq,D]:
# stores the tokens' K/V in the layer's cache, then attends over what each may see.
# The callback owns the cache so a compiled step can write into its base tensor
# (an in-place scatter) instead of a per-layer view (which compiles to a copy).
# ``softcap`` (attention logit soft-capping) is passed only by the layers of a
# family that has it, so an attend function without the keyword serves the others.
AttendFn = Callable[..., torch.Tensor]


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last dim, as ``spec`` says; ``shape`` may be
    [heads, head_dim] for a weight per head (Cohere's qk-norm)."""

    def __init__(self, shape: int | tuple[int, ...], spec: NormSpec):
        super().__init__()
        self.eps = spec.eps
        self.layer = spec.kind == "layer"
        self.offset = spec.offset
        self.weight_fp32 = spec.weight_fp32
        self.weight = nn.Parameter(torch.zeros(shape) if spec.offset else torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if spec.bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:  # torch's own LayerNorm (StarCoder2; Nemotron's scales by 1 + w)
            w = self.weight + 1.0 if self.offset else self.weight
            return F.layer_norm(x, self.weight.shape, w, self.bias, self.eps)
        h = x.float()
        if self.layer:
            h = h - h.mean(-1, keepdim=True)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        if self.weight_fp32:
            return (self.weight.float() * h).to(x.dtype)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.a = a
        hq, hkv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, hq, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, hkv, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, hkv, bias=a.qkv_bias)
        self.o_proj = nn.Linear(hq, a.hidden_size, bias=a.o_bias)
        shapes = {"head": (a.head_dim, a.head_dim), "head_each": ((a.num_heads, a.head_dim), (a.num_kv_heads, a.head_dim)),
                  "full": (hq, hkv)}.get(a.qk_norm)
        if shapes:
            self.q_norm = Norm(shapes[0], a.norm)
            self.k_norm = Norm(shapes[1], a.norm)
        self.cap = {"softcap": a.attn_softcap} if a.attn_softcap else {}

    def forward(self, x, cos, sin, layer: int, meta, window: int, attend: AttendFn):
        a = self.a
        t = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if a.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(t, a.num_heads, a.head_dim)
        k = k.view(t, a.num_kv_heads, a.head_dim)
        v = v.view(t, a.num_kv_heads, a.head_dim)
        if a.qk_norm in ("head", "head_each"):
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = _rotate(q, cos, sin, a.rope_interleaved), _rotate(k, cos, sin, a.rope_interleaved)
        o = attend(layer, q, k, v, meta, a.attn_scale, window, **self.cap)
        return self.o_proj(o.reshape(t, a.num_heads * a.head_dim))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gated = a.mlp == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
            self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
            self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)
        else:  # named as the family names them (starcoder2: c_fc/c_proj; arcee, nemotron: up_proj/down_proj)
            self.names = a.plain_names
            setattr(self, a.plain_names[0], nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias))
            setattr(self, a.plain_names[1], nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias))
        self.act = a.hidden_act

    def _act(self, x):
        if self.act == "silu":
            return F.silu(x)
        if self.act == "relu2":
            return torch.square(F.relu(x))
        return F.gelu(x, approximate="tanh" if self.act == "gelu_tanh" else "none")

    def forward(self, x):
        if self.gated:
            return self.down_proj(self._act(self.gate_proj(x)) * self.up_proj(x))
        return getattr(self, self.names[1])(self._act(getattr(self, self.names[0])(x)))


class Block(nn.Module):
    """One layer: norms where the family puts them (ModelArgs.block_norms), the
    residual adds, optionally scaled, or attention and MLP in parallel."""

    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(a, layer)
        routed = a.moe is not None and a.moe.layers[layer]
        self.mlp = MoE(a.moe, a.hidden_size, activation(a.hidden_act)) if routed else MLP(a)
        self.norm_names = a.block_norms
        for name in a.block_norms:
            if name is not None:
                setattr(self, name, Norm(a.hidden_size, a.norm))
        self.parallel = a.parallel
        self.residual_scale = a.residual_scale

    def _norm(self, i: int, x):
        name = self.norm_names[i]
        return x if name is None else getattr(self, name)(x)

    def forward(self, x, cos, sin, layer, meta, window, attend):
        h = self._norm(0, x)
        y = self._norm(1, self.self_attn(h, cos, sin, layer, meta, window, attend))
        if self.parallel:
            return x + y + self._norm(3, self.mlp(h))
        if self.residual_scale is not None:
            y = y * self.residual_scale
        x = x + y
        y = self._norm(3, self.mlp(self._norm(2, x)))
        if self.residual_scale is not None:
            y = y * self.residual_scale
        return x + y


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_layers))
        self.norm = Norm(a.hidden_size, a.norm)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        if not args.tie_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # Layers sharing rotary settings share one cos/sin table per forward.
        self._rope_groups: dict[int, int] = {}
        self._rope_switch: list[int | None] = []
        self.inv_freqs: list[tuple[torch.Tensor, float]] = []
        seen: dict[str, int] = {}
        for i in range(args.num_layers):
            key = repr(args.rope[i])
            if key not in seen:
                seen[key] = len(self.inv_freqs)
                inv, scaling = args.inv_freq(i)
                self.inv_freqs.append((inv.float(), scaling))  # fp32 like the reference
                self._rope_switch.append(args.rope_switch(i))
            self._rope_groups[i] = seen[key]
        self._embed_scale: dict[tuple, torch.Tensor] = {}

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.args.tie_embeddings else self.lm_head.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta, attend: AttendFn) -> torch.Tensor:
        """Final-norm hidden states [T, d] of the given tokens at logical ``positions``
        (times the family's logit scale, so ``hidden @ lm_head.T`` are its logits);
        ``attend`` writes their K/V (``meta`` is what it needs to place them)."""
        a = self.args
        x = self.model.embed_tokens(tokens)
        if a.embed_scale is not None:
            x = x * (self.embed_scale(x.dtype, x.device) if a.embed_scale_rounded else a.embed_scale)
        tables = [_cos_sin(inv, s, positions, x.dtype, sw, a.rope_interleaved)
                  for (inv, s), sw in zip(self.inv_freqs, self._rope_switch)]  # inv on device since load
        for i, block in enumerate(self.model.layers):
            cos, sin = tables[self._rope_groups[i]]
            x = block(x, cos, sin, i, meta, a.windows[i], attend)
        x = self.model.norm(x)
        return x if a.logit_scale is None else x * a.logit_scale

    def embed_scale(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Gemma's sqrt(hidden) embedding scale rounded to the compute dtype, as the
        reference rounds it; made once per dtype and device (not a host->device copy per forward)."""
        key = (dtype, device)
        if key not in self._embed_scale:
            self._embed_scale[key] = torch.tensor(self.args.embed_scale, dtype=torch.float32).to(dtype).to(device)
        return self._embed_scale[key]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits in fp32 (sampling and the reference path)."""
        z = (hidden @ self.lm_head_weight.T).float()
        if self.args.final_softcap:
            z = torch.tanh(z / self.args.final_softcap) * self.args.final_softcap
        return z


def _cos_sin(inv: torch.Tensor, scaling: float, positions: torch.Tensor, dtype: torch.dtype, switch: int | None,
             interleaved: bool):
    """cos/sin [T, 1, rotary_dim] of each position (None, None for a layer without rotary)."""
    if inv.numel() == 0:
        return None, None
    if switch is not None:  # longrope: long factors from the original context length on
        inv = torch.where((positions >= switch).unsqueeze(1), inv[1], inv[0])
        freqs = positions.float().unsqueeze(1) * inv
    else:
        freqs = positions.float().unsqueeze(1) * inv.unsqueeze(0)
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype).unsqueeze(1), (emb.sin() * scaling).to(dtype).unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    r = cos.shape[-1]
    xr = x[..., :r] if r < x.shape[-1] else x
    if interleaved:  # pairs (x0, x1) -> (-x1, x0)
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    else:
        half = r // 2
        rot = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    out = xr * cos + rot * sin
    return out if r == x.shape[-1] else torch.cat((out, x[..., r:]), dim=-1)
