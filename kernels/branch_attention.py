"""Packed-branch attention (Triton): shared prefix + short branches, one pass.

Semantics are those of :func:`~specem_fast.kernels.reference.branch_attention_reference`:
query t (in cache slot ``slot[t]``) sees cache keys ``j < prefix_len[t]`` and
``branch_start[t] <= j <= qpos[t]``; with ``window > 0`` only keys whose
logical position is within ``window`` of the query's (Gemma-3 sliding layers).

Design (after FlashAttention / FlashInfer cascade attention):

* Queries are grouped by slot into blocks (a host-side *plan*, built once per
  verify forward and reusable by every layer). One program handles one block of
  queries x one KV head: its rows are (query, q-head-of-the-group) pairs, so all
  queries of the block AND all q heads sharing the KV head (GQA) reuse every K/V
  tile it loads -- the prefix is read once per block, not once per query token.
* Per block the program visits only the key tiles that can be visible: the
  prefix range (cut from below by the sliding window) and the branch range
  ``[min branch_start, max qpos]``; the gap between them (other requests' or
  stale cache) is skipped. The exact visibility rule is applied per element.
* Long prefixes with few queries are split over the key tiles (flash-decoding):
  each split writes an unnormalised partial output and its (max, sum-exp); a
  small merge kernel combines them by log-sum-exp. With one split the kernel
  normalises and writes the output directly.
* fp32 accumulation; the output is in q's dtype; optionally returns the
  natural-log LSE per (token, head), ``[T, Hq]`` fp32, for merging with another
  attention over other keys (e.g. flash-attn over the prefix).
* ``softcap`` (Gemma-2 attention logit soft-capping): each scaled score ``s``
  becomes ``softcap * tanh(s / softcap)`` before masking; a constexpr variant,
  so layers without it run the plain kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._triton import HAS_TRITON, cdiv as _cdiv, interpreting as _interpreting, next_pow2 as _next_pow2, require_triton, tl, triton
from ._triton import num_sms as _num_sms
from .segment_score import _precision

__all__ = ["BranchAttentionConfig", "BranchAttentionPlan", "branch_attention", "plan_branch_attention",
           "plan_branch_attention_host"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MAX_HEAD_DIM = 256

# Tests set this to True: split partial buffers are filled with NaN.
POISON_SCRATCH = False


if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        # tanh from exp2 (the interpreter and every backend have it); exact at the tails
        LOG2E: tl.constexpr = 1.4426950408889634
        e = tl.exp2(-2.0 * LOG2E * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def _attn_tile(
        acc, m_i, l_i, q, k_base, v_base, n0, stride_kl, stride_vl, offs_d, d_mask, Lmax, a1, b0, b1,
        pl, bs, qp, q_log, window, qk_scale, cap_out,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # Only keys some row of the block may see are loaded: cache entries past
        # them (unwritten, possibly NaN) must not reach P @ V (0 * NaN = NaN).
        n_ok = (offs_n < Lmax) & ((offs_n < a1) | ((offs_n >= b0) & (offs_n < b1)))
        kv_mask = n_ok[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n.to(tl.int64)[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_SOFTCAP:  # qk_scale = scale / softcap, cap_out = softcap * log2(e)
            s = _tanh(s) * cap_out
        j = offs_n[None, :]
        in_prefix = j < pl[:, None]
        vis = in_prefix | ((j >= bs[:, None]) & (j <= qp[:, None]))
        if HAS_WINDOW:
            k_log = tl.where(in_prefix, j, pl[:, None] + (j - bs[:, None]))
            vis = vis & ((q_log[:, None] - k_log) < window)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _block_queries(
        order_ptr, bstart_ptr, bcount_ptr, slot_ptr, qpos_ptr, plen_ptr, bst_ptr, blk, kvh,
        GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # Rows are (query, q head of this KV head's group) pairs; a block's queries share one slot.
        start = tl.load(bstart_ptr + blk)
        cnt = tl.load(bcount_ptr + blk)
        r = tl.arange(0, BLOCK_R)
        qi = r // GROUP
        r_ok = qi < cnt
        t = tl.load(order_ptr + start + qi, mask=r_ok, other=0).to(tl.int32)
        h = kvh * GROUP + (r % GROUP)
        t_first = tl.load(order_ptr + start)
        s_idx = tl.load(slot_ptr + t_first).to(tl.int64)
        qp = tl.load(qpos_ptr + t, mask=r_ok, other=0).to(tl.int32)
        pl = tl.load(plen_ptr + t, mask=r_ok, other=0).to(tl.int32)
        bs = tl.load(bst_ptr + t, mask=r_ok, other=0).to(tl.int32)
        return t, h, r_ok, s_idx, qp, pl, bs

    @triton.jit
    def _key_tiles(pl, bs, qp, q_log, r_ok, window, num_splits, sp, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
        # Key tile ranges: A = prefix, B = branches (merged when they overlap);
        # this split visits tiles [i0, i1) of the nA + nB.
        BIG: tl.constexpr = 1073741824
        a1 = tl.max(tl.where(r_ok, pl, 0), axis=0)
        if HAS_WINDOW:
            a0 = tl.maximum(tl.min(tl.where(r_ok, q_log - window + 1, BIG), axis=0), 0)
        else:
            a0 = a1 * 0
        A0 = (a0 // BLOCK_N) * BLOCK_N
        nA = tl.where(a1 > a0, (a1 - A0 + BLOCK_N - 1) // BLOCK_N, 0)
        endA = A0 + nA * BLOCK_N
        b0 = tl.min(tl.where(r_ok, bs, BIG), axis=0)
        b1 = tl.max(tl.where(r_ok, qp, -1), axis=0) + 1
        B0 = (b0 // BLOCK_N) * BLOCK_N
        overlap = (nA > 0) & (B0 < endA)
        U0 = tl.minimum(A0, B0)
        nU = (tl.maximum(endA, b1) - U0 + BLOCK_N - 1) // BLOCK_N
        A0 = tl.where(overlap, U0, A0)
        nA = tl.where(overlap, nU, nA)
        nB = tl.where(overlap, 0, (b1 - B0 + BLOCK_N - 1) // BLOCK_N)
        total = nA + nB
        tps = (total + num_splits - 1) // num_splits
        i0 = sp * tps
        i1 = tl.minimum(i0 + tps, total)
        return a1, b0, b1, A0, nA, B0, i0, i1

    @triton.jit
    def _store_rows(
        acc, m_i, l_i, t, h, r_ok, offs_d, d_mask, o_ptr, lse_ptr, po_ptr, pm_ptr, pl_ptr, sp, T, Hq, D,
        stride_ot, stride_oh, SPLIT: tl.constexpr, RETURN_LSE: tl.constexpr,
    ):
        # A split leaves its unnormalised partial for the merge kernel; a lone split normalises here.
        LN2: tl.constexpr = 0.6931471805599453
        row_mask = r_ok[:, None] & d_mask[None, :]
        if SPLIT:
            prow = (sp * T + t).to(tl.int64) * Hq + h
            tl.store(po_ptr + prow[:, None] * D + offs_d[None, :], acc, mask=row_mask)
            tl.store(pm_ptr + prow, m_i, mask=r_ok)
            tl.store(pl_ptr + prow, l_i, mask=r_ok)
        else:
            l_safe = tl.where(r_ok, l_i, 1.0)
            o = acc / l_safe[:, None]
            o_rows = o_ptr + t.to(tl.int64)[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :]
            tl.store(o_rows, o.to(o_ptr.dtype.element_ty), mask=row_mask)
            if RETURN_LSE:
                tl.store(lse_ptr + t.to(tl.int64) * Hq + h, (m_i + tl.log2(l_safe)) * LN2, mask=r_ok)

    @triton.jit(do_not_specialize=["window", "T", "num_splits"])
    def _branch_attn_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, po_ptr, pm_ptr, pl_ptr,
        order_ptr, bstart_ptr, bcount_ptr, slot_ptr, qpos_ptr, plen_ptr, bst_ptr,
        qk_scale, softcap, window, T, Hq, Lmax, D, num_splits,
        stride_qt, stride_qh, stride_ks, stride_kh, stride_kl, stride_vs, stride_vh, stride_vl,
        stride_ot, stride_oh,
        GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, RETURN_LSE: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        LOG2E: tl.constexpr = 1.4426950408889634
        blk = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        t, h, r_ok, s_idx, qp, pl, bs = _block_queries(
            order_ptr, bstart_ptr, bcount_ptr, slot_ptr, qpos_ptr, plen_ptr, bst_ptr, blk, kvh, GROUP, BLOCK_R,
        )
        q_log = pl + (qp - bs)
        a1, b0, b1, A0, nA, B0, i0, i1 = _key_tiles(pl, bs, qp, q_log, r_ok, window, num_splits, sp, HAS_WINDOW, BLOCK_N)

        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q_rows = q_ptr + t.to(tl.int64)[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_rows, mask=r_ok[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = k_ptr + s_idx * stride_ks + kvh.to(tl.int64) * stride_kh
        v_base = v_ptr + s_idx * stride_vs + kvh.to(tl.int64) * stride_vh
        if HAS_SOFTCAP:
            cap_out = softcap * LOG2E
            qk_scale = qk_scale / softcap
        else:
            cap_out = softcap
            qk_scale = qk_scale * LOG2E

        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        for i in range(i0, tl.minimum(i1, nA)):
            acc, m_i, l_i = _attn_tile(
                acc, m_i, l_i, q, k_base, v_base, A0 + i * BLOCK_N, stride_kl, stride_vl, offs_d, d_mask, Lmax,
                a1, b0, b1, pl, bs, qp, q_log, window, qk_scale, cap_out, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N, UPCAST,
                PRECISION,
            )
        for i in range(tl.maximum(i0, nA), i1):
            acc, m_i, l_i = _attn_tile(
                acc, m_i, l_i, q, k_base, v_base, B0 + (i - nA) * BLOCK_N, stride_kl, stride_vl, offs_d, d_mask,
                Lmax, a1, b0, b1, pl, bs, qp, q_log, window, qk_scale, cap_out, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N,
                UPCAST, PRECISION,
            )
        _store_rows(
            acc, m_i, l_i, t, h, r_ok, offs_d, d_mask, o_ptr, lse_ptr, po_ptr, pm_ptr, pl_ptr, sp, T, Hq, D,
            stride_ot, stride_oh, SPLIT, RETURN_LSE,
        )

    @triton.jit(do_not_specialize=["T", "num_splits"])
    def _branch_merge_kernel(
        po_ptr, pm_ptr, pl_ptr, o_ptr, lse_ptr, T, Hq, D, num_splits, stride_ot, stride_oh,
        RETURN_LSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        LN2: tl.constexpr = 0.6931471805599453
        t = tl.program_id(0)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = offs_h < Hq
        offs_d = tl.arange(0, BLOCK_D)
        mask = h_ok[:, None] & (offs_d < D)[None, :]
        m_max = tl.full([BLOCK_H], -1.0e30, tl.float32)
        for sp in range(0, num_splits):
            row = (sp * T + t).to(tl.int64) * Hq + offs_h
            m_max = tl.maximum(m_max, tl.load(pm_ptr + row, mask=h_ok, other=-1.0e30))
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        l = tl.zeros([BLOCK_H], tl.float32)
        for sp in range(0, num_splits):
            row = (sp * T + t).to(tl.int64) * Hq + offs_h
            w = tl.exp2(tl.load(pm_ptr + row, mask=h_ok, other=-1.0e30) - m_max)
            l += w * tl.load(pl_ptr + row, mask=h_ok, other=0.0)
            part = tl.load(po_ptr + row[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
            acc += part * w[:, None]
        l_safe = tl.where(h_ok, l, 1.0)
        o = acc / l_safe[:, None]
        o_rows = o_ptr + t.to(tl.int64) * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_rows, o.to(o_ptr.dtype.element_ty), mask=mask)
        if RETURN_LSE:
            tl.store(lse_ptr + t.to(tl.int64) * Hq + offs_h, (m_max + tl.log2(l_safe)) * LN2, mask=h_ok)


@dataclass(frozen=True)
class BranchAttentionConfig:
    """Tile sizes. ``block_r`` rows = (query, q head) pairs per program."""

    block_r: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None


@dataclass(frozen=True)
class BranchAttentionPlan:
    """Host-side block table for one set of packed queries (reusable across layers).

    Build it once per verify forward with :func:`plan_branch_attention` and pass
    it as ``plan=`` to every layer's :func:`branch_attention` call: the launch
    then needs no device->host sync.
    """

    num_tokens: int
    group: int
    block_r: int
    order: torch.Tensor  # [T] int32: token indices sorted by slot (stable)
    blk_start: torch.Tensor  # [NB] int32: first position in `order` of each block
    blk_count: torch.Tensor  # [NB] int32: queries in each block
    # host copies per block, to size the key splits
    blk_min_qlog: np.ndarray
    blk_max_pl: np.ndarray
    blk_min_bs: np.ndarray
    blk_max_qp: np.ndarray

    @property
    def num_blocks(self) -> int:
        return int(self.blk_start.shape[0])

    def max_tiles(self, block_n: int, window: int) -> int:
        """Largest number of key tiles any block visits (upper bound)."""
        pl, bs, qp = self.blk_max_pl, self.blk_min_bs, self.blk_max_qp
        a0 = np.maximum(self.blk_min_qlog - window + 1, 0) if window > 0 else np.zeros_like(pl)
        n_a = np.where(pl > a0, (pl - (a0 // block_n) * block_n + block_n - 1) // block_n, 0)
        n_b = (qp + 1 - (bs // block_n) * block_n + block_n - 1) // block_n
        return int((n_a + n_b).max()) if len(pl) else 0


def _default_config(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> BranchAttentionConfig:
    if device.type != "cuda" or _interpreting():
        return BranchAttentionConfig(block_r=64, block_n=64, num_warps=4, num_stages=1)
    # GPU: all of these compile for sm_90 without register spills (benchmarks/compile_check.py).
    if dtype == torch.float32:  # "ieee" fp32 dots run on FMA units: small tiles
        return BranchAttentionConfig(block_r=16, block_n=64 if head_dim <= 128 else 32, num_warps=8, num_stages=1)
    if head_dim <= 64:
        return BranchAttentionConfig(block_r=64, block_n=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return BranchAttentionConfig(block_r=64, block_n=64, num_warps=4, num_stages=2)
    return BranchAttentionConfig(block_r=64, block_n=32, num_warps=8, num_stages=2)


def _check_softcap(softcap) -> float:
    """``softcap`` as a float, 0.0 when off (None or 0); refuses a negative, non-finite or non-number."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be None, 0 (off) or a positive finite number, got {softcap!r}")
    return float(softcap)


