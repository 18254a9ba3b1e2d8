"""Cascade attention: shared prefix through flash-attn, branches through our kernel.

Same contract as :func:`~specem_fast.kernels.branch_attention.branch_attention`
on layers without a sliding window, computed in two parts merged by
log-sum-exp (the FlashInfer cascade design):

* prefix: every query of a request attends, non-causally, to its slot's cached
  keys ``[0, prefix_len)``. That is plain attention over a contiguous cache
  range, which ``flash_attn_with_kvcache`` does in place: our cache
  ``[S, Hkv, L, D]`` goes in as the strided view ``[S, L, Hkv, D]``,
  ``cache_batch_idx`` picks the slot and ``cache_seqlens`` the prefix length,
  so nothing is copied. Queries are regrouped into a padded ``[B, Qmax, Hq, D]``
  batch, one row per (slot, prefix_len) group.
* branches: "only my own candidate, causally" is not expressible in
  flash-attn's packed layout, so :func:`branch_attention` runs with
  ``prefix_len = 0`` (it then visits the few branch key tiles only).
* merge: a small Triton kernel reads both partial outputs and LSEs, weights
  them by ``exp(lse - max)`` and writes the result in place of the branch
  output.

The torch reference (CPU path and test oracle) is the one of the whole
computation, :func:`~specem_fast.kernels.reference.branch_attention_reference`.

Attention logit soft-capping (Gemma-2, ``softcap``) goes to both parts:
flash-attn's own ``softcap`` argument (flash-attn >= 2.6 and FlashAttention-3;
an older build raises and the runner's first-call check falls back) and the
branch kernel's.

Sliding-window layers stay on :func:`branch_attention`: a window measured
from each branch token's own logical position has no flash-attn equivalent
when the K*W packed queries share one row of the padded batch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ._triton import HAS_TRITON, cdiv as _cdiv, next_pow2 as _next_pow2, require_triton, tl, triton
from .branch_attention import (
    index_values_on_host,
    BranchAttentionPlan,
    _check_inputs,
    _check_softcap,
    branch_attention,
    check_branch_after_prefix,
    plan_branch_attention_host,
)

__all__ = ["CascadePlan", "PrefixBackend", "cascade_attention", "plan_cascade_attention", "plan_cascade_attention_host",
           "prefix_backend"]


@dataclass(frozen=True)
class PrefixBackend:
    """A function with ``flash_attn_with_kvcache``'s signature and the dtypes it accepts."""

    name: str
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    dtypes: tuple[torch.dtype, ...]


def _load_flash_attn() -> PrefixBackend | None:
    """FlashAttention-3 (Hopper build, module ``flash_attn_interface``) if present, else
    FlashAttention-2 (``flash_attn``): both take the keyword arguments used here."""
    for module, name in (("flash_attn_interface", "flash-attn-3"), ("flash_attn", "flash-attn")):
        try:
            fn = importlib.import_module(module).flash_attn_with_kvcache
        except Exception:  # noqa: BLE001 - not installed, or built against another torch / CUDA
            continue
        return PrefixBackend(name, fn, (torch.float16, torch.bfloat16))
    return None


_UNSET = object()
_backend: PrefixBackend | None | object = _UNSET


def prefix_backend() -> PrefixBackend | None:
    """flash-attn if it imports (loaded on first use), else None."""
    global _backend
    if _backend is _UNSET:
        _backend = _load_flash_attn()
    return _backend  # type: ignore[return-value]


