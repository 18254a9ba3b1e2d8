"""Next-token choice: greedy or temperature + nucleus sampling, per-request seeded."""

from __future__ import annotations

import torch


def choose_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits`` [B, V] (fp32).

    Each row draws from its own generator so a request's tokens do not depend on
    which other requests share the batch.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1).tolist()
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always the top token)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    out = []
    for row, gen in zip(probs.cpu(), generators):
        out.append(int(torch.multinomial(row, 1, generator=gen)))
    return out