def _check_inputs(q, k_cache, v_cache, slot, qpos, prefix_len, branch_start, scale, window) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("slot", slot), ("qpos", qpos),
                    ("prefix_len", prefix_len), ("branch_start", branch_start)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [S, Hkv, Lmax, D], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    t_, hq, d = q.shape
    s_, hkv, lmax, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"head_dim mismatch: q has D={d}, k_cache has D={dk}")
    if d < 1 or d > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{_MAX_HEAD_DIM}, got {d}")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv})")
    if s_ < 1 or lmax < 1:
        raise ValueError(f"empty cache: shape {tuple(k_cache.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q dtype {q.dtype} unsupported (float32, float16, bfloat16)")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache/v_cache dtypes ({k_cache.dtype}, {v_cache.dtype}) must equal q's ({q.dtype})")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("slot", slot), ("qpos", qpos),
                    ("prefix_len", prefix_len), ("branch_start", branch_start)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last (head_dim) dimension")
    for name, t in (("slot", slot), ("qpos", qpos), ("prefix_len", prefix_len), ("branch_start", branch_start)):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != t_:
            raise ValueError(f"{name} must be [T={t_}], got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 = no window), got {window!r}")
    if q.device.type == "cpu" and not _interpreting():
        raise ValueError(
            "tensors are on the CPU but Triton is not in interpreter mode: set TRITON_INTERPRET=1 before "
            "importing specem_fast.kernels, or use branch_attention_reference on CPU"
        )


