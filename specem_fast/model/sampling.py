"""Next-token choice: greedy or temperature + nucleus sampling, per-request seeded.

:func:`sample_tokens` stays on the logits' device: the draft loop keeps its
tokens there until the round needs text. A sampled row draws the way
``torch.multinomial(p, 1)`` does (an exponential race: argmax of p / q with q
~ Exp(1) from the row's own generator), so on the CPU it picks the very tokens
multinomial picked, without multinomial's host-side validity checks.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (fp32), as an int64 tensor [B] on their device.

    Each row draws from its own generator so a request's tokens do not depend on
    which other requests share the batch. A generator on another device than the
    logits (a CPU generator for CUDA logits) draws there and its numbers are copied over.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    # top_p as float32 holds it: at least its smallest normal, or nothing would be kept (the
    # settings clamp it so already, see config.TOP_P_FLOOR); one that rounds to 1 keeps all
    top_p = max(top_p, float(np.finfo(np.float32).tiny))
    if np.float32(top_p) < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always the top token)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    race = torch.empty_like(probs)
    for i, gen in enumerate(generators):
        if gen is None or gen.device == probs.device:
            race[i].exponential_(1, generator=gen)
        else:
            race[i].copy_(torch.empty(probs.shape[1], dtype=probs.dtype, device=gen.device).exponential_(1, generator=gen))
    return (probs / race).argmax(dim=-1)

