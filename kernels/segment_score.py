"""Fused segment log-prob scoring (Triton).

For every packed candidate token i, with hidden state ``h_i`` and target
``t_i``, computes ``z = h_i @ W.T`` (optionally soft-capped), the target logit
``z[t_i]`` and ``log p = z[t_i] - logsumexp(z)``, then the per-candidate means.
The matmul with the LM head runs inside the kernel, tiled over tokens x vocab,
with an online log-sum-exp: the [N, V] logits never exist in memory.

Design (after apple/ml-cross-entropy):

* ``_score_kernel``: grid = token blocks x vocab splits, token block fastest so
  the programs that read the same slice of W run together and share it in L2.
  Each program loops over its vocab tiles, and per tile over d in BLOCK_D
  chunks (``tl.dot``, fp32 accumulation), then folds the tile into a running
  (max, sum-exp) per row and picks out the target logit when the target falls
  in the tile. It writes one partial (max, sum) per row and split, and the
  target logit directly (exactly one split owns each target).
* ``_merge_kernel``: one program per candidate merges the split partials into
  the log-sum-exp, writes the per-token log-prob and the candidate means.

Small N is memory bound (W is read once: the split count spreads the vocab
over all SMs); large N is compute bound (the split count is chosen to keep
waves full). ``segment_score_grouped`` runs the same tile body for several
(hidden, weight) problems -- the verifiers of one round -- in ONE launch over
a small device table of pointers and sizes, plus one merge launch.

Inputs are fp32 / fp16 / bf16 (hidden and weight the same dtype); accumulation
is fp32; outputs are fp32. Under the Triton interpreter (CPU) operands are
upcast to fp32 before ``tl.dot`` (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .reference import SegmentScores

from ._triton import HAS_TRITON, cdiv as _cdiv, interpreting as _interpreting, next_pow2 as _next_pow2, require_triton, tl, triton
from ._triton import num_sms as _num_sms

__all__ = ["HAS_TRITON", "SegmentScoreConfig", "segment_score", "segment_score_grouped"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)

# Tests set this to True: scratch buffers are then filled with NaN so that a
# partial result the kernel forgot to write shows up as a NaN in the output.
POISON_SCRATCH = False


# --------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        # Overflow-safe tanh from exp (portable: interpreter and GPU).
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x >= 0, t, -t)

    @triton.jit
    def _score_tile(
        h_ptr, w_ptr, tgt_ptr, logit_ptr, pm_ptr, ps_ptr,
        N, D, V, stride_hn, stride_wv, softcap,
        pid_n, pid_s, v_tiles_per_split,
        HAS_CAP: tl.constexpr, DYN_CAP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        LOG2E: tl.constexpr = 1.4426950408889634
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        # A target outside [0, V) (possible only with check_values=False) matches
        # no vocab tile; split 0 then owns it and writes NaN (checked before the
        # int32 cast, so a huge int64 target cannot wrap into range).
        tgt = tl.load(tgt_ptr + offs_n, mask=n_mask, other=-1)
        tgt = tl.where((tgt < 0) | (tgt >= V), -1, tgt).to(tl.int32)
        v_begin = pid_s * v_tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + v_tiles_per_split * BLOCK_V, V)

        h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
        m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s_i = tl.zeros([BLOCK_N], tl.float32)
        z_t = tl.zeros([BLOCK_N], tl.float32)
        for v0 in range(v_begin, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_mask = offs_v < v_end
            w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for k0 in range(0, D, BLOCK_D):
                offs_d = k0 + tl.arange(0, BLOCK_D)
                if EVEN_D:
                    h = tl.load(h_rows + offs_d[None, :], mask=n_mask[:, None], other=0.0)
                    w = tl.load(w_rows + offs_d[None, :], mask=v_mask[:, None], other=0.0)
                else:
                    d_mask = offs_d < D
                    h = tl.load(h_rows + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                    w = tl.load(w_rows + offs_d[None, :], mask=v_mask[:, None] & d_mask[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
            if HAS_CAP:
                if DYN_CAP:  # per-problem cap (grouped launch): a uniform runtime branch
                    if softcap > 0.0:
                        acc = softcap * _tanh(acc / softcap)
                else:
                    acc = softcap * _tanh(acc / softcap)
            z_t += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], acc, 0.0), axis=1)
            acc = tl.where(v_mask[None, :], acc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(acc, axis=1))
            s_i = s_i * tl.exp2((m_i - m_new) * LOG2E) + tl.sum(tl.exp2((acc - m_new[:, None]) * LOG2E), axis=1)
            m_i = m_new
        part = pid_s.to(tl.int64) * N + offs_n
        tl.store(pm_ptr + part, m_i, mask=n_mask)
        tl.store(ps_ptr + part, s_i, mask=n_mask)
        bad_tgt = tgt < 0  # only out-of-range targets are -1 here
        owns = n_mask & (((tgt >= v_begin) & (tgt < v_end)) | (bad_tgt & (pid_s == 0)))
        tl.store(logit_ptr + offs_n, tl.where(bad_tgt, float("nan"), z_t), mask=owns)

    @triton.jit(do_not_specialize=["N", "softcap", "num_n_blocks", "v_tiles_per_split"])
    def _score_kernel(
        h_ptr, w_ptr, tgt_ptr, logit_ptr, pm_ptr, ps_ptr,
        N, D, V, stride_hn, stride_wv, softcap, num_n_blocks, v_tiles_per_split,
        HAS_CAP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_n = pid % num_n_blocks
        pid_s = pid // num_n_blocks
        _score_tile(
            h_ptr, w_ptr, tgt_ptr, logit_ptr, pm_ptr, ps_ptr,
            N, D, V, stride_hn, stride_wv, softcap, pid_n, pid_s, v_tiles_per_split,
            HAS_CAP, False, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, UPCAST, PRECISION,
        )

    @triton.jit
    def _merge_segment(
        pm_ptr, ps_ptr, logit_ptr, lp_ptr, mean_lp_ptr, mean_lg_ptr, off_ptr,
        seg, num_segs, N, num_splits,
        BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        LN2: tl.constexpr = 0.6931471805599453
        LOG2E: tl.constexpr = 1.4426950408889634
        # Offsets are clamped to [0, N] (no out-of-bounds access even when they
        # were not checked). Tokens are written over [lo, hi), widened to start
        # at 0 for the first candidate and end at N for the last, so every token
        # gets its log-prob whatever the offsets; the means use [lo, hi) only.
        lo = tl.minimum(tl.maximum(tl.load(off_ptr + seg), 0), N).to(tl.int32)
        hi = tl.minimum(tl.maximum(tl.load(off_ptr + seg + 1), 0), N).to(tl.int32)
        w_lo = tl.where(seg == 0, 0, lo)
        w_hi = tl.where(seg == num_segs - 1, N, hi)
        sum_lp = tl.zeros([BLOCK_T], tl.float32)
        sum_lg = tl.zeros([BLOCK_T], tl.float32)
        offs_s = tl.arange(0, BLOCK_S)
        for t0 in range(w_lo, w_hi, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_mask = offs_t < w_hi
            # Running merge over the split axis, BLOCK_S splits at a time: the
            # running sum is rescaled whenever a later chunk raises the max.
            m_run = tl.full([BLOCK_T], float("-inf"), tl.float32)
            s_run = tl.zeros([BLOCK_T], tl.float32)
            for s0 in range(0, num_splits, BLOCK_S):
                sp = s0 + offs_s
                msk = (sp < num_splits)[:, None] & t_mask[None, :]
                idx = sp.to(tl.int64)[:, None] * N + offs_t[None, :]
                pm = tl.load(pm_ptr + idx, mask=msk, other=float("-inf"))
                ps = tl.load(ps_ptr + idx, mask=msk, other=0.0)
                m_new = tl.maximum(m_run, tl.max(pm, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s_run = s_run * tl.exp2((m_run - m_safe) * LOG2E) + tl.sum(
                    ps * tl.exp2((pm - m_safe[None, :]) * LOG2E), axis=0
                )
                m_run = m_new
            lse = m_run + tl.log2(tl.where(t_mask, s_run, 1.0)) * LN2
            zt = tl.load(logit_ptr + offs_t, mask=t_mask, other=0.0)
            lp = zt - lse
            tl.store(lp_ptr + offs_t, lp, mask=t_mask)
            in_seg = t_mask & (offs_t >= lo) & (offs_t < hi)
            sum_lp += tl.where(in_seg, lp, 0.0)
            sum_lg += tl.where(in_seg, zt, 0.0)
        # An empty (or reversed) candidate gets NaN means, not 0/0 or -0.
        cnt = tl.maximum(hi - lo, 0).to(tl.float32)
        empty = cnt == 0.0
        cnt_safe = tl.where(empty, 1.0, cnt)
        tl.store(mean_lp_ptr + seg, tl.where(empty, float("nan"), tl.sum(sum_lp, axis=0) / cnt_safe))
        tl.store(mean_lg_ptr + seg, tl.where(empty, float("nan"), tl.sum(sum_lg, axis=0) / cnt_safe))

    @triton.jit(do_not_specialize=["N", "num_splits"])
    def _merge_kernel(
        pm_ptr, ps_ptr, logit_ptr, lp_ptr, mean_lp_ptr, mean_lg_ptr, off_ptr,
        N, num_splits,
        BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        seg = tl.program_id(0)
        _merge_segment(pm_ptr, ps_ptr, logit_ptr, lp_ptr, mean_lp_ptr, mean_lg_ptr, off_ptr,
                       seg, tl.num_programs(0), N, num_splits, BLOCK_T, BLOCK_S)

    # ---- grouped (several problems, one launch) ----------------------------
    # Table row layout (int64), see _GROUP_FIELDS below.

    @triton.jit
    def _find_group(starts_ptr, pid, G, BLOCK_G: tl.constexpr):
        # starts[g] = first program of problem g (non-decreasing); returns g.
        offs = tl.arange(0, BLOCK_G)
        st = tl.load(starts_ptr + offs, mask=offs < G, other=2147483647)
        return tl.sum((st <= pid).to(tl.int32), axis=0) - 1

    @triton.jit
    def _score_grouped_kernel(
        tab_ptr, cap_ptr, starts_ptr, h_dtype_ptr, tgt_dtype_ptr, G,
        HAS_CAP: tl.constexpr, NF: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
        ALIGNED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        g = _find_group(starts_ptr, pid, G, BLOCK_G)
        row = tab_ptr + g * NF
        local = pid - tl.load(starts_ptr + g).to(tl.int32)
        h_ptr = tl.load(row + 0).to(h_dtype_ptr.dtype, bitcast=True)
        w_ptr = tl.load(row + 1).to(h_dtype_ptr.dtype, bitcast=True)
        tgt_ptr = tl.load(row + 2).to(tgt_dtype_ptr.dtype, bitcast=True)
        logit_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32), bitcast=True)
        pm_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32), bitcast=True)
        ps_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32), bitcast=True)
        N = tl.load(row + 6).to(tl.int32)
        D = tl.load(row + 7).to(tl.int32)
        V = tl.load(row + 8).to(tl.int32)
        stride_hn = tl.load(row + 9)
        stride_wv = tl.load(row + 10)
        num_n_blocks = tl.load(row + 11).to(tl.int32)
        v_tiles_per_split = tl.load(row + 12).to(tl.int32)
        softcap = tl.load(cap_ptr + g)
        if ALIGNED:  # launcher checked: 16-byte aligned bases, strides multiple of 16
            h_ptr = tl.multiple_of(h_ptr, 16)
            w_ptr = tl.multiple_of(w_ptr, 16)
            stride_hn = tl.multiple_of(stride_hn, 16)
            stride_wv = tl.multiple_of(stride_wv, 16)
        pid_n = local % num_n_blocks
        pid_s = local // num_n_blocks
        _score_tile(
            h_ptr, w_ptr, tgt_ptr, logit_ptr, pm_ptr, ps_ptr,
            N, D, V, stride_hn, stride_wv, softcap, pid_n, pid_s, v_tiles_per_split,
            HAS_CAP, True, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, UPCAST, PRECISION,
        )

    @triton.jit
    def _merge_grouped_kernel(
        tab_ptr, seg_starts_ptr, off_dtype_ptr, G,
        NF: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0)
        g = _find_group(seg_starts_ptr, pid, G, BLOCK_G)
        row = tab_ptr + g * NF
        seg = pid - tl.load(seg_starts_ptr + g).to(tl.int32)
        f32p = tl.pointer_type(tl.float32)
        logit_ptr = tl.load(row + 3).to(f32p, bitcast=True)
        pm_ptr = tl.load(row + 4).to(f32p, bitcast=True)
        ps_ptr = tl.load(row + 5).to(f32p, bitcast=True)
        N = tl.load(row + 6).to(tl.int32)
        num_splits = tl.load(row + 13).to(tl.int32)
        lp_ptr = tl.load(row + 14).to(f32p, bitcast=True)
        mean_lp_ptr = tl.load(row + 15).to(f32p, bitcast=True)
        mean_lg_ptr = tl.load(row + 16).to(f32p, bitcast=True)
        off_ptr = tl.load(row + 17).to(off_dtype_ptr.dtype, bitcast=True)
        num_segs = tl.load(row + 18).to(tl.int32)
        _merge_segment(pm_ptr, ps_ptr, logit_ptr, lp_ptr, mean_lp_ptr, mean_lg_ptr, off_ptr,
                       seg, num_segs, N, num_splits, BLOCK_T, BLOCK_S)


_GROUP_FIELDS = 19  # h, w, tgt, logit, pm, ps, N, D, V, s_hn, s_wv, n_blocks, vt/split, splits, lp, mean_lp, mean_lg,
#                     offsets, C

# Split partials merged per step of the merge kernel (its BLOCK_S), the same
# under the interpreter as on the GPU so that CPU tests cover the multi-step
# merge (more than this many splits, e.g. the default at small N on 132 SMs).
_MERGE_CHUNK = 32


# --------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentScoreConfig:
    """Tile sizes and launch options. ``num_splits=None`` picks the vocab split count."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int | None = None


