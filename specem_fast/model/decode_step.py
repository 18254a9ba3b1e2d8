"""The draft decode step through ``torch.compile`` (``compile=True``).

A draft step feeds one token per request. Planned on the host at round start
(:meth:`ModelRunner.plan_draft`), it needs nothing from the device, so the whole
step (embedding, every layer with its K/V write and attention, final norm) is
one graph. The attention is :func:`~specem_fast.kernels.decode_attention`, plain
torch over a key range given as a shape, and the K/V writes are in-place
scatters into the cache's base tensor (a write into a per-layer view would
compile into a copy of that layer's whole cache).

On CUDA the graph also runs as a CUDA graph (``mode="reduce-overhead"``), as
gpt-fast does: shapes must then repeat, so the batch is padded up to a power of
two (at most the number of slots) and the key range to a power of two (at least
64). Padding rows write their K/V to a sink position one past the cache budget
(:attr:`CacheShape.sink`) and their outputs are dropped. On the CPU the batch
and key-range sizes are marked dynamic, so one graph serves every size; a
single row is padded to two, as dynamo compiles size 1 apart.
"""

from __future__ import annotations

import shutil
from typing import NamedTuple

import torch
import torch.nn.functional as F

from specem_fast import kernels
from specem_fast.errors import SpecEMError

# Tests set this to True to run the CUDA-graph padding (batch and key buckets,
# sink writes) on the CPU, where it can be checked against the unpadded step,
# and may swap the compiler for the identity to check the step's logic quickly.
FORCE_BUCKETS = False
COMPILER = torch.compile
MIN_KEY_BUCKET = 64


class DenseStep(NamedTuple):
    """Inputs of one compiled step (device tensors sliced from one copy per round)."""

    rows: int  # real rows; the rest is padding
    slot: torch.Tensor  # [B] cache slot
    wpos: torch.Tensor  # [B] where the K/V is written (the sink for padding rows)
    pos: torch.Tensor  # [B] logical position (rotary, causal mask)
    key_pos: torch.Tensor  # arange(num_keys)


class _Meta(NamedTuple):
    slot: torch.Tensor
    wpos: torch.Tensor
    pos: torch.Tensor
    key_pos: torch.Tensor
    k_all: torch.Tensor
    v_all: torch.Tensor


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot run the step on ``device`` (None: it can)."""
    if device.type == "cuda":
        if not kernels.HAS_TRITON:
            return "torch.compile on CUDA needs triton (install the [gpu] extra)"
        return None
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (g++ or clang++) on the PATH"
    return None


def uses_buckets(device: torch.device) -> bool:
    """Whether the compiled step pads to buckets (CUDA graphs need repeating shapes)."""
    return device.type == "cuda" or FORCE_BUCKETS


def _raise_recompile_limit(n: int) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:
            setattr(cfg, name, n)


class CompiledDecode:
    """One model's compiled draft step over its KV cache."""

    def __init__(self, model, cache):
        self.model = model
        self.cache = cache
        self.device = cache.k.device
        problem = compile_problem(self.device)
        if problem:
            raise SpecEMError(f"compile=True cannot be used: {problem}; or run without --compile")
        self.buckets = uses_buckets(self.device)
        self.graphs = self.device.type == "cuda"
        self.num_slots = cache.k.shape[1]
        self.length = cache.k.shape[3]
        if self.length <= cache.capacity:
            raise ValueError("the compiled step needs the cache's sink position (CacheShape.sink=True)")
        self.sink = cache.capacity
        self.key_positions = torch.arange(self.length, device=self.device)
        if self.graphs:  # the cache is mutated in place by the graph: its address must not change
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        # every (batch, key) bucket is a graph of its own
        _raise_recompile_limit(64)
        mode = "reduce-overhead" if self.graphs else None
        self._fn = COMPILER(self._step, dynamic=False if self.buckets else None, mode=mode, fullgraph=True)

    # -- planning (host, once per round) --------------------------------------
    def _rows_bucket(self, n: int) -> int:
        if self.buckets:
            return min(1 << max(0, n - 1).bit_length(), self.num_slots)
        return max(n, min(2, self.num_slots))

    def _keys_bucket(self, n: int) -> int:
        if not self.buckets:
            return n
        return min(max(MIN_KEY_BUCKET, 1 << max(0, n - 1).bit_length()), self.length)

    def plan(self, steps: list[tuple]) -> list[DenseStep]:
        """The compiled inputs of a round's steps, from their host-side (rows, keep, slot, qpos, refed)."""
        flat: list[int] = []
        shapes = []
        for rows, _keep, slot, qpos, _refed in steps:
            n = len(rows)
            pad = self._rows_bucket(n) - n
            flat += slot + [0] * pad + qpos + [self.sink] * pad + qpos + [0] * pad
            shapes.append((n, n + pad, self._keys_bucket(max(qpos) + 1)))
        packed = torch.tensor(flat, dtype=torch.long).to(self.device)
        out, at = [], 0
        for n, b, nk in shapes:
            slot, wpos, pos = packed[at : at + b], packed[at + b : at + 2 * b], packed[at + 2 * b : at + 3 * b]
            at += 3 * b
            out.append(DenseStep(n, slot, wpos, pos, self.key_positions[:nk]))
        return out

    # -- the step ------------------------------------------------------------------
    def __call__(self, tokens: torch.Tensor, step: DenseStep) -> torch.Tensor:
        pad = step.slot.shape[0] - step.rows
        if pad:
            tokens = F.pad(tokens, (0, pad))
        if not self.buckets:  # one graph for every batch size and key range (after the first)
            for t in (tokens, step.slot, step.wpos, step.pos, step.key_pos):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        h = self._fn(tokens, step.slot, step.wpos, step.pos, step.key_pos, self.cache.k, self.cache.v)
        if self.graphs:
            h = h.clone()  # the next replay writes into the same output buffer
        return h[: step.rows] if pad else h

    def _step(self, tokens, slot, wpos, pos, key_pos, k_all, v_all):
        return self.model(tokens, pos, _Meta(slot, wpos, pos, key_pos, k_all, v_all), _dense_attend)


def _dense_attend(layer: int, q, k, v, meta: _Meta, scale: float, window: int,
                  softcap: float | None = None) -> torch.Tensor:
    """Write the step's K/V into the cache's base tensor in place, then attend."""
    k_all, v_all = meta.k_all, meta.v_all
    rows = meta.slot[:, None]
    where = (torch.full_like(rows, layer), rows, torch.arange(k.shape[1], device=k.device)[None, :], meta.wpos[:, None])
    k_all.index_put_(where, k.to(k_all.dtype))
    v_all.index_put_(where, v.to(v_all.dtype))
    cap = {"softcap": softcap} if softcap else {}
    return kernels.decode_attention(q, k_all[layer], v_all[layer], meta.slot, meta.pos, meta.key_pos, scale, window,
                                    **cap)
