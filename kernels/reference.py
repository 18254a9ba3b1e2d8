"""Plain torch references of the verification kernels.

They define the semantics the Triton kernels must match, serve as the CPU path
of the engine and as the test oracle (run in float64 there).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class SegmentScores(NamedTuple):
    token_logprob: torch.Tensor  # [N] fp32: log p(target | context)
    token_logit: torch.Tensor  # [N] fp32: raw (soft-capped if set) logit of target
    mean_logprob: torch.Tensor  # [C] fp32: per-candidate mean of token_logprob
    mean_logit: torch.Tensor  # [C] fp32: per-candidate mean of token_logit


def segment_means(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[offsets[c]:offsets[c+1]]`` for every segment c."""
    lengths = (offsets[1:] - offsets[:-1]).to(values.dtype)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), (offsets[1:] - offsets[:-1]).long())
    sums = torch.zeros(len(lengths), dtype=values.dtype, device=values.device).index_add_(0, seg, values)
    return sums / lengths


def segment_score_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    offsets: torch.Tensor,
    softcap: float | None = None,
    *,
    chunk: int = 256,
) -> SegmentScores:
    """Score packed candidates: row i of ``hidden`` predicts ``targets[i]``.

    ``hidden`` [N, d] are final-norm hidden states, ``weight`` [V, d] the LM head,
    ``offsets`` [C+1] the candidate boundaries. Computes in fp32 (or fp64 when
    given fp64) in chunks of rows so the [N, V] logits never exist at once.
    """
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out_dtype = compute
    n = hidden.shape[0]
    logprob = torch.empty(n, dtype=out_dtype, device=hidden.device)
    logit = torch.empty(n, dtype=out_dtype, device=hidden.device)
    w = weight.to(compute)
    for s in range(0, n, chunk):
        h = hidden[s : s + chunk].to(compute)
        z = h @ w.T
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        t = targets[s : s + chunk].long().unsqueeze(1)
        zt = z.gather(1, t).squeeze(1)
        logit[s : s + chunk] = zt
        logprob[s : s + chunk] = zt - torch.logsumexp(z, dim=1)
    return SegmentScores(logprob, logit, segment_means(logprob, offsets), segment_means(logit, offsets))


def segment_score_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    offsets: torch.Tensor,
    softcap: float | None = None,
    *,
    vocab_chunk: int = 4096,
) -> SegmentScores:
    """The engine's CPU path: :func:`segment_score_reference`'s result, computed
    over vocabulary chunks with an online log-sum-exp.

    A bf16/fp16 LM head is upcast one chunk at a time into a reused fp32 buffer
    instead of all at once per call (up to 671 MB for Gemma-3's 262k vocabulary,
    mostly page faults), and the [N, V] logits never exist.
    """
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.to(compute)
    n, v = h.shape[0], weight.shape[0]
    t = targets.long()
    zt = (h * weight[t].to(compute)).sum(1)
    if softcap:
        zt = torch.tanh(zt / softcap) * softcap
    m = torch.full((n,), float("-inf"), dtype=compute, device=h.device)
    s = torch.zeros(n, dtype=compute, device=h.device)
    buf = None if weight.dtype == compute else torch.empty(min(vocab_chunk, v), weight.shape[1], dtype=compute,
                                                           device=h.device)
    for v0 in range(0, v, vocab_chunk):
        w = weight[v0 : v0 + vocab_chunk]
        if buf is not None:
            w = buf[: w.shape[0]].copy_(w)
        z = h @ w.T
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        m_new = torch.maximum(m, z.amax(1))
        s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
        m = m_new
    logprob = zt - (m + torch.log(s))
    return SegmentScores(logprob, zt, segment_means(logprob, offsets), segment_means(zt, offsets))


def visibility_mask(
    qpos: torch.Tensor,
    prefix_len: torch.Tensor,
    branch_start: torch.Tensor,
    num_keys: int,
    window: int = 0,
) -> torch.Tensor:
    """Bool [T, num_keys]: which cache positions each query may attend to.

    Query t sees keys ``j < prefix_len[t]`` (the shared prefix) and
    ``branch_start[t] <= j <= qpos[t]`` (earlier tokens of its own branch, itself
    included). Positions are physical cache slots; the logical position of a
    branch key is ``prefix_len + (j - branch_start)``, which is what a sliding
    window (``window > 0``: keep keys with qlog - klog < window) is measured on.
    """
    j = torch.arange(num_keys, device=qpos.device).unsqueeze(0)
    qp, pl, bs = qpos.unsqueeze(1), prefix_len.unsqueeze(1), branch_start.unsqueeze(1)
    in_prefix = j < pl
    in_branch = (j >= bs) & (j <= qp)
    mask = in_prefix | in_branch
    if window > 0:
        q_log = pl + (qp - bs)
        k_log = torch.where(in_prefix, j, pl + (j - bs))
        mask &= (q_log - k_log) < window
    return mask


