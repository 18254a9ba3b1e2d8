"""Decoder-only transformer for llama / mistral / qwen2 / gemma3_text.

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

from specem_fast.model.modeling.args import ModelArgs


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


# attend(layer, q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D], meta, scale, window) -> [T,Hq,D]:
# stores the tokens' K/V in the layer's cache, then attends over what each may see.
# The callback owns the cache so a compiled step can write into its base tensor
# (an in-place scatter) instead of a per-layer view (which compiles to a copy).
AttendFn = Callable[..., torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool):
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one  # Gemma stores w - 1 and scales before the cast
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.attn_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.attn_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.attn_bias)
        # Qwen2 puts biases on q/k/v only; llama/gemma's attention_bias covers o_proj too.
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=a.attn_bias and a.arch != "qwen2")
        if a.gemma:
            self.q_norm = RMSNorm(a.head_dim, a.rms_eps, plus_one=True)
            self.k_norm = RMSNorm(a.head_dim, a.rms_eps, plus_one=True)

    def forward(self, x, cos, sin, layer: int, meta, window: int, attend: AttendFn):
        a = self.a
        t = x.shape[0]
        q = self.q_proj(x).view(t, a.num_heads, a.head_dim)
        k = self.k_proj(x).view(t, a.num_kv_heads, a.head_dim)
        v = self.v_proj(x).view(t, a.num_kv_heads, a.head_dim)
        if a.gemma:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        o = attend(layer, q, k, v, meta, a.attn_scale, window)
        return self.o_proj(o.reshape(t, a.num_heads * a.head_dim))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)
        self.act = a.hidden_act

    def forward(self, x):
        g = self.gate_proj(x)
        g = F.gelu(g, approximate="tanh") if self.act.startswith("gelu") else F.silu(g)
        return self.down_proj(g * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.gemma = a.gemma
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_eps, a.gemma)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_eps, a.gemma)
        if a.gemma:  # sandwich norms around both sublayers
            self.pre_feedforward_layernorm = RMSNorm(a.hidden_size, a.rms_eps, True)
            self.post_feedforward_layernorm = RMSNorm(a.hidden_size, a.rms_eps, True)

    def forward(self, x, cos, sin, layer, meta, window, attend):
        h = self.self_attn(self.input_layernorm(x), cos, sin, layer, meta, window, attend)
        if self.gemma:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_eps, a.gemma)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        if not args.tie_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # Layers sharing rotary settings share one cos/sin table per forward.
        self._rope_groups: dict[int, int] = {}
        self.inv_freqs: list[tuple[torch.Tensor, float]] = []
        seen: dict[str, int] = {}
        for i in range(args.num_layers):
            key = repr(args.rope[i])
            if key not in seen:
                seen[key] = len(self.inv_freqs)
                inv, scaling = args.inv_freq(i)
                self.inv_freqs.append((inv.float(), scaling))  # fp32 like the reference
            self._rope_groups[i] = seen[key]
        self._embed_scale: dict[tuple, torch.Tensor] = {}

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.args.tie_embeddings else self.lm_head.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta, attend: AttendFn) -> torch.Tensor:
        """Final-norm hidden states [T, d] of the given tokens at logical ``positions``;
        ``attend`` writes their K/V (``meta`` is what it needs to place them)."""
        a = self.args
        x = self.model.embed_tokens(tokens)
        if a.gemma:
            x = x * self.embed_scale(x.dtype, x.device)
        tables = [_cos_sin(inv, s, positions, x.dtype) for inv, s in self.inv_freqs]  # inv on device since load
        for i, block in enumerate(self.model.layers):
            cos, sin = tables[self._rope_groups[i]]
            x = block(x, cos, sin, i, meta, a.windows[i], attend)
        return self.model.norm(x)

    def embed_scale(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Gemma's sqrt(hidden) embedding scale rounded to the compute dtype, as the
        reference rounds it; made once per dtype and device (not a host->device copy per forward)."""
        key = (dtype, device)
        if key not in self._embed_scale:
            self._embed_scale[key] = torch.tensor(self.args.hidden_size**0.5, dtype=torch.float32).to(dtype).to(device)
        return self._embed_scale[key]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits in fp32 (sampling and the reference path)."""
        z = (hidden @ self.lm_head_weight.T).float()
        if self.args.final_softcap:
            z = torch.tanh(z / self.args.final_softcap) * self.args.final_softcap
        return z


def _cos_sin(inv: torch.Tensor, scaling: float, positions: torch.Tensor, dtype: torch.dtype):
    freqs = positions.float().unsqueeze(1) * inv.unsqueeze(0)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype).unsqueeze(1), (emb.sin() * scaling).to(dtype).unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin
