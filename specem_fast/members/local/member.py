"""The local member: a :class:`ModelRunner` in this process behind the member interface.

It owns every tensor of its requests: hidden states, samplers, the K/V of
drafts and verify branches. Cache invariant per request: positions below the
cache's committed length hold ``ids[:length]``; ``ids[length:]`` is pending and
goes into the member's next forward (folded into drafting or verifying); when
nothing is pending, ``last_hidden`` is the hidden state of the last committed
token, which predicts the next one. No committed token is processed twice in
cached mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from specem_fast.members.local.codec_text import CodecText, common_prefix
from specem_fast.members.interface import CommitCall, DraftCall, DraftOut, MemberStateError, OpenCall, VerifyCall, VerifyOut, check_held
from specem_fast.members.local.draft_loop import Drafter, Sampled
from specem_fast.model import room
from specem_fast.model.runner import ModelRunner, Run, score_all


@dataclass(frozen=True)
class _Draft:
    """This round's draft as the member keeps it: the text that competes, in this member's
    ids, of which the first ``reuse`` keep the K/V written drafting them (``hiddens[j]``:
    the hidden state that predicted the j-th sampled token)."""

    text: str
    ids: list[int]
    reuse: int
    hiddens: list[torch.Tensor]


@dataclass
class _Branch:
    """Where one candidate lies in the scratch region after a verify pass."""

    ids: list[int]
    qpos: int
    fed: int
    reuse: int
    final_hidden: torch.Tensor


@dataclass(eq=False)
class _Seq:
    """One request as this member holds it."""

    slot: int
    ids: list[int]
    temperature: float
    top_p: float
    generator: torch.Generator | None
    last_hidden: torch.Tensor | None = None
    draft: _Draft | None = None  # this round's
    branches: list[_Branch] | None = None  # this round's verify pass


@dataclass(eq=False)
class VerifyPlan:
    """A local member's verify pass laid out and not yet scored (:meth:`LocalMember.lay_out`).

    ``lengths``: per call, its candidates' lengths in the member's tokens, or None
    when they do not fit (that call gets ``room=False``); ``problem``: the scoring
    problem of the calls that fit (None when none does).
    """

    member: "LocalMember"
    lengths: list[tuple[int, ...] | None]
    problem: tuple | None

    def out(self, scores) -> list[VerifyOut]:
        """The calls' answers from ``scores`` (the problem's): each candidate's mean
        log-prob, mean logit and length."""
        out, c = [], 0
        lp = scores.mean_logprob.tolist() if scores is not None else []
        lg = scores.mean_logit.tolist() if scores is not None else []
        for lengths in self.lengths:
            if lengths is None:
                out.append(VerifyOut(room=False))
                continue
            k = len(lengths)
            out.append(VerifyOut(tuple(lp[c : c + k]), tuple(lg[c : c + k]), lengths=lengths))
            c += k
        return out


def score_plans(plans: Sequence[VerifyPlan]) -> list[list[VerifyOut]]:
    """Score laid-out verify passes of several members (those on one device in one
    launch) and answer each plan's calls."""
    todo = [p for p in plans if p.problem is not None]
    scores = dict(zip(map(id, todo), score_all([p.member.runner for p in todo], [p.problem for p in todo])))
    return [p.out(scores.get(id(p))) for p in plans]