def check_branch_after_prefix(prefix_len: np.ndarray, branch_start: np.ndarray) -> None:
    """Refuse a branch that starts inside its own prefix (``branch_start < prefix_len``).

    Keys in ``[branch_start, prefix_len)`` would be both prefix and branch: the
    one-pass kernel sees them once, the cascade (prefix and branch computed
    apart) twice, and a sliding window would measure them on two positions.
    Host arrays (values already read back by the plan builders).
    """
    bad = np.nonzero(branch_start < prefix_len)[0]
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"need prefix_len <= branch_start (a branch starts at or after its prefix): token {i} has "
            f"prefix_len={prefix_len[i]} branch_start={branch_start[i]}"
        )


def index_values_on_host(q, k_cache, slot, qpos, prefix_len, branch_start) -> np.ndarray:
    """Check a plan's tensor arguments and read their index values back ([4, T] int64; one sync)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError("q must be a [T, Hq, D] tensor")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError("k_cache must be a [S, Hkv, Lmax, D] tensor")
    for name, t in (("slot", slot), ("qpos", qpos), ("prefix_len", prefix_len), ("branch_start", branch_start)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _INDEX_DTYPES or t.shape != (q.shape[0],):
            raise ValueError(f"{name} must be an int32/int64 tensor of shape [T={q.shape[0]}]")
    return torch.stack([slot.long(), qpos.long(), prefix_len.long(), branch_start.long()]).cpu().numpy()


def plan_branch_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    slot: torch.Tensor,
    qpos: torch.Tensor,
    prefix_len: torch.Tensor,
    branch_start: torch.Tensor,
    *,
    block_r: int | None = None,
) -> BranchAttentionPlan:
    """Group queries by slot into blocks and check index values (one sync).

    Only q's and k_cache's shapes are used, so one plan serves every layer.
    Where the index values are known on the host (the engine builds them
    there), :func:`plan_branch_attention_host` makes the same plan without the
    sync.
    """
    idx = index_values_on_host(q, k_cache, slot, qpos, prefix_len, branch_start)
    return plan_branch_attention_host(*idx, num_heads=q.shape[1], k_shape=tuple(k_cache.shape), dtype=q.dtype,
                                      device=q.device, block_r=block_r)


def _check_index_values(sl, qp, pl, bs, s_: int, lmax: int) -> None:
    """Out-of-range indices would read or write outside the cache: refuse them on the host."""
    if sl.min() < 0 or sl.max() >= s_:
        raise ValueError(f"slot values must lie in [0, S={s_}), got {sl.min()}..{sl.max()}")
    if pl.min() < 0 or pl.max() > lmax:
        raise ValueError(f"prefix_len must lie in [0, Lmax={lmax}], got {pl.min()}..{pl.max()}")
    if qp.max() >= lmax:
        raise ValueError(f"qpos must be < Lmax={lmax}, got max {qp.max()}")
    bad = np.nonzero((bs < 0) | (bs > qp))[0]
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"need 0 <= branch_start <= qpos: token {i} has branch_start={bs[i]} qpos={qp[i]}")
    check_branch_after_prefix(pl, bs)


def _slot_blocks(sorted_slots, per_block: int) -> tuple[list[int], list[int]]:
    """(start, count) of each block: runs of one slot, cut every ``per_block`` queries,
    so no block mixes two slots' caches."""
    t_ = len(sorted_slots)
    starts, counts = [], []
    i = 0
    while i < t_:
        j = i
        while j < t_ and sorted_slots[j] == sorted_slots[i]:
            j += 1
        for s in range(i, j, per_block):
            starts.append(s)
            counts.append(min(per_block, j - s))
        i = j
    return starts, counts