def _default_config(n: int, d: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> SegmentScoreConfig:
    if device.type != "cuda" or _interpreting():
        # Interpreter: few, large blocks (per-op overhead dominates).
        return SegmentScoreConfig(
            block_n=min(max(_next_pow2(n), 16), 64), block_v=256, block_d=min(max(_next_pow2(d), 16), 128),
            num_warps=4, num_stages=1,
        )
    # GPU: all of these compile for sm_90 without register spills (benchmarks/compile_check.py).
    if dtype == torch.float32:  # fp32 "ieee" dot runs on FMA units: smaller K tile
        if n <= 16:
            cfg = SegmentScoreConfig(16, 128, 32, num_warps=4, num_stages=3)
        elif n <= 32:
            cfg = SegmentScoreConfig(32, 128, 32, num_warps=8, num_stages=3)
        else:
            cfg = SegmentScoreConfig(64, 128, 32, num_warps=8, num_stages=3)
    elif n <= 16:  # small N: memory bound, deep pipeline over W
        cfg = SegmentScoreConfig(16, 128, 64, num_warps=4, num_stages=4)
    elif n <= 32:
        cfg = SegmentScoreConfig(32, 128, 64, num_warps=8, num_stages=4)
    elif n <= 64:
        cfg = SegmentScoreConfig(64, 128, 64, num_warps=8, num_stages=4)
    else:  # compute bound: 128x128 wgmma tiles
        cfg = SegmentScoreConfig(128, 128, 64, num_warps=8, num_stages=3)
    if d % cfg.block_d:
        cfg = SegmentScoreConfig(cfg.block_n, cfg.block_v, 32, cfg.num_warps, cfg.num_stages)
    return cfg


@functools.lru_cache(maxsize=1024)
def _choose_splits(num_n_blocks: int, v_tiles: int, slots: int) -> int:
    """Vocab split count minimising the makespan ``waves * (tiles per program + overhead)``.

    ``slots`` = programs that run at once (SMs x resident programs per SM); each
    program also pays about half a tile of fixed cost (pipeline fill, partial
    write). Ties go to fewer splits (less merge work).
    """
    if slots <= 1:
        return 1
    best, best_cost = 1, None
    for splits in range(1, v_tiles + 1):
        per = _cdiv(v_tiles, splits)
        if _cdiv(v_tiles, per) != splits:  # would leave empty splits
            continue
        cost = _cdiv(num_n_blocks * splits, slots) * (per + 0.5)
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = splits, cost
    return best


def _resident(cfg: SegmentScoreConfig) -> int:
    return 2 if cfg.block_n <= 64 else 1


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _check_problem(hidden, weight, targets, offsets, softcap, where: str = "") -> None:
    p = f"{where}: " if where else ""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{p}{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"{p}hidden must be 2-D [N, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{p}weight must be 2-D [V, d], got shape {tuple(weight.shape)}")
    n, d = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"{p}hidden is [N, d={d}] but weight is {tuple(weight.shape)}: last dims must match")
    if n < 1:
        raise ValueError(f"{p}hidden has no rows (N=0)")
    if d < 1 or v < 1:
        raise ValueError(f"{p}empty hidden size or vocabulary: d={d}, V={v}")
    if v >= 2**31:
        raise ValueError(f"{p}vocabulary too large for int32 indices: V={v}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{p}hidden dtype {hidden.dtype} unsupported (float32, float16, bfloat16)")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{p}weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"{p}targets must be [N={n}], got shape {tuple(targets.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError(f"{p}offsets must be [C+1] with C >= 1, got shape {tuple(offsets.shape)}")
    for name, t in (("targets", targets), ("offsets", offsets)):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{p}{name} must be int32 or int64, got {t.dtype}")
    for name, t in (("weight", weight), ("targets", targets), ("offsets", offsets)):
        if t.device != hidden.device:
            raise ValueError(f"{p}{name} is on {t.device} but hidden is on {hidden.device}")
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"{p}hidden and weight need a contiguous last dimension (call .contiguous())")
    if not targets.is_contiguous() or not offsets.is_contiguous():
        raise ValueError(f"{p}targets and offsets must be contiguous")
    if softcap is not None:
        if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not math.isfinite(softcap):
            raise ValueError(f"{p}softcap must be a finite number or None, got {softcap!r}")
        if softcap < 0:
            raise ValueError(f"{p}softcap must be positive, got {softcap}")
    if hidden.device.type == "cpu" and not _interpreting():
        raise ValueError(
            f"{p}tensors are on the CPU but Triton is not in interpreter mode: set TRITON_INTERPRET=1 before "
            "importing specem_fast.kernels, or use segment_score_reference on CPU"
        )