if HAS_TRITON:

    @triton.jit
    def _cascade_merge_kernel(
        op_ptr, lp_ptr, o_ptr, lb_ptr, scatter_ptr, plen_ptr,
        Hq, D, q_max,
        stride_op_r, stride_op_h, stride_lp_b, stride_lp_h, stride_lp_q, stride_o_t, stride_o_h,
        RETURN_LSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = offs_h < Hq
        offs_d = tl.arange(0, BLOCK_D)
        mask = h_ok[:, None] & (offs_d < D)[None, :]
        row = tl.load(scatter_ptr + t).to(tl.int64)
        b = row // q_max
        i = row % q_max
        has = tl.load(plen_ptr + t) > 0
        lb = tl.load(lb_ptr + t.to(tl.int64) * Hq + offs_h, mask=h_ok, other=0.0)
        # an empty prefix gives +inf (flash-attn 2) or -inf: never read it
        lp = tl.load(lp_ptr + b * stride_lp_b + offs_h * stride_lp_h + i * stride_lp_q, mask=h_ok & has,
                     other=float("-inf")).to(tl.float32)
        m = tl.maximum(lp, lb)  # lb is finite: every query sees its own key
        wp = tl.exp(lp - m)
        wb = tl.exp(lb - m)
        den = wp + wb
        op = tl.load(op_ptr + row * stride_op_r + offs_h[:, None] * stride_op_h + offs_d[None, :],
                     mask=mask & has, other=0.0).to(tl.float32)
        o_rows = o_ptr + t.to(tl.int64) * stride_o_t + offs_h[:, None] * stride_o_h + offs_d[None, :]
        ob = tl.load(o_rows, mask=mask, other=0.0).to(tl.float32)
        o = (op * wp[:, None] + ob * wb[:, None]) / den[:, None]
        tl.store(o_rows, o.to(o_ptr.dtype.element_ty), mask=mask)
        if RETURN_LSE:
            tl.store(lb_ptr + t.to(tl.int64) * Hq + offs_h, m + tl.log(den), mask=h_ok)


@dataclass(frozen=True)
class CascadePlan:
    """Host-side layout of one set of packed queries (reusable by every layer)."""

    num_tokens: int
    num_rows: int  # B: (slot, prefix_len) groups
    q_max: int  # queries in the largest group
    max_prefix: int
    gather: torch.Tensor  # [B*q_max] int64: token of each padded query row (padding repeats a real token)
    scatter: torch.Tensor  # [T] int64: padded row of each token
    seqlens: torch.Tensor  # [B] int32: prefix length of each row (flash-attn's cache_seqlens)
    batch_idx: torch.Tensor  # [B] int32: cache slot of each row (flash-attn's cache_batch_idx)
    zero_prefix: torch.Tensor  # [T] int32 zeros: prefix_len of the branch-only pass
    branch: BranchAttentionPlan  # plan of the branch-only pass


def plan_cascade_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    slot: torch.Tensor,
    qpos: torch.Tensor,
    prefix_len: torch.Tensor,
    branch_start: torch.Tensor,
    *,
    block_r: int | None = None,
) -> CascadePlan:
    """Group queries by (slot, prefix_len) and plan the branch-only pass (host syncs: once per forward).

    :func:`plan_cascade_attention_host` builds the same plan from host-side values without the sync.
    """
    idx = index_values_on_host(q, k_cache, slot, qpos, prefix_len, branch_start)
    return plan_cascade_attention_host(*idx, num_heads=q.shape[1], k_shape=tuple(k_cache.shape), dtype=q.dtype,
                                       device=q.device, block_r=block_r)


def plan_cascade_attention_host(
    slot,
    qpos,
    prefix_len,
    branch_start,
    *,
    num_heads: int,
    k_shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device | str,
    block_r: int | None = None,
) -> CascadePlan:
    """:func:`plan_cascade_attention` from host-side index values (sequences of ints)."""
    sl, qp, pl, bs = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (slot, qpos, prefix_len, branch_start))
    t_ = len(sl)
    zeros_host = np.zeros(t_, dtype=np.int64)
    branch = plan_branch_attention_host(sl, qp, zeros_host, bs, num_heads=num_heads, k_shape=k_shape, dtype=dtype,
                                        device=device, block_r=block_r)
    if len(pl) != t_:
        raise ValueError(f"prefix_len must have one entry per query token (T={t_})")
    lmax = k_shape[2]
    if t_ and (pl.min() < 0 or pl.max() > lmax):
        raise ValueError(f"prefix_len must lie in [0, Lmax={lmax}], got {pl.min()}..{pl.max()}")
    check_branch_after_prefix(pl, bs)  # the branch pass runs with prefix_len 0: an overlap would count twice
    _, group = np.unique(np.stack([sl, pl], axis=1), axis=0, return_inverse=True)
    group = group.reshape(-1)
    num_rows = int(group.max()) + 1 if t_ else 0
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group, minlength=num_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if num_rows else counts
    rank = np.empty(t_, dtype=np.int64)
    rank[order] = np.arange(t_) - np.repeat(starts, counts)
    q_max = int(counts.max()) if num_rows else 0
    scatter = group.astype(np.int64) * q_max + rank
    gather = np.zeros(num_rows * q_max, dtype=np.int64)
    gather[scatter] = np.arange(t_)
    first = order[starts] if num_rows else np.zeros(0, dtype=np.int64)
    # one host->device copy: gather, scatter, then the int32 fields (seqlens, batch_idx, zero prefix)
    n_g = len(gather)
    longs = torch.from_numpy(np.concatenate([gather, scatter]).astype(np.int64)).to(device)
    ints = torch.from_numpy(np.concatenate([pl[first], sl[first], zeros_host]).astype(np.int32)).to(device)
    return CascadePlan(
        num_tokens=t_, num_rows=num_rows, q_max=q_max, max_prefix=int(pl.max()) if t_ else 0,
        gather=longs[:n_g], scatter=longs[n_g:],
        seqlens=ints[:num_rows], batch_idx=ints[num_rows : 2 * num_rows],
        zero_prefix=ints[2 * num_rows :], branch=branch,
    )


def cascade_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    qpos: torch.Tensor,
    prefix_len: torch.Tensor,
    branch_start: torch.Tensor,
    scale: float,
    window: int = 0,
    *,
    plan: CascadePlan | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    softcap: float | None = None,
):
    """Packed-branch attention with the prefix part in flash-attn (see the module doc).

    Arguments and result as :func:`branch_attention`; ``window`` must be 0;
    ``plan`` comes from :func:`plan_cascade_attention` on the same index tensors;
    ``softcap`` (None or 0 = off) soft-caps the attention logits of both parts.
    """
    require_triton("branch_attention_reference")
    _check_inputs(q, k_cache, v_cache, slot, qpos, prefix_len, branch_start, scale, window)
    cap = _check_softcap(softcap)
    if window:
        raise ValueError("cascade_attention covers layers without a sliding window; use branch_attention there")
    backend = prefix_backend()
    if backend is None:
        raise RuntimeError("flash-attn is not installed: install the [gpu] extra on a CUDA machine, "
                           "or use branch_attention")
    if q.dtype not in backend.dtypes:
        raise ValueError(f"{backend.name} takes {', '.join(str(d)[6:] for d in backend.dtypes)}, got {q.dtype}; "
                         "run the model in bfloat16/float16 or use branch_attention")
    if plan is None:
        plan = plan_cascade_attention(q, k_cache, slot, qpos, prefix_len, branch_start)
    elif not isinstance(plan, CascadePlan) or plan.num_tokens != q.shape[0]:
        raise ValueError("plan does not match these inputs (token count differs): rebuild it")
    out, lse = branch_attention(q, k_cache, v_cache, slot, qpos, plan.zero_prefix, branch_start, scale, 0,
                                plan=plan.branch, return_lse=True, out=out, softcap=cap)
    t_, hq, d = q.shape
    if plan.max_prefix == 0 or t_ == 0:
        return (out, lse) if return_lse else out
    q_pad = q[plan.gather].view(plan.num_rows, plan.q_max, hq, d)
    extra = {"softcap": cap} if cap else {}  # flash-attn before 2.6 has no softcap argument
    res = backend.fn(
        q_pad, k_cache.transpose(1, 2), v_cache.transpose(1, 2), cache_seqlens=plan.seqlens,
        cache_batch_idx=plan.batch_idx, softmax_scale=float(scale), causal=False, return_softmax_lse=True, **extra,
    )
    o_pad, lse_pad = res[0], res[1]  # FlashAttention-3 may return more
    o_rows = o_pad.reshape(plan.num_rows * plan.q_max, hq, d)
    block_d = max(16, _next_pow2(d))
    block_h = max(1, min(_next_pow2(hq), 2048 // block_d))
    _cascade_merge_kernel[(t_, _cdiv(hq, block_h))](
        o_rows, lse_pad, out, lse, plan.scatter, prefix_len, hq, d, plan.q_max,
        o_rows.stride(0), o_rows.stride(1), lse_pad.stride(0), lse_pad.stride(1), lse_pad.stride(2),
        out.stride(0), out.stride(1),
        RETURN_LSE=return_lse, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )
    return (out, lse) if return_lse else out
