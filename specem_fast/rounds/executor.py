"""The rounds: draft, verify, select, commit, for a batch of requests.

The round executor deals in request ids, token counts, texts and weights: it asks
the members (through a :class:`~specem_fast.members.interface.Crew`) to draft, verify
and commit, applies the round policy (:mod:`.policy`) and the scoring
arithmetic (:mod:`.scoring`), and records what happened. It holds no tensors:
every tensor, sampler and cache write belongs to the members.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from specem_fast.rounds import policy, scoring
from specem_fast.config import SEED_STRIDE, GenerationSettings
from specem_fast.members.interface import CommitCall, Crew, DraftCall, DraftOut, OpenCall, VerifyCall
from specem_fast.model import room
from specem_fast.results import Candidate, GenerationResult, RoundRecord
from specem_fast.rounds.weights import WeightBook


@dataclass
class Request:
    id: int
    prompt: str
    settings: GenerationSettings
    prompt_len: dict[str, int]
    counts: dict[str, int]  # each member's sequence length: prompt plus accepted segments
    weights: dict[str, float]
    drafting: list[str]  # drafters that have not exited
    answer: str = ""
    rounds: list[RoundRecord] = field(default_factory=list)
    stop_reason: str | None = None
    timings: dict[str, float] = field(default_factory=lambda: {"draft_s": 0.0, "verify_s": 0.0, "commit_s": 0.0})
    started: float = field(default_factory=time.perf_counter)
    first_segment_s: float | None = None
    low_rounds: dict[str, int] = field(default_factory=dict)  # rounds in a row a drafter started below exit_threshold
    book: WeightBook | None = None  # learns the weights this request ends with (init_weights="learned")
    metadata: dict = field(default_factory=dict)  # attached to the result as it is

    @property
    def lead(self) -> str:
        """The drafter whose tokens ``max_new_tokens`` counts."""
        return self.drafting[0]


@dataclass
class _Turn:
    """One request's round in progress."""

    req: Request
    drafts: list[tuple[str, DraftOut]]
    fast: int | None = None  # index into drafts of a winner accepted without verifying
    raw: dict[str, list[float]] = field(default_factory=dict)
    lengths: dict[str, list[int]] = field(default_factory=dict)
    winner: tuple[str, DraftOut] | None = None
    winner_index: int | None = None  # among the candidates, when verified
    text_of: list[int] = field(default_factory=list)  # per candidate, its text's index in the verify calls
    verified: bool = False

    @property
    def cands(self) -> list[tuple[str, DraftOut]]:
        keep = policy.competing([d.text for _, d in self.drafts], [d.stopped for _, d in self.drafts],
                                self.req.settings.prefer_finished)
        return [self.drafts[i] for i in keep]


def _raw_scores(out, score: str) -> list[float]:
    if score == "logprob":
        return list(out.mean_logprob)
    if score == "logit":
        return list(out.mean_logit)
    if len(out.lengths) != len(out.mean_logprob):
        raise ValueError("score='logprob_sum' needs the candidates' lengths, which this verifier did not give")
    return [m * n for m, n in zip(out.mean_logprob, out.lengths)]


def _distinct_candidates(cands: list[tuple[str, DraftOut]], verifier: str) -> tuple[tuple[str, str], ...]:
    """The verify call's candidates: each distinct text once (see :func:`policy.distinct_texts`),
    named by ``verifier`` where it drafted that text (it scores from its own draft's K/V),
    else by the text's first drafter."""
    named: dict[str, str] = {}
    for m, d in cands:
        if d.text not in named or m == verifier:
            named[d.text] = m
    return tuple((m, text) for text, m in named.items())


