"""A float64 torch stand-in for flash-attn's ``flash_attn_with_kvcache`` (CPU tests).

flash-attn only builds on CUDA, so the CPU tests run the cascade path against
this double. It follows the documented contract of flash-attn 2.x for the
arguments the cascade uses (no k/v append, no rotary, no paging): q
``[B, Sq, Hq, D]``; k/v cache ``[Bc, L, Hkv, D]`` with a contiguous last
dimension (other strides free); ``cache_seqlens`` / ``cache_batch_idx`` int32
``[B]``; non-causal; returns out ``[B, Sq, Hq, D]`` in q's dtype and the
natural-log LSE ``[B, Hq, Sq]`` fp32; ``softcap > 0`` soft-caps the scaled scores
(flash-attn >= 2.6). A batch row with no keys gets out 0 and
LSE +inf, as flash-attn 2's unsplit kernel writes. It is as strict as the real
checks on dtypes and layouts, so the cascade cannot pass here with arguments
the real library would refuse.
"""

import torch


def flash_attn_with_kvcache_double(q, k_cache, v_cache, *, cache_seqlens, cache_batch_idx, softmax_scale,
                                   causal, return_softmax_lse, softcap=0.0):
    assert not causal and return_softmax_lse
    assert q.dim() == 4 and k_cache.dim() == 4 and v_cache.shape == k_cache.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert q.dtype == k_cache.dtype == v_cache.dtype
    assert cache_seqlens.dtype == torch.int32 and cache_batch_idx.dtype == torch.int32
    b, sq, hq, d = q.shape
    hkv = k_cache.shape[2]
    assert cache_seqlens.shape == (b,) and cache_batch_idx.shape == (b,) and hq % hkv == 0
    out = torch.zeros(b, sq, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq, sq), float("inf"), dtype=torch.float64)
    for i in range(b):
        n = int(cache_seqlens[i])
        if n == 0:
            continue
        s = int(cache_batch_idx[i])
        k = k_cache[s, :n].double().repeat_interleave(hq // hkv, dim=1)  # [n, Hq, D]
        v = v_cache[s, :n].double().repeat_interleave(hq // hkv, dim=1)
        sc = torch.einsum("qhd,khd->hqk", q[i].double(), k) * softmax_scale
        if softcap > 0:  # flash-attn >= 2.6: softcap * tanh(scaled score / softcap)
            sc = torch.tanh(sc / softcap) * softcap
        lse[i] = torch.logsumexp(sc, dim=-1)
        out[i] = torch.einsum("hqk,khd->qhd", torch.softmax(sc, dim=-1), v)
    return out.to(q.dtype), lse.float()
