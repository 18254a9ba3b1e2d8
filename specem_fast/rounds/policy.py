"""Round policy as plain functions of numbers and texts: who drafts, which round
skips verification, when a request ends and how its last segment is cut.

The round executor applies them; the math of scoring and Hedge is in :mod:`.scoring`.
"""

from __future__ import annotations

from typing import Mapping, Sequence


def exit_drafters(drafting: Sequence[str], weights: Mapping[str, float], low_rounds: dict[str, int],
                  threshold: float | None, patience: int) -> list[str]:
    """Model exit: the drafters still drafting after this round's start.

    A drafter whose weight was below ``threshold`` at the start of ``patience``
    rounds in a row stops (``low_rounds`` counts those rounds and is updated).
    Only drafters with a weight (those that verify) can exit, and the heaviest
    one never does, so someone always drafts. ``threshold=None``: nobody exits.
    """
    weighted = [m for m in drafting if m in weights]
    if threshold is None or not weighted:
        return list(drafting)
    keep = max(weighted, key=lambda m: weights[m])
    out = list(drafting)
    for m in weighted:
        low_rounds[m] = low_rounds.get(m, 0) + 1 if weights[m] < threshold else 0
        if m != keep and low_rounds[m] >= patience:
            out.remove(m)
    return out


def window_for(window: int, max_new_tokens: int, lead_done: int) -> int:
    """Tokens the drafters may sample this round: the window, or what the budget leaves (at least 1)."""
    return max(1, min(window, max_new_tokens - lead_done))


def competing(texts: Sequence[str], stopped: Sequence[bool], prefer_finished: bool) -> list[int]:
    """The drafts that compete for the round: the non-empty ones; with
    ``prefer_finished``, only those that ended the answer, when any did."""
    cands = [i for i, t in enumerate(texts) if t]
    if prefer_finished:
        ended = [i for i in cands if stopped[i]]
        if ended:
            return ended
    return cands


def fast_winner(texts: Sequence[str], stopped: Sequence[bool], fast_eos: bool, skip_agreed: bool,
                prefer_finished: bool = False) -> int | None:
    """The draft accepted without a verify pass, or None when the round verifies.

    ``texts``/``stopped``: every draft of the round (empty texts do not compete).
    ``fast_eos``: a draft that ended with a stop token wins at once. One
    competing candidate (see :func:`competing`): verifying cannot change the pick
    (and every reward would be 0). ``skip_agreed``: identical candidates would be
    scored alike.
    """
    if fast_eos:
        ended = [i for i, s in enumerate(stopped) if s]
        if ended:
            return ended[0]
    cands = competing(texts, stopped, prefer_finished)
    if len(cands) == 1 or (cands and skip_agreed and len({texts[i] for i in cands}) == 1):
        return cands[0]
    return None


def distinct_texts(texts: Sequence[str]) -> list[int]:
    """For each candidate, the index of its text among the round's distinct texts
    (numbered in order of first appearance).

    Identical texts are scored once per verifier and share that score, so they
    tie exactly and the earliest drafter wins, as in exact arithmetic: two
    scorings of one text (one from a drafter's own K/V, one re-encoded) differ
    in the last bits, by an amount that depends on the CPU and the batch.
    """
    first: dict[str, int] = {}
    return [first.setdefault(t, len(first)) for t in texts]


def cut_at_stop_string(answer: str, stops: Sequence[str]) -> str | None:
    """The answer cut before the first stop string found (in the order given), or None."""
    for stop in stops:
        cut = answer.find(stop)
        if cut >= 0:
            return answer[:cut]
    return None


def budget_excess(lead_count: int, lead_prompt: int, max_new_tokens: int) -> int | None:
    """Tokens the lead drafter's answer has beyond ``max_new_tokens`` (>= 0: the request
    ends at its length limit), or None while the budget is not reached."""
    excess = lead_count - lead_prompt - max_new_tokens
    return excess if excess >= 0 else None


def trimmed_answer(answer: str, segment: str, head: str) -> str | None:
    """The answer with its last ``segment`` replaced by ``head`` (the segment's first
    tokens within the budget, decoded), or None when ``head`` does not decode to a
    prefix of the segment (a tokenizer that splits a character): the answer stays."""
    if not segment.startswith(head) or not answer.endswith(segment):
        return None
    return answer[: len(answer) - len(segment)] + head
