"""One member alone (``Ensemble.generate_single``): plain autoregressive decoding
through the same member interface, one token per engine round.

Each step drafts one token with the exact sampled ids kept (``raw``) and
commits it: the member feeds it in its next forward, so prefill and decode are
the member's own draft loop and nothing here touches a tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from specem_fast.config import GenerationSettings
from specem_fast.members.interface import CommitCall, Crew, DraftCall, OpenCall
from specem_fast.model import room
from specem_fast.results import SingleResult


@dataclass(eq=False)
class SingleRequest:
    id: int
    model: str
    prompt: str
    settings: GenerationSettings
    ignore_eos: bool
    t0: float  # when the call started: timings count from there, as the baseline always did
    prompt_len: int = 0
    new: list[int] = field(default_factory=list)
    first_token_s: float = 0.0
    stop_reason: str | None = None

    @property
    def count(self) -> int:
        return self.prompt_len + len(self.new)


class Baseline:
    def __init__(self, crew: Crew):
        self.crew = crew

    def open(self, req: SingleRequest, ids: list[int], slot: int) -> None:
        st = req.settings
        req.prompt_len = len(ids)
        call = OpenCall(req.id, slot, tuple(ids), st.temperature, st.top_p, None if st.greedy else st.seed)
        try:
            self.crew.open({req.model: [call]})
        except BaseException:
            self.crew.close([req.id])
            raise

    def step(self, reqs: list[SingleRequest]) -> None:
        """One token for each request (all of one member); a request that ends gets its ``stop_reason``."""
        m = reqs[0].model
        calls = [DraftCall(r.id, r.count, 1, raw=True, ignore_stop=r.ignore_eos) for r in reqs]
        outs = self.crew.draft({m: calls})[m]
        going = []
        for r, out in zip(reqs, outs):
            if not r.new:
                r.first_token_s = time.perf_counter() - r.t0
            if out.stopped:
                r.stop_reason = "stop"
            else:
                going.append((r, out))
        if not going:
            return
        got = self.crew.commit({m: [CommitCall(r.id, r.count, out.text) for r, out in going]})[m]
        capacity = self.crew.members[m].capacity
        for (r, _), ids in zip(going, got):
            r.new += ids
            if len(r.new) >= r.settings.max_new_tokens:
                r.stop_reason = "length"
            elif not room.fits(r.count - 1, 1, capacity):
                r.stop_reason = "cache_full"  # this token has no cache room to be fed: end here

    def close(self, req: SingleRequest) -> SingleResult:
        self.crew.close([req.id])
        text = self.crew.members[req.model].decode(req.new)
        return SingleResult(req.model, req.prompt, text, len(req.new), req.stop_reason,
                            time.perf_counter() - req.t0, req.first_token_s, req.prompt_len)