def plan_branch_attention_host(
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
) -> BranchAttentionPlan:
    """:func:`plan_branch_attention` from host-side index values (sequences of ints).

    The FlashInfer plan/run split: the engine knows where every token goes
    before the forward, so the plan costs no device->host read; ``k_shape`` is
    the cache's ``[S, Hkv, Lmax, D]``.
    """
    sl, qp, pl, bs = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (slot, qpos, prefix_len, branch_start))
    t_ = len(sl)
    if not len(qp) == len(pl) == len(bs) == t_:
        raise ValueError("slot, qpos, prefix_len and branch_start must have one entry per query token")
    s_, hkv, lmax, d = k_shape
    if hkv < 1 or num_heads % hkv:
        raise ValueError(f"q heads ({num_heads}) must be a multiple of kv heads ({hkv})")
    group = num_heads // hkv
    if block_r is None:
        block_r = _default_config(d, torch.device(device), dtype).block_r
    block_r = max(block_r, _next_pow2(group), 16)
    if t_:
        _check_index_values(sl, qp, pl, bs, s_, lmax)
    order = np.argsort(sl, kind="stable")
    starts, counts = _slot_blocks(sl[order], max(1, block_r // group))
    qlog = pl + (qp - bs)
    mins = lambda a: np.array([a[order[s : s + c]].min() for s, c in zip(starts, counts)], dtype=np.int64)  # noqa: E731
    maxs = lambda a: np.array([a[order[s : s + c]].max() for s, c in zip(starts, counts)], dtype=np.int64)  # noqa: E731
    # one host->device copy for the three index arrays
    packed = torch.from_numpy(np.concatenate([order, starts, counts]).astype(np.int32)).to(device)
    nb = len(starts)
    return BranchAttentionPlan(
        num_tokens=t_, group=group, block_r=block_r,
        order=packed[:t_], blk_start=packed[t_ : t_ + nb], blk_count=packed[t_ + nb :],
        blk_min_qlog=mins(qlog), blk_max_pl=maxs(pl), blk_min_bs=mins(bs), blk_max_qp=maxs(qp),
    )


def _outputs(q: torch.Tensor, out: torch.Tensor | None, return_lse: bool):
    """(out, lse or None): the caller's ``out`` is checked, as the kernel writes it by raw strides."""
    t_, hq, _ = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
          or out.device != q.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    lse = torch.empty((t_, hq), dtype=torch.float32, device=q.device) if return_lse else None
    return out, lse


def _num_key_splits(cfg: BranchAttentionConfig, plan: BranchAttentionPlan, window: int, hkv: int,
                    device: torch.device) -> int:
    """Enough key splits to fill the GPU twice over, but never under 4 key tiles each."""
    max_tiles = plan.max_tiles(cfg.block_n, window)
    if cfg.num_splits:
        splits = cfg.num_splits
    else:
        want = _cdiv(2 * _num_sms(device), plan.num_blocks * hkv)
        splits = min(want, max(1, max_tiles // 4))
    return max(1, min(splits, max(1, max_tiles)))


def _split_partials(shape: tuple[int, int, int], d: int, device: torch.device):
    """(partial out, max, sum-exp) buffers of the split pass; NaN-filled when tests poison scratch."""
    fill = torch.full if POISON_SCRATCH else (lambda s, v, **kw: torch.empty(s, **kw))
    po = fill(shape + (d,), float("nan"), dtype=torch.float32, device=device)
    pm = fill(shape, float("nan"), dtype=torch.float32, device=device)
    pl = fill(shape, float("nan"), dtype=torch.float32, device=device)
    return po, pm, pl


def _checked_plan(plan, q, k_cache, slot, qpos, prefix_len, branch_start, block_r: int, group: int
                  ) -> BranchAttentionPlan:
    """The caller's plan, once it fits these inputs, or a new one (one sync)."""
    if plan is None:
        plan = plan_branch_attention(q, k_cache, slot, qpos, prefix_len, branch_start, block_r=block_r)
    elif not isinstance(plan, BranchAttentionPlan) or plan.num_tokens != q.shape[0] or plan.group != group:
        raise ValueError("plan does not match these inputs (token count or GQA group differ): rebuild it")
    if plan.order.device != q.device:
        raise ValueError(f"plan is on {plan.order.device} but q is on {q.device}")
    return plan


def _launch_merge(po, pm, pl, out: torch.Tensor, lse_arg: torch.Tensor, splits: int, block_d: int,
                  return_lse: bool) -> None:
    """Combine the split partials by log-sum-exp; heads per program capped to bound registers."""
    t_, hq, d = out.shape
    block_h = max(1, min(_next_pow2(hq), 2048 // block_d))
    _branch_merge_kernel[(t_, _cdiv(hq, block_h))](
        po, pm, pl, out, lse_arg, t_, hq, d, splits, out.stride(0), out.stride(1),
        RETURN_LSE=return_lse, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )


def branch_attention(
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
    plan: BranchAttentionPlan | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    config: BranchAttentionConfig | None = None,
    precision: str | None = None,
    softcap: float | None = None,
):
    """Attention of packed query tokens over a slotted KV cache (Triton).

    Same contract as :func:`~specem_fast.kernels.reference.branch_attention_reference`,
    except that a branch starting inside its prefix (``branch_start < prefix_len``)
    is refused with a ValueError, as :func:`~specem_fast.kernels.cascade.cascade_attention`
    refuses it (checked with the other index values when the plan is built).
    ``plan`` (from :func:`plan_branch_attention` on the same index tensors)
    avoids rebuilding the block table (and its device->host sync) per layer.
    ``return_lse=True`` returns ``(out, lse)`` with ``lse`` [T, Hq] fp32
    (natural log). ``out`` optionally supplies the [T, Hq, D] contiguous output.
    ``softcap`` (None or 0 = off): attention logit soft-capping, as in the reference.
    """
    require_triton("branch_attention_reference")
    _check_inputs(q, k_cache, v_cache, slot, qpos, prefix_len, branch_start, scale, window)
    cap = _check_softcap(softcap)
    t_, hq, d = q.shape
    s_, hkv, lmax, _ = k_cache.shape
    group = hq // hkv
    out, lse = _outputs(q, out, return_lse)
    if t_ == 0:
        return (out, lse) if return_lse else out
    cfg = config or _default_config(d, q.device, q.dtype)
    plan = _checked_plan(plan, q, k_cache, slot, qpos, prefix_len, branch_start, cfg.block_r, group)
    block_d = max(16, _next_pow2(d))
    splits = _num_key_splits(cfg, plan, window, hkv, q.device)
    split = splits > 1
    po, pm, pl = _split_partials((splits, t_, hq), d, q.device) if split else (out, out, out)  # unused unless split
    lse_arg = lse if lse is not None else out
    _branch_attn_kernel[(plan.num_blocks, hkv, splits)](
        q, k_cache, v_cache, out, lse_arg, po, pm, pl,
        plan.order, plan.blk_start, plan.blk_count, slot, qpos, prefix_len, branch_start,
        float(scale), cap, int(window), t_, hq, lmax, d, splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_R=plan.block_r, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        HAS_WINDOW=window > 0, HAS_SOFTCAP=cap > 0, SPLIT=split, RETURN_LSE=return_lse,
        UPCAST=_interpreting(), PRECISION=_precision(q.dtype, precision),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split:
        _launch_merge(po, pm, pl, out, lse_arg, splits, block_d, return_lse)
    return (out, lse) if return_lse else out
