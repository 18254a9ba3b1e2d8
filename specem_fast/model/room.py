"""Cache room: what a request's KV-cache budget must hold, in one place.

Every member holds up to ``capacity`` tokens per request (``cache_tokens``; a
vLLM member: its server's length limit). A request's sequence (prompt plus
accepted segments) grows into it, and each round needs room above the
sequence: a drafter writes up to ``window`` tokens there, a verifier lays every
candidate out there, packed one after another. Whoever asks whether something
fits (the front refusing a prompt, the round executor before drafting, a
verifier before packing, the baseline before feeding a token, the cache before a
write) asks here, so the numbers agree. Plain integers: no torch.
"""

from __future__ import annotations

# A candidate is a drafter's text re-encoded in a verifier's tokens, which can take
# a few tokens more than the window the drafter sampled (a tokenizer that splits
# what another keeps whole); the up-front check reserves this much per drafter.
RETOKENIZE_SLACK = 4


def fits(length: int, more: int, capacity: int) -> bool:
    """Whether ``more`` tokens fit after a sequence of ``length`` in ``capacity``."""
    return length + more <= capacity


def round_room(window: int, drafters: int) -> int:
    """The room one round may need above the sequence: every drafter's candidate,
    packed, each up to ``window`` tokens plus :data:`RETOKENIZE_SLACK`."""
    return drafters * (window + RETOKENIZE_SLACK)


def prompt_limit(capacity: int, window: int, drafters: int) -> int:
    """The longest prompt a request may have: the budget less one round's room, so its
    first round always fits (a prompt over it is refused before it is queued)."""
    return capacity - round_room(window, drafters)