def _check_values(targets, offsets, n: int, v: int, where: str = "") -> None:
    """Value checks of offsets and targets (one device->host sync)."""
    _check_values_many([(targets, offsets, n, v, where)])


def _check_values_many(items) -> None:
    """``items``: (targets, offsets, N, V, where) per problem; one sync for all."""
    parts = []
    for targets, offsets, _, _, _ in items:
        parts += [offsets.long(), torch.stack([targets.min(), targets.max()]).long()]
    vals = torch.cat(parts).tolist()
    at = 0
    for targets, offsets, n, v, where in items:
        p = f"{where}: " if where else ""
        k = offsets.shape[0]
        off, (lo, hi) = vals[at : at + k], vals[at + k : at + k + 2]
        at += k + 2
        if off[0] != 0 or off[-1] != n:
            raise ValueError(f"{p}offsets must start at 0 and end at N={n}, got {off[0]}..{off[-1]}")
        for c in range(len(off) - 1):
            if off[c + 1] <= off[c]:
                raise ValueError(
                    f"{p}candidate {c} is empty or offsets decrease (offsets[{c}:{c + 2}]={off[c:c + 2]})")
        if lo < 0 or hi >= v:
            raise ValueError(f"{p}targets must lie in [0, V={v}), got min {lo} max {hi}")


