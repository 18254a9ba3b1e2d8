"""Decode attention in plain torch over a fixed key range (the compiled draft step's kernel).

One query per request, attending causally to its own slot's cache: query b sees
keys ``j <= pos[b]`` (and, with a sliding window, ``pos[b] - j < window``). The
key range ``[0, num_keys)`` is a shape, not a value read from the device, so
the function has no data-dependent shapes and compiles into one graph (the way
gpt-fast attends over its static cache). Its oracle is
:func:`~specem_fast.kernels.reference.branch_attention_reference` with
``prefix_len == branch_start == qpos == pos``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import capped_attention

__all__ = ["decode_attention"]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    pos: torch.Tensor,
    key_pos: torch.Tensor,
    scale: float,
    window: int = 0,
    *,
    softcap: float | None = None,
) -> torch.Tensor:
    """``q`` [B, Hq, D]; caches [S, Hkv, L, D]; ``slot``/``pos`` [B]; ``key_pos`` is
    ``arange(num_keys)`` with ``num_keys > max(pos)``. Returns [B, Hq, D] in q's dtype.
    ``softcap`` (a constant per layer; None or 0 = off): Gemma-2's attention logit
    soft-capping, scores formed explicitly since SDPA has none.

    Keys a query may not see are zeroed before use: positions past a request's
    length may hold anything (the cache is allocated uninitialised) and a NaN
    there would reach the output through ``0 * NaN``. ``enable_gqa`` is passed as a
    literal: once members with other head counts have run the shared compiled
    step, torch.compile makes the head dims symbolic, and sdpa refuses a SymBool.
    """
    nk = key_pos.shape[0]
    k = k_cache[slot, :, :nk]  # [B, Hkv, nk, D]
    v = v_cache[slot, :, :nk]
    vis = key_pos[None, :] <= pos[:, None]  # [B, nk]
    if window > 0:
        vis = vis & ((pos[:, None] - key_pos[None, :]) < window)
    keep = vis[:, None, :, None]
    k = torch.where(keep, k, 0).to(q.dtype)
    v = torch.where(keep, v, 0).to(q.dtype)
    mask = vis[:, None, None, :]
    if softcap:
        return capped_attention(q.unsqueeze(2), k, v, mask, scale, softcap).squeeze(2)
    if q.shape[1] != k_cache.shape[1]:  # a branch, so the argument is a literal (see above)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale)
    return o.squeeze(2)