def capped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    """Attention with logit soft-capping (Gemma-2): ``cap * tanh(scale * q.k / cap)``, then mask, softmax.

    ``q`` [B, Hq, Tq, D], ``k``/``v`` [B, Hkv, Tk, D], ``mask`` bool broadcastable to
    [B, Hq, Tq, Tk] (True = visible). SDPA has no soft-capping, so the scores are
    formed here, in float32 (float64 when given float64); the result is in q's dtype.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.to(compute)).to(q.dtype)


class ReferencePlan(NamedTuple):
    """Host-side grouping of query rows by slot for :func:`branch_attention_reference`.

    Per slot: the slot, its rows (a slice when they are contiguous, else an index
    tensor on the queries' device) and how many cache keys they can see. Built
    from host values by :func:`plan_branch_attention_reference`, it lets the
    reference run without reading indices back from the device.
    """

    groups: tuple[tuple[int, slice | torch.Tensor, int], ...]


def plan_branch_attention_reference(slot, qpos, device: torch.device | str = "cpu") -> ReferencePlan:
    """Group query tokens by slot from host values (sequences of ints); slots in ascending order."""
    rows: dict[int, list[int]] = {}
    for t, s in enumerate(slot):
        rows.setdefault(int(s), []).append(t)
    groups, scattered = [], []
    for s in sorted(rows):
        r = rows[s]
        nk = max(int(qpos[t]) for t in r) + 1
        if r[-1] - r[0] + 1 == len(r):
            groups.append((s, slice(r[0], r[-1] + 1), nk))
        else:  # index rows, cut below from one host->device copy
            groups.append((s, (len(scattered), len(r)), nk))
            scattered += r
    if scattered:
        flat = torch.tensor(scattered, dtype=torch.long, device=device)
        groups = [(s, flat[r[0] : r[0] + r[1]] if isinstance(r, tuple) else r, nk) for s, r, nk in groups]
    return ReferencePlan(tuple(groups))


def branch_attention_reference(
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
    plan: ReferencePlan | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of packed query tokens over a slotted KV cache.

    ``q`` [T, Hq, D]; ``k_cache``/``v_cache`` [S, Hkv, Lmax, D] with the queries'
    own K/V already written at ``qpos``; ``slot``, ``qpos``, ``prefix_len``,
    ``branch_start`` are [T] integer tensors (see :func:`visibility_mask`).
    Returns [T, Hq, D] in q's dtype. Grouped-query attention when Hkv < Hq.
    ``plan`` (from :func:`plan_branch_attention_reference` on the same slot and
    qpos values) saves reading the indices back; the result is the same.
    ``softcap`` (Gemma-2's attention logit soft-capping; None or 0 = off) maps
    each scaled score ``s`` to ``softcap * tanh(s / softcap)`` before masking.
    """
    out = torch.empty_like(q)
    hq, hkv = q.shape[1], k_cache.shape[1]
    if plan is None:
        groups = []
        for s in torch.unique(slot).tolist():
            rows = (slot == s).nonzero().squeeze(1)
            groups.append((s, rows, int(qpos[rows].max()) + 1))
    else:
        groups = plan.groups
    for s, rows, nk in groups:
        mask = visibility_mask(qpos[rows], prefix_len[rows], branch_start[rows], nk, window)
        k = k_cache[s, :, :nk].unsqueeze(0)
        v = v_cache[s, :, :nk].unsqueeze(0)
        qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, Tq, D]
        if softcap:
            o = capped_attention(qs, k, v, mask, scale, softcap)
            out[rows] = o.squeeze(0).transpose(0, 1)
            continue
        o = F.scaled_dot_product_attention(
            qs, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=hq != hkv
        )
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out


def branch_attention_lse_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    slot: torch.Tensor,
    qpos: torch.Tensor,
    prefix_len: torch.Tensor,
    branch_start: torch.Tensor,
    scale: float,
    window: int = 0,
    *,
    softcap: float | None = None,
) -> torch.Tensor:
    """Log-sum-exp [T, Hq] (fp64) of each query's scaled (and soft-capped) scores over its visible keys.

    The oracle for ``branch_attention(..., return_lse=True)``.
    """
    q, k_cache = q.double(), k_cache.double()
    hq, hkv = q.shape[1], k_cache.shape[1]
    lse = torch.empty(q.shape[:2], dtype=torch.float64, device=q.device)
    for s in torch.unique(slot).tolist():
        rows = (slot == s).nonzero().squeeze(1)
        nk = int(qpos[rows].max()) + 1
        mask = visibility_mask(qpos[rows].long(), prefix_len[rows].long(), branch_start[rows].long(), nk, window)
        k = k_cache[s, :, :nk].repeat_interleave(hq // hkv, dim=0)  # [Hq, nk, D]
        sc = torch.einsum("thd,hkd->thk", q[rows], k) * scale
        if softcap:
            sc = torch.tanh(sc / softcap) * softcap
        sc = sc.masked_fill(~mask[:, None, :], float("-inf"))
        lse[rows] = torch.logsumexp(sc, dim=-1)
    return lse
