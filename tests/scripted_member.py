"""A member that plays a script: fixed drafts, stop flags and scores given as plain data.

It implements :class:`specem_fast.members.interface.Member` without a model or a
tensor, so the round executor and the engine loop run in milliseconds:

    ScriptedMember("a", drafts=["The sea", (" is blue.", True)], scores={" is blue.": -0.2})

- ``drafts``: what the member drafts for a request, one entry per draft call it gets
  for that request (its rounds): a text, or ``(text, stopped)`` where ``stopped`` says
  the draft ended with a stop token. The text is cut to the call's ``window`` tokens
  (a cut draft did not stop). Past the end of the script the member drafts nothing
  (an empty draft, which does not compete).
- ``scores``: the mean log-prob this member gives a candidate text when it verifies
  (``default_score`` for any other text); the mean logit is the log-prob + 10.
- ``chars_per_token``: how many characters one token is (tokenizers differ between
  members: what a budget in the lead drafter's tokens means for another's text).
- ``capacity``: cache tokens per request (``room=False`` for a verify pass over it).
- ``fail``: ``{"draft": 2}`` raises a RuntimeError on the member's 2nd draft call
  (any method of the interface).
- ``hook``: called with the method's name at the start of every call (a test blocks
  a round there, or counts calls).

Every call is logged in ``calls`` as ``(method, calls)``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

from specem_fast.errors import CacheFullError
from specem_fast.members.interface import (CommitCall, DraftCall, DraftOut, MemberStateError, OpenCall, VerifyCall,
                                           VerifyOut, check_held)


@dataclass
class _Seq:
    slot: int
    ids: list[int]
    drafted: int = 0  # draft calls answered so far


@dataclass
class ScriptedMember:
    name: str
    drafts: Sequence[str | tuple[str, bool]] = ()
    scores: dict[str, float] = field(default_factory=dict)
    default_score: float = -1.0
    chars_per_token: int = 1
    capacity: int = 1000
    fail: dict[str, int] = field(default_factory=dict)
    hook: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        self.held: dict[int, _Seq] = {}
        self.calls: list[tuple[str, list]] = []
        self.counts: dict[str, int] = {}
        self._words: list[str] = []
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------
    def _enter(self, method: str, calls) -> None:
        if self.hook is not None:
            self.hook(method)
        with self._lock:
            self.calls.append((method, list(calls)))
            self.counts[method] = n = self.counts.get(method, 0) + 1
        if self.fail.get(method) == n:
            raise RuntimeError(f"{self.name}: {method} exploded")

    def _seq(self, request: int, prefix: int) -> _Seq:
        s = self.held.get(request)
        check_held(self.name, request, s.ids if s is not None else None, prefix)
        return s

    @property
    def requests(self) -> list[int]:
        return list(self.held)

    def method_calls(self, method: str) -> list:
        """Every call of ``method`` the member got, flattened."""
        return [c for m, cs in self.calls if m == method for c in cs]

    # -- text ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        k = self.chars_per_token
        out = []
        for i in range(0, len(text), k):
            piece = text[i : i + k]
            if piece not in self._ids:
                self._ids[piece] = len(self._words)
                self._words.append(piece)
            out.append(self._ids[piece])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._words[i] for i in ids)

    def prompt_ids(self, prompt, limit: int | None = None) -> list[int]:
        text = prompt if isinstance(prompt, str) else "\n".join(content for _, content in prompt)
        ids = self.encode(text)
        if limit is not None and len(ids) > limit:
            raise CacheFullError(f"the prompt is {len(ids)} tokens for {self.name}, over the {limit} a prompt may take")
        return ids

    # -- requests ------------------------------------------------------------------
    def open(self, calls: Sequence[OpenCall]) -> None:
        self._enter("open", calls)
        for c in calls:
            if c.request in self.held:
                raise MemberStateError(f"{self.name} already holds request {c.request}")
            if any(s.slot == c.slot for s in self.held.values()):
                raise MemberStateError(f"{self.name}: slot {c.slot} of request {c.request} is in use")
            self.held[c.request] = _Seq(c.slot, list(c.ids))

    def draft(self, calls: Sequence[DraftCall]) -> list[DraftOut]:
        self._enter("draft", calls)
        out = []
        for c in calls:
            s = self._seq(c.request, c.prefix)
            entry = self.drafts[s.drafted] if s.drafted < len(self.drafts) else ""
            s.drafted += 1
            text, stopped = (entry, False) if isinstance(entry, str) else entry
            ids = self.encode(text)
            if len(ids) > c.window:
                ids, stopped = ids[: c.window], False
                text = self.decode(ids)
            if c.ignore_stop:
                stopped = False
            out.append(DraftOut(tuple(ids), text, tuple(ids), stopped))
        return out

    def verify(self, calls: Sequence[VerifyCall]) -> list[VerifyOut]:
        self._enter("verify", calls)
        out = []
        for c in calls:
            s = self._seq(c.request, c.prefix)
            lengths = tuple(len(self.encode(text)) for _, text in c.candidates)
            if len(s.ids) + sum(lengths) > self.capacity:
                out.append(VerifyOut(room=False))
                continue
            lp = tuple(self.scores.get(text, self.default_score) for _, text in c.candidates)
            out.append(VerifyOut(lp, tuple(x + 10.0 for x in lp), lengths=lengths))
        return out

    def commit(self, calls: Sequence[CommitCall]) -> list[tuple[int, ...]]:
        self._enter("commit", calls)
        out = []
        for c in calls:
            s = self._seq(c.request, c.prefix)
            ids = self.encode(c.text)
            s.ids += ids
            out.append(tuple(ids))
        return out

    def close(self, requests: Sequence[int]) -> None:
        self._enter("close", requests)
        for r in requests:
            self.held.pop(r, None)

    def describe(self) -> dict:
        return {"kind": "scripted"}

    def shutdown(self) -> None:
        pass


class ScriptedCrew:
    """The members called one after another (the crew interface, without threads)."""

    def __init__(self, members: Sequence[ScriptedMember]):
        self.members = {m.name: m for m in members}

    def _each(self, method: str, calls: dict) -> dict:
        return {m: getattr(self.members[m], method)(cs) for m, cs in calls.items() if cs}

    def open(self, calls):
        self._each("open", calls)

    def draft(self, calls):
        return self._each("draft", calls)

    def verify(self, calls):
        return self._each("verify", calls)

    def commit(self, calls):
        return self._each("commit", calls)

    def close(self, requests) -> None:
        errors = []
        for m in self.members.values():
            try:
                m.close(requests)
            except Exception as exc:  # noqa: BLE001 - every member is told
                errors.append(exc)
        if errors:
            raise errors[0]


class Slots:
    """Request slots without a cache: what the engine takes and gives back."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.num_slots} request slots are in use")
        return self._free.pop()

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)