def _check_out(out, n: int, c: int, device) -> SegmentScores:
    if out is None:
        return SegmentScores(
            torch.empty(n, dtype=torch.float32, device=device),
            torch.empty(n, dtype=torch.float32, device=device),
            torch.empty(c, dtype=torch.float32, device=device),
            torch.empty(c, dtype=torch.float32, device=device),
        )
    if len(out) != 4:
        raise ValueError("out must be 4 tensors (token_logprob, token_logit, mean_logprob, mean_logit)")
    for t, size, name in zip(out, (n, n, c, c), SegmentScores._fields):
        if not isinstance(t, torch.Tensor) or t.shape != (size,) or t.dtype != torch.float32:
            raise ValueError(f"out.{name} must be a float32 tensor of shape ({size},)")
        if t.device != torch.device(device) or not t.is_contiguous():
            raise ValueError(f"out.{name} must be contiguous on {device}")
    return SegmentScores(*out)


def _scratch(shape, device) -> torch.Tensor:
    if POISON_SCRATCH:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _precision(dtype: torch.dtype, precision: str | None) -> str:
    if precision is None:
        return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is moot for fp16/bf16
    if precision not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"precision must be 'ieee', 'tf32' or 'tf32x3', got {precision!r}")
    return precision


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


def _split_plan(cfg: SegmentScoreConfig, n: int, v: int, slots: int) -> tuple[int, int, int]:
    """(token blocks, vocab tiles per split, splits), with no split left empty."""
    num_n = _cdiv(n, cfg.block_n)
    v_tiles = _cdiv(v, cfg.block_v)
    splits = cfg.num_splits or _choose_splits(num_n, v_tiles, slots)
    splits = max(1, min(splits, v_tiles))
    per = _cdiv(v_tiles, splits)
    return num_n, per, _cdiv(v_tiles, per)


