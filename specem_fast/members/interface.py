"""The member interface: what the rounds ask of one model, in plain data.

A member is one model of the ensemble together with its tokenizer and its
KV cache; the round executor never sees a tensor. Every call is batched over
requests and names, per request, the request id and the sequence length the
caller expects the member to hold (``prefix``: prompt plus accepted segments,
in the member's tokens), so a member whose state went out of step (a restarted
process, a retried call) raises :class:`MemberStateError` instead of writing
into the wrong cache positions. Everything here is picklable and crosses a
process boundary as it is.

A round with a member, per request: ``draft`` (continue the sequence by up to
``window`` tokens), ``verify`` (score every candidate's text after the
sequence, keeping each candidate's K/V as a branch), ``commit`` (append the
winning text: the member keeps the K/V it already has for it, a verified branch
or its own draft, and anything else is processed in its next forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from specem_fast.errors import SpecEMError


class MemberStateError(SpecEMError):
    """A call named a request or a sequence length the member does not hold."""


def check_held(member: str, request: int, held: list[int] | None, prefix: int) -> None:
    """Refuse a call for a request ``member`` does not hold (``held`` None), or whose
    expected sequence length ``prefix`` is not the ``held`` ids' length."""
    if held is None:
        raise MemberStateError(f"{member} holds no request {request}; open it first")
    if len(held) != prefix:
        raise MemberStateError(f"{member} holds {len(held)} tokens of request {request}, the call expects "
                               f"{prefix}: member and round executor are out of step")


@dataclass(frozen=True)
class OpenCall:
    """Start a request: its prompt in the member's tokens, in cache ``slot``.

    ``seed`` seeds the member's sampler for this request (None: greedy).
    """

    request: int
    slot: int
    ids: tuple[int, ...]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class DraftCall:
    """Sample up to ``window`` tokens after the member's sequence of length ``prefix``.

    ``alone``: the member is the only drafter, so it may keep the exact ids it
    sampled instead of cutting the text at a word boundary and re-encoding it
    (when those ids decode onto the sequence cleanly). ``raw``: always keep the
    exact ids (the single-model baseline). ``ignore_stop``: stop tokens are
    ordinary tokens. ``recompute``: the reference cost model, the cache is
    rebuilt from the start.
    """

    request: int
    prefix: int
    window: int
    alone: bool = False
    raw: bool = False
    ignore_stop: bool = False
    recompute: bool = False


@dataclass(frozen=True)
class DraftOut:
    """``tokens``: sampled, stop token excluded; ``text``: what competes (cut back to a
    word boundary unless kept whole); ``ids``: the text in the member's own tokens."""

    tokens: tuple[int, ...]
    text: str
    ids: tuple[int, ...]
    stopped: bool


@dataclass(frozen=True)
class VerifyCall:
    """Score ``candidates`` — ``(drafter name, text)`` pairs — after a sequence of length ``prefix``.

    The round executor sends each distinct text once (named by this member where it
    drafted it), so drafters of identical texts share one score exactly.
    """

    request: int
    prefix: int
    candidates: tuple[tuple[str, str], ...]
    recompute: bool = False


@dataclass(frozen=True)
class VerifyOut:
    """Per candidate, the mean log-prob and the mean raw logit of its tokens, and how
    many tokens it is in the member's tokenizer (``lengths``: for summed log-probs).

    ``room=False``: the packed candidates do not fit in the member's cache
    budget; nothing was scored (the request ends with ``cache_full``).
    """

    mean_logprob: tuple[float, ...] = ()
    mean_logit: tuple[float, ...] = ()
    room: bool = True
    lengths: tuple[int, ...] = ()


@dataclass(frozen=True)
class CommitCall:
    """Append ``text`` to the sequence of length ``prefix``. ``winner``: its index among
    the candidates of this round's verify call (None when there was none)."""

    request: int
    prefix: int
    text: str
    winner: int | None = None


class Member(Protocol):
    """One model of the ensemble (the local runner implements it in :mod:`.local_member`)."""

    name: str
    capacity: int  # cache tokens per request

    def prompt_ids(self, prompt: str | Sequence[tuple[str, str]], limit: int | None = None) -> list[int]: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def open(self, calls: Sequence[OpenCall]) -> None: ...
    def draft(self, calls: Sequence[DraftCall]) -> list[DraftOut]: ...
    def verify(self, calls: Sequence[VerifyCall]) -> list[VerifyOut]: ...
    def commit(self, calls: Sequence[CommitCall]) -> list[tuple[int, ...]]: ...
    def close(self, requests: Sequence[int]) -> None: ...
    def describe(self) -> dict: ...  # what results' metadata says about the member (kind, where)
    def shutdown(self) -> None: ...  # release what the member holds (an actor, a connection pool)


class Crew(Protocol):
    """Several members, called together: each method takes the calls per member name
    and returns the answers per member name. A crew may run the members side by side
    (threads, actors) and fuse work across them (one scoring launch per device)."""

    members: dict[str, Member]

    def open(self, calls: dict[str, list[OpenCall]]) -> None: ...
    def draft(self, calls: dict[str, list[DraftCall]]) -> dict[str, list[DraftOut]]: ...
    def verify(self, calls: dict[str, list[VerifyCall]]) -> dict[str, list[VerifyOut]]: ...
    def commit(self, calls: dict[str, list[CommitCall]]) -> dict[str, list[tuple[int, ...]]]: ...
    def close(self, requests: Sequence[int]) -> None: ...