class RoundExecutor:
    def __init__(self, crew: Crew, drafters: list[str], verifiers: list[str]):
        self.crew = crew
        self.drafters = drafters
        self.verifiers = verifiers
        self.learners = [m for m in drafters if m in verifiers]
        self.capacity = {m: member.capacity for m, member in crew.members.items()}

    # -- requests ---------------------------------------------------------------
    def open(self, request_id: int, prompt: str, *, settings: GenerationSettings, prompt_ids: dict[str, list[int]],
             slot: int, weights: dict[str, float] | None = None, book: WeightBook | None = None,
             metadata: dict | None = None) -> Request:
        """A request in cache ``slot`` (the engine's: it takes and gives it back),
        starting from ``weights`` (one per verifier), or else from what ``book`` gives
        for ``settings.init_weights``; ``book`` also learns the request's final weights
        when its settings ask to (see :meth:`close`). ``metadata``: what its result's
        metadata says."""
        if weights is None:
            weights = (book or WeightBook(self.verifiers)).initial(settings.init_weights)
        calls = {}
        for i, m in enumerate(self.crew.members):
            seed = None if settings.greedy else settings.seed * SEED_STRIDE + i
            calls[m] = [OpenCall(request_id, slot, tuple(prompt_ids[m]), settings.temperature, settings.top_p, seed)]
        req = Request(request_id, prompt, settings, {m: len(prompt_ids[m]) for m in self.crew.members},
                      {m: len(prompt_ids[m]) for m in self.crew.members}, dict(weights), list(self.drafters),
                      book=book, metadata=dict(metadata or {}))
        try:
            self.crew.open(calls)
        except BaseException:
            self.crew.close([request_id])
            raise
        return req

    def close(self, req: Request) -> GenerationResult:
        """The finished request's result; the members forget it, and its weight book
        learns from it (see :meth:`WeightBook.learn`)."""
        self.crew.close([req.id])
        if req.book is not None:
            req.book.learn(req.settings, req.weights, any(rd.verified for rd in req.rounds))
        total = time.perf_counter() - req.started
        counts = {m: n - req.prompt_len[m] for m, n in req.counts.items()}
        res = GenerationResult(
            prompt=req.prompt,
            text=req.answer,
            stop_reason=req.stop_reason or "length",
            new_tokens=counts[req.lead],
            tokens_per_model=counts,
            rounds=req.rounds,
            timings=dict(req.timings, total_s=total, first_segment_s=req.first_segment_s or total),
            settings=req.settings.to_dict(),
            metadata=self._metadata(req),
        )
        res.prompt_tokens = dict(req.prompt_len)
        return res

    def _metadata(self, req: Request) -> dict:
        """The job's metadata, with each member's kernel path as it ran: a path can change
        during a request's first forwards (a flash-attn build that disagrees with the branch
        kernel is turned off there)."""
        meta = dict(req.metadata)
        if "kernels" in meta:
            meta["kernels"] = {n: self.crew.members[n].describe().get("kernels", k) if n in self.crew.members else k
                               for n, k in meta["kernels"].items()}
        return meta

    def discard(self, request_ids: list[int]) -> None:
        """Forget requests that end without a result (cancelled, failed)."""
        self.crew.close(request_ids)

    # -- one round for all active requests ---------------------------------------
    def round(self, reqs: list[Request]) -> Iterator[tuple[Request, RoundRecord]]:
        for r in reqs:  # no room to draft: the request ends with what it has
            if not all(room.fits(r.counts[m], self._window(r), self.capacity[m]) for m in self.drafters):
                r.stop_reason = "cache_full"
        reqs = [r for r in reqs if not r.stop_reason]
        for r in reqs:
            st = r.settings
            threshold = st.exit_threshold if st.hedge_lr is not None else None
            r.drafting = policy.exit_drafters(r.drafting, r.weights, r.low_rounds, threshold, st.exit_patience)
        t0 = time.perf_counter()
        turns = self._draft(reqs)
        t1 = time.perf_counter()
        self._verify([t for t in turns if t.fast is None and t.cands])
        t2 = time.perf_counter()
        committing = [t for t in turns if t.req.stop_reason is None and (t.fast is not None or t.cands)]
        for t in turns:
            if t.req.stop_reason is None and t.fast is None and not t.cands:
                t.req.stop_reason = "stop" if any(d.stopped for _, d in t.drafts) else "empty"
        records = [self._record(t) for t in committing]
        starts = [len(t.req.answer) for t in committing]
        appended = self._commit(committing)
        t3 = time.perf_counter()
        for t, record, start in zip(committing, records, starts):
            r = t.req
            self._finish_round(t, appended[r.id])
            record.accepted = r.answer[start:]
            record.answer_chars = len(r.answer)
            record.seconds = {"draft": t1 - t0, "verify": t2 - t1, "commit": t3 - t2}
            for k, v in (("draft_s", t1 - t0), ("verify_s", t2 - t1), ("commit_s", t3 - t2)):
                r.timings[k] += v
            if r.first_segment_s is None:
                r.first_segment_s = t3 - r.started
            r.rounds.append(record)
            yield r, record

    def _window(self, r: Request) -> int:
        st = r.settings
        return policy.window_for(st.window, st.max_new_tokens, r.counts[r.lead] - r.prompt_len[r.lead])

    def _draft(self, reqs: list[Request]) -> list[_Turn]:
        calls: dict[str, list[DraftCall]] = {}
        for m in self.drafters:
            calls[m] = [DraftCall(r.id, r.counts[m], self._window(r), alone=r.drafting == [m],
                                  recompute=r.settings.mode == "recompute") for r in reqs if m in r.drafting]
        outs = self.crew.draft(calls)
        got = {m: dict(zip((c.request for c in calls[m]), outs.get(m, []))) for m in self.drafters}
        turns = []
        for r in reqs:
            t = _Turn(r, [(m, got[m][r.id]) for m in self.drafters if r.id in got[m]])
            st = r.settings
            t.fast = policy.fast_winner([d.text for _, d in t.drafts], [d.stopped for _, d in t.drafts],
                                        st.fast_eos, st.skip_agreed, st.prefer_finished)
            turns.append(t)
        return turns

    def _verify(self, turns: list[_Turn]) -> None:
        """One verify call per verifier over every request's candidates."""
        if not turns:
            return
        for t in turns:
            t.text_of = policy.distinct_texts([d.text for _, d in t.cands])
        calls = {v: [VerifyCall(t.req.id, t.req.counts[v], _distinct_candidates(t.cands, v),
                                t.req.settings.mode == "recompute") for t in turns] for v in self.verifiers}
        outs = self.crew.verify(calls)
        for v in self.verifiers:
            for t, out in zip(turns, outs[v]):
                if not out.room:
                    t.req.stop_reason = "cache_full"
                    continue
                raw = _raw_scores(out, t.req.settings.score)
                # identical texts were scored once: each candidate gets its text's score
                t.raw[v] = [raw[k] for k in t.text_of]
                t.lengths[v] = [out.lengths[k] for k in t.text_of] if out.lengths else []

    def _record(self, t: _Turn) -> RoundRecord:
        """Pick the winner (weights updated first, as the reference does) and record the round."""
        r, st = t.req, t.req.settings
        cands = t.cands
        drafted = [m for m, _ in t.drafts]
        if t.fast is not None:
            win = t.drafts[t.fast]
            shown = cands if win in cands else cands + [win]
            t.winner, t.verified = win, False
            return self._make_record(r, shown, shown.index(win), drafted, verified=False)
        raw = {v: t.raw[v] for v in self.verifiers}
        norm, weights, combined, w = scoring.pick_winner(
            raw, score=st.score, candidate_models=[m for m, _ in cands], learners=self.learners, weights=r.weights,
            hedge_lr=st.hedge_lr, t=len(r.rounds) + 1, schedule=st.hedge_schedule, self_votes=st.self_votes)
        if weights is not None:
            r.weights = weights
        t.winner, t.verified, t.winner_index = cands[w], True, w
        return self._make_record(r, cands, w, drafted, verified=True, raw=t.raw, scores=norm, combined=combined,
                                 lengths=t.lengths)

    @staticmethod
    def _make_record(r: Request, shown: list[tuple[str, DraftOut]], winner: int, drafted: list[str], *,
                     verified: bool, raw: dict[str, list[float]] | None = None,
                     scores: dict[str, list[float]] | None = None, combined: list[float] | None = None,
                     lengths: dict[str, list[int]] | None = None) -> RoundRecord:
        """The round's record: ``shown`` candidates, ``winner`` among them; a round
        accepted without a verify pass has no scores."""
        return RoundRecord(
            index=len(r.rounds) + 1,
            candidates=[Candidate(m, d.text, d.stopped, len(d.tokens)) for m, d in shown],
            raw_scores=raw or {},
            scores=scores or {},
            weights=dict(r.weights),
            combined=combined or [],
            winner=winner,
            winner_model=shown[winner][0],
            seconds={},
            drafters=drafted,
            verified=verified,
            verify_tokens=lengths or {},
        )

    def _commit(self, turns: list[_Turn]) -> dict[int, dict[str, tuple[int, ...]]]:
        """Append every winner's text to every member's sequence; returns the ids each member appended."""
        calls = {m: [CommitCall(t.req.id, t.req.counts[m], t.winner[1].text,
                                t.text_of[t.winner_index] if t.verified else None) for t in turns]
                 for m in self.crew.members}
        outs = self.crew.commit(calls) if turns else {}
        appended: dict[int, dict[str, tuple[int, ...]]] = {t.req.id: {} for t in turns}
        for m, ids in outs.items():
            for t, got in zip(turns, ids):
                appended[t.req.id][m] = got
                t.req.counts[m] += len(got)
        for t in turns:
            t.req.answer += t.winner[1].text
        return appended

    def _finish_round(self, t: _Turn, appended: dict[str, tuple[int, ...]]) -> None:
        r, st = t.req, t.req.settings
        win = t.winner[1]
        cut = policy.cut_at_stop_string(r.answer, st.stop)
        if cut is not None:
            r.answer, r.stop_reason = cut, "stop_string"
        elif win.stopped:
            r.stop_reason = "fast_eos" if not t.verified and st.fast_eos else "stop"
        else:
            excess = policy.budget_excess(r.counts[r.lead], r.prompt_len[r.lead], st.max_new_tokens)
            if excess is not None:
                r.stop_reason = "length"
                if excess:
                    self._trim_to_budget(r, win.text, appended, excess)

    def _trim_to_budget(self, r: Request, segment: str, appended: dict[str, tuple[int, ...]], excess: int) -> None:
        """Cut the last segment so the answer is exactly max_new_tokens of the lead drafter's tokens.

        Another model's segment can be longer in the lead drafter's tokens than
        the window left. The request ends here, so only the counts change.
        """
        seg = appended[r.lead]
        keep = seg[: len(seg) - excess]
        head = self.crew.members[r.lead].decode(keep)
        answer = policy.trimmed_answer(r.answer, segment, head)
        if answer is None:
            return
        r.answer = answer
        for m in r.counts:
            kept = len(keep) if m == r.lead else len(self.crew.members[m].encode(head))
            r.counts[m] += kept - len(appended[m])