def segment_score(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    offsets: torch.Tensor,
    softcap: float | None = None,
    *,
    out: Sequence[torch.Tensor] | None = None,
    config: SegmentScoreConfig | None = None,
    precision: str | None = None,
    check_values: bool = True,
) -> SegmentScores:
    """Fused LM-head scoring of packed candidates (same contract as
    :func:`~specem_fast.kernels.reference.segment_score_reference`).

    ``hidden`` [N, d] and ``weight`` [V, d] (fp32/fp16/bf16, same dtype, unit
    stride on d), ``targets`` [N] and ``offsets`` [C+1] int32/int64 on the same
    device. Returns fp32 ``SegmentScores``. ``out`` optionally supplies the four
    fp32 output tensors. ``check_values`` validates offsets/targets values
    (costs one device->host sync; the engine may turn it off). Without the
    check every output element is still written: a target outside [0, V) gives
    NaN token_logit and token_logprob (so NaN means for its candidate), an
    empty or reversed candidate NaN means; offsets are clamped to [0, N] and
    every token's log-prob is written even when they do not cover [0, N).
    ``precision`` applies to fp32 inputs on GPU ("ieee" by default, "tf32" is faster).
    """
    require_triton("segment_score_reference")
    _check_problem(hidden, weight, targets, offsets, softcap)
    n, d = hidden.shape
    v = weight.shape[0]
    c = offsets.shape[0] - 1
    if check_values:
        _check_values(targets, offsets, n, v)
    res = _check_out(out, n, c, hidden.device)
    cfg = config or _default_config(n, d, hidden.device, hidden.dtype)
    num_n, per, splits = _split_plan(cfg, n, v, _num_sms(hidden.device) * _resident(cfg))
    pm = _scratch((splits, n), hidden.device)
    ps = _scratch((splits, n), hidden.device)
    upcast = _interpreting()
    prec = _precision(hidden.dtype, precision)
    _score_kernel[(num_n * splits,)](
        hidden, weight, targets, res.token_logit, pm, ps,
        n, d, v, hidden.stride(0), weight.stride(0), float(softcap or 0.0), num_n, per,
        HAS_CAP=bool(softcap), BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        EVEN_D=d % cfg.block_d == 0, UPCAST=upcast, PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    block_t = 16 if n <= 1024 else 64
    block_s = min(_next_pow2(splits), _MERGE_CHUNK)
    _merge_kernel[(c,)](
        pm, ps, res.token_logit, res.token_logprob, res.mean_logprob, res.mean_logit, offsets,
        n, splits, BLOCK_T=block_t, BLOCK_S=block_s, num_warps=4,
    )
    return res


def segment_score_grouped(
    problems: Sequence[tuple],
    *,
    config: SegmentScoreConfig | None = None,
    precision: str | None = None,
    check_values: bool = True,
) -> list[SegmentScores]:
    """Score several verifiers' candidates in one launch (+ one merge launch).

    ``problems`` is a list of ``(hidden, weight, targets, offsets, softcap)``
    (softcap may be None), each as for :func:`segment_score`; different d, V and
    N are fine. Problems whose hidden dtype (or targets/offsets dtype) differ
    are launched as separate groups. Returns one ``SegmentScores`` per problem,
    in order.
    """
    require_triton("segment_score_reference")
    if not isinstance(problems, (list, tuple)) or len(problems) == 0:
        raise ValueError("problems must be a non-empty list of (hidden, weight, targets, offsets, softcap)")
    probs = []
    for i, pr in enumerate(problems):
        if not isinstance(pr, (list, tuple)) or len(pr) not in (4, 5):
            raise ValueError(f"problem {i}: expected (hidden, weight, targets, offsets[, softcap])")
        h, w, t, o = pr[:4]
        cap = pr[4] if len(pr) == 5 else None
        _check_problem(h, w, t, o, cap, where=f"problem {i}")
        if h.device != problems[0][0].device:
            raise ValueError(f"problem {i}: on {h.device}, problem 0 on {problems[0][0].device}")
        probs.append((h, w, t, o, cap))
    if check_values:
        _check_values_many([(t, o, h.shape[0], w.shape[0], f"problem {i}") for i, (h, w, t, o, _) in enumerate(probs)])

    results: list[SegmentScores | None] = [None] * len(probs)
    groups: dict[tuple, list[int]] = {}
    for i, (h, w, t, o, cap) in enumerate(probs):
        groups.setdefault((h.dtype, t.dtype, o.dtype), []).append(i)
    for idx in groups.values():
        _launch_group([probs[i] for i in idx], idx, results, config, precision)
    return results  # type: ignore[return-value]


def _group_table(probs, cfg: SegmentScoreConfig, slots: int, tok: torch.Tensor, seg: torch.Tensor):
    """Everything the two grouped launches need, laid out in one pass.

    Returns the table rows (see ``_GROUP_FIELDS``), the caps, the first program
    then the first candidate of each problem, the scratch buffer the rows point
    into, the program and candidate totals, and the largest split count.
    """
    plan = []
    scratch_len = 0
    for h, w, *_ in probs:
        # Splits chosen per problem as if alone: the grouped launch then has
        # (roughly) the sum of the problems' waves, with one tail instead of G.
        num_n, per, splits = _split_plan(cfg, h.shape[0], w.shape[0], slots)
        plan.append((num_n, per, splits, scratch_len))
        scratch_len += splits * h.shape[0]
    scratch = _scratch((2, scratch_len), tok.device)
    n_tot, c_tot = tok.shape[1], seg.shape[1]
    rows, caps, starts, seg_starts = [], [], [], []
    tok_at = seg_at = prog = segs = 0
    f32 = 4
    for (h, w, t, o, cap), (num_n, per, splits, s_at) in zip(probs, plan):
        n, d, v, c = h.shape[0], h.shape[1], w.shape[0], o.shape[0] - 1
        rows.append([
            h.data_ptr(), w.data_ptr(), t.data_ptr(),
            tok.data_ptr() + f32 * (n_tot + tok_at),  # token_logit
            scratch.data_ptr() + f32 * s_at,  # pm
            scratch.data_ptr() + f32 * (scratch_len + s_at),  # ps
            n, d, v, h.stride(0), w.stride(0), num_n, per, splits,
            tok.data_ptr() + f32 * tok_at,  # token_logprob
            seg.data_ptr() + f32 * seg_at,  # mean_logprob
            seg.data_ptr() + f32 * (c_tot + seg_at),  # mean_logit
            o.data_ptr(), c,
        ])
        caps.append(float(cap or 0.0))
        starts.append(prog)
        seg_starts.append(segs)
        prog += num_n * splits
        segs += c
        tok_at += n
        seg_at += c
    return rows, caps, starts + seg_starts, scratch, prog, segs, max(p[2] for p in plan)


def _scatter_results(probs, idx, results, tok: torch.Tensor, seg: torch.Tensor) -> None:
    """Views into the shared output buffers, one ``SegmentScores`` per problem."""
    tok_at = seg_at = 0
    for i, (h, w, t, o, cap) in zip(idx, probs):
        n, c = h.shape[0], o.shape[0] - 1
        results[i] = SegmentScores(
            tok[0, tok_at : tok_at + n], tok[1, tok_at : tok_at + n],
            seg[0, seg_at : seg_at + c], seg[1, seg_at : seg_at + c],
        )
        tok_at += n
        seg_at += c


def _launch_group(probs, idx, results, config, precision) -> None:
    device = probs[0][0].device
    n_max = max(p[0].shape[0] for p in probs)
    d_max = max(p[0].shape[1] for p in probs)
    cfg = config or _default_config(n_max, d_max, device, probs[0][0].dtype)
    slots = _num_sms(device) * _resident(cfg)
    n_tot = sum(p[0].shape[0] for p in probs)
    c_tot = sum(p[3].shape[0] - 1 for p in probs)
    # One allocation for all outputs: [lp | logit] per token, [mean_lp | mean_lg] per candidate.
    tok = torch.empty((2, n_tot), dtype=torch.float32, device=device)
    seg = torch.empty((2, c_tot), dtype=torch.float32, device=device)
    # scratch must outlive both launches: the table holds raw pointers into it
    rows, caps, starts, scratch, prog, segs, max_splits = _group_table(probs, cfg, slots, tok, seg)
    g = len(probs)
    tab = torch.tensor(rows, dtype=torch.int64).to(device)
    cap_t = torch.tensor(caps, dtype=torch.float32).to(device)
    starts_t = torch.tensor(starts, dtype=torch.int32).to(device)
    upcast = _interpreting()
    prec = _precision(probs[0][0].dtype, precision)
    block_g = max(_next_pow2(g), 2)
    aligned = all(
        h.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0 and h.stride(0) % 16 == 0 and w.stride(0) % 16 == 0
        for h, w, *_ in probs
    )
    _score_grouped_kernel[(prog,)](
        tab, cap_t, starts_t, probs[0][0], probs[0][2], g,
        HAS_CAP=any(caps), NF=_GROUP_FIELDS, BLOCK_G=block_g,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        EVEN_D=all(p[0].shape[1] % cfg.block_d == 0 for p in probs), ALIGNED=aligned,
        UPCAST=upcast, PRECISION=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _merge_grouped_kernel[(segs,)](
        tab, starts_t[g:], probs[0][3], g,
        NF=_GROUP_FIELDS, BLOCK_G=block_g, BLOCK_T=16 if n_max <= 1024 else 64,
        BLOCK_S=min(_next_pow2(max_splits), _MERGE_CHUNK), num_warps=4,
    )
    _scatter_results(probs, idx, results, tok, seg)
