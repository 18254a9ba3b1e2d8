"""Streaming text out of a request's events: released once, never taken back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from specem_fast.results import GenerationResult, RoundRecord
from specem_fast.model.text import StopPrefixes


@dataclass
class Segment:
    """Answer text released by :meth:`Ensemble.stream`, with the round that accepted it."""

    text: str
    model: str
    round: RoundRecord


class Releaser:
    """Turn one request's events into streamable text that is never taken back.

    With stop strings, the end of the answer that may be the start of a stop string
    is held until the next round or the end (a stop string that straddles two
    segments cuts text the previous round had accepted); the rest is released, so a
    stop string longer than a segment never holds back the whole stream. The
    segments' texts join to the final answer exactly; the GenerationResult comes last.
    """

    def __init__(self, stop: Sequence[str]):
        self.prefixes = StopPrefixes(stop)
        self.answer, self.sent, self.last = "", 0, None

    def feed(self, ev: RoundRecord | GenerationResult) -> list[Segment | GenerationResult]:
        if isinstance(ev, RoundRecord):
            self.answer = self.answer[: ev.answer_chars - len(ev.accepted)] + ev.accepted
            self.last = ev
            end = max(self.sent, len(self.answer) - self.prefixes.hold(self.answer))
            seg = Segment(self.answer[self.sent:end], ev.winner_model, ev)
            self.sent = end
            return [seg]
        out: list[Segment | GenerationResult] = []
        if ev.text[self.sent:] and self.last is not None:
            out.append(Segment(ev.text[self.sent:], self.last.winner_model, self.last))
        return out + [ev]


def release_segments(events: Iterator[tuple[int, RoundRecord | GenerationResult]], stop: Sequence[str]
                      ) -> Iterator[Segment | GenerationResult]:
    rel = Releaser(stop)
    try:
        for _, ev in events:
            yield from rel.feed(ev)
    finally:
        events.close()  # an abandoned stream cancels its request: the slot comes back within a round


def only_segments(events: Iterator[Segment | GenerationResult]) -> Iterator[Segment]:
    try:
        for ev in events:
            if isinstance(ev, Segment):
                yield ev
    finally:
        events.close()