class LocalMember(CodecText):
    """One model in this process (see :mod:`.member` for the calls)."""

    def __init__(self, runner: ModelRunner, batch_invariant: bool = False):
        """``batch_invariant``: every forward holds one request only (its draft steps, its
        verify pass), so no reduction mixes rows of two requests and a request's answer is
        the same whatever it is batched with, at the cost of one forward per request."""
        self.runner = runner
        self.batch_invariant = batch_invariant
        self.name = runner.name
        self._seqs: dict[int, _Seq] = {}
        self.drafter = Drafter(runner)

    @property
    def requests(self) -> list[int]:
        """The requests this member holds state for."""
        return list(self._seqs)

    @property
    def capacity(self) -> int:
        return self.runner.cache.capacity

    @property
    def device(self):
        """Where the model runs (a crew runs members on one device one after another)."""
        return self.runner.device

    @property
    def interpreted(self) -> bool:
        """Whether its Triton kernels run through the interpreter (on a CPU)."""
        return self.runner.triton and self.runner.device.type == "cpu"

    def describe(self) -> dict:
        r = self.runner
        return {"kind": "local", "device": str(r.device), "dtype": str(r.dtype).replace("torch.", ""),
                "kernels": r.kernel_path}

    def shutdown(self) -> None:
        """Nothing to release: the runner's buffers go with the ensemble."""

    # -- requests -------------------------------------------------------------
    def open(self, calls: Sequence[OpenCall]) -> None:
        for c in calls:
            if c.request in self._seqs:
                raise MemberStateError(f"{self.name} already holds request {c.request}")
            if self.runner.cache.length[c.slot]:
                raise MemberStateError(f"{self.name}: cache slot {c.slot} of request {c.request} is not empty")
            gen = None
            if c.seed is not None:  # on the model's device: sampling never leaves it
                gen = torch.Generator(device=self.runner.device).manual_seed(c.seed)
            self._seqs[c.request] = _Seq(c.slot, list(c.ids), c.temperature, c.top_p, gen)

    def close(self, requests: Sequence[int]) -> None:
        for r in requests:
            self._seqs.pop(r, None)

    def _seq(self, request: int, prefix: int) -> _Seq:
        s = self._seqs.get(request)
        check_held(self.name, request, s.ids if s is not None else None, prefix)
        return s

    # -- draft ----------------------------------------------------------------
    def draft(self, calls: Sequence[DraftCall]) -> list[DraftOut]:
        if self.batch_invariant and len(calls) > 1:  # one request per forward
            return [self.draft([c])[0] for c in calls]
        seqs = [self._seq(c.request, c.prefix) for c in calls]
        cache = self.runner.cache
        for c, s in zip(calls, seqs):
            s.draft, s.branches = None, None
            if c.recompute:  # the reference cost model: no cache across rounds
                cache.crop(s.slot, 0)
        self._catch_up(seqs)
        out: list[DraftOut | None] = [None] * len(calls)
        for ignore in (False, True):  # the stop tokens differ: two loops
            idx = [i for i, c in enumerate(calls) if c.ignore_stop is ignore]
            if idx:
                drafts = self.drafter.draft([seqs[i] for i in idx], [calls[i].window for i in idx], ignore)
                for i, d in zip(idx, drafts):
                    out[i] = self._finish_draft(calls[i], seqs[i], d)
        return out

    def _finish_draft(self, c: DraftCall, s: _Seq, d: Sampled) -> DraftOut:
        text, ids = self.runner.codec.draft_segment(s.ids, d.tokens, d.stopped, exact=c.raw, alone=c.alone)
        reuse = 0 if c.recompute else common_prefix(ids, d.tokens[: d.fed])
        s.draft = _Draft(text, ids, reuse, d.hiddens)
        return DraftOut(tuple(d.tokens), text, tuple(ids), d.stopped)

    def _catch_up(self, seqs: list[_Seq], extra: list[Run] | None = None) -> torch.Tensor:
        """Process pending tokens (plus optional extra runs) in one forward; returns
        the hidden states of the extra runs, in order."""
        runner = self.runner
        cache = runner.cache
        runs, owners = [], []
        for s in seqs:
            start = cache.length[s.slot]
            pending = s.ids[start:]
            if pending:
                runs.append(Run(s.slot, pending, start, start, start))
                owners.append(s)
        runs_all = runs + (extra or [])
        if not runs_all:
            return torch.empty(0, runner.model.args.hidden_size, dtype=runner.dtype, device=runner.device)
        h = runner.forward(runs_all)
        pos = 0
        for run, s in zip(runs, owners):
            pos += len(run.tokens)
            cache.append(s.slot, len(run.tokens))
            s.last_hidden = h[pos - 1]
        return h[pos:]

    # -- verify ---------------------------------------------------------------
    def verify(self, calls: Sequence[VerifyCall]) -> list[VerifyOut]:
        if self.batch_invariant and len(calls) > 1:  # one request per forward and scoring
            return [self.verify([c])[0] for c in calls]
        return score_plans([self.lay_out(calls)])[0]

    def lay_out(self, calls: Sequence[VerifyCall]) -> VerifyPlan:
        """The verify forward over every request's packed candidates, laid out in
        scratch space above the prefix, not yet scored (see :class:`VerifyPlan`).

        Split from scoring so a crew scores several members on one device in one launch
        (:func:`score_plans`).
        """
        runner = self.runner
        seqs = [self._seq(c.request, c.prefix) for c in calls]
        encoded = [self._candidate_ids(c, s) for c, s in zip(calls, seqs)]
        fits = [room.fits(len(s.ids), sum(len(ids) for ids, _ in enc), self.capacity) for s, enc in zip(seqs, encoded)]
        todo = [(c, s, enc) for c, s, enc, ok in zip(calls, seqs, encoded, fits) if ok]
        layout, extra = [], []
        for c, s, enc in todo:
            if c.recompute:
                runner.cache.crop(s.slot, 0)
            P = len(s.ids)
            own = next((d for _, d in enc if d is not None), None)
            cursor = P + (own.reuse if own else 0)
            for ids, mine in enc:
                reuse = mine.reuse if mine else 0
                run = Run(s.slot, ids[reuse:], cursor, P + reuse, P + reuse)
                cursor += len(run.tokens)
                layout.append((s, ids, reuse, run, mine))
                if run.tokens:
                    extra.append(run)
        plan = [tuple(len(ids) for ids, _ in enc) if ok else None for enc, ok in zip(encoded, fits)]
        if not todo:
            return VerifyPlan(self, plan, None)
        h = self._catch_up([s for _, s, _ in todo], extra)
        return VerifyPlan(self, plan, self._branches(layout, h))

    def _candidate_ids(self, c: VerifyCall, s: _Seq) -> list[tuple[list[int], _Draft | None]]:
        """Each candidate in this member's tokens, with this member's own draft where it is one."""
        own = s.draft
        return [(own.ids, own) if m == self.name and own is not None else (self.encode(text), None)
                for m, text in c.candidates]

    def _branches(self, layout: list, h: torch.Tensor) -> tuple:
        rows, targets, offsets = [], [], [0]
        pos = 0
        for s, ids, reuse, run, own in layout:
            if s.branches is None:
                s.branches = []
            n = len(run.tokens)
            hb = h[pos : pos + n]
            pos += n
            base = own.hiddens[: reuse + 1] if reuse else [s.last_hidden]  # own draft: hiddens known
            seq = torch.cat([torch.stack(base), hb]) if n else torch.stack(base)
            rows.append(seq[: len(ids)])
            targets += ids
            offsets.append(offsets[-1] + len(ids))
            s.branches.append(_Branch(ids, run.qpos, n, reuse, seq[len(ids)]))
        return self.runner.scoring_problem(torch.cat(rows), targets, offsets)

    # -- commit ---------------------------------------------------------------
    def commit(self, calls: Sequence[CommitCall]) -> list[tuple[int, ...]]:
        """Append each winning text, keeping the K/V this member already has for it;
        returns the ids appended per call."""
        return [self._commit_one(c) for c in calls]

    def _commit_one(self, c: CommitCall) -> tuple[int, ...]:
        s = self._seq(c.request, c.prefix)
        cache = self.runner.cache
        P = cache.length[s.slot]
        if s.branches is not None and c.winner is not None:
            if P != len(s.ids):
                raise MemberStateError(f"{self.name}: request {c.request} verified without catching up")
            b = s.branches[c.winner]
            ids = b.ids
            cache.commit(s.slot, P, b.reuse)
            cache.commit(s.slot, b.qpos, b.fed)
            s.last_hidden = b.final_hidden
        elif s.draft is not None and s.draft.text == c.text:
            # this member drafted the winning text (or the same text, when agreement
            # skipped the verify pass): keep the K/V it wrote drafting it
            own = s.draft
            ids = own.ids
            if P == len(s.ids):
                cache.commit(s.slot, P, own.reuse)
                if own.reuse == len(ids):
                    s.last_hidden = own.hiddens[own.reuse]
        else:
            ids = self.encode(c.text)
        s.ids += ids
        s.draft, s.branches = None, None
        return tuple(ids)

