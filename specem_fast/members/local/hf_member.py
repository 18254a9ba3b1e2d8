"""A local member on the transformers backend: an :class:`HFRunner` behind the member interface.

Same contract as :class:`~specem_fast.members.local.member.LocalMember`, same text
hand-off (its :class:`~specem_fast.model.text.TextCodec`: drafts cut at word
boundaries the same way). Each request holds a transformers cache of its own.
Invariant per request: the cache holds ``ids[:length]`` (plus, between a draft
and the round's commit, the ``extra`` positions of this member's own draft);
``ids[length:]`` is pending and goes into the next forward; with nothing pending
``next_logits`` predicts the next token. No committed token is processed twice:
the kept draft positions or the winning verify branch become the cache.

Drafting batches the requests where the model takes a custom attention mask: their
caches are stacked, left-padded to the longest, and every decode step is one forward
with a mask that hides the padding. Verification runs one request per forward, and a
recurrent model (whose state a padded batch would disturb) drafts one request at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from specem_fast.members.local.codec_text import CodecText, common_prefix
from specem_fast.members.local.hf_verify import HFVerify, _Branch
from specem_fast.members.interface import CommitCall, DraftCall, DraftOut, MemberStateError, OpenCall, check_held
from specem_fast.model import hf_cache
from specem_fast.model.hf_runner import HFRunner
from specem_fast.model.sampling import sample_tokens


@dataclass
class _Draft:
    tokens: list[int]
    logits: list[torch.Tensor]  # logits[j] predicts tokens[j]; len fed + 1
    stopped: bool
    text: str = ""
    ids: list[int] = field(default_factory=list)
    reuse: int = 0  # leading ids whose cache positions (or state) from drafting are kept

    @property
    def fed(self) -> int:
        return len(self.logits) - 1


@dataclass(eq=False)
class _Seq:
    ids: list[int]
    temperature: float
    top_p: float
    generator: torch.Generator | None
    cache: object
    length: int = 0
    extra: int = 0  # own-draft positions held above ``length``
    next_logits: torch.Tensor | None = None
    snapshot: object = None  # recurrent models: the cache at ``length`` while a draft's state is held
    draft: _Draft | None = None
    branches: list[_Branch] | None = None


class HFMember(CodecText, HFVerify):
    """One model run by transformers in this process."""

    def __init__(self, runner: HFRunner, capacity: int, batch_invariant: bool = False):
        """``batch_invariant``: requests draft one after another, never stacked, so a request's
        answer does not depend on its batch (verify is per request either way)."""
        self.runner = runner
        self.batch_invariant = batch_invariant
        self.name = runner.name
        self.capacity = capacity
        self._seqs: dict[int, _Seq] = {}

    @property
    def requests(self) -> list[int]:
        return list(self._seqs)

    def describe(self) -> dict:
        r = self.runner
        return {"kind": "local", "backend": "transformers", "device": str(r.device),
                "dtype": str(r.dtype).replace("torch.", ""), "kernels": r.kernel_path, "verify": r.mode,
                "architecture": r.config.model_type}

    def shutdown(self) -> None:
        self._seqs.clear()

    # -- requests -------------------------------------------------------------
    def open(self, calls: Sequence[OpenCall]) -> None:
        for c in calls:
            if c.request in self._seqs:
                raise MemberStateError(f"{self.name} already holds request {c.request}")
            gen = None
            if c.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(c.seed)
            self._seqs[c.request] = _Seq(list(c.ids), c.temperature, c.top_p, gen, self.runner.new_cache())

    def close(self, requests: Sequence[int]) -> None:
        for r in requests:
            self._seqs.pop(r, None)

    def _seq(self, request: int, prefix: int) -> _Seq:
        s = self._seqs.get(request)
        check_held(self.name, request, s.ids if s is not None else None, prefix)
        return s

    def _rollback(self, s: _Seq) -> None:
        """Drop whatever the cache holds above the committed ``length``."""
        if s.snapshot is not None:
            s.cache, s.snapshot = s.snapshot, None
        elif not self.runner.recurrent and hf_cache.length(s.cache) > s.length:
            hf_cache.crop(s.cache, s.length)
        s.extra = 0

    def _restart(self, s: _Seq) -> None:
        """The reference cost model: the cache is rebuilt from the start."""
        s.cache, s.snapshot, s.extra, s.length, s.next_logits = self.runner.new_cache(), None, 0, 0, None

    def _catch_up(self, s: _Seq) -> None:
        pending = s.ids[s.length:]
        if pending:
            s.next_logits = self.runner.feed(s.cache, pending, s.length)[-1]
            s.length = len(s.ids)
        elif s.next_logits is None:
            raise MemberStateError(f"{self.name}: a request with no tokens cannot be continued")

    # -- draft ----------------------------------------------------------------
    def draft(self, calls: Sequence[DraftCall]) -> list[DraftOut]:
        """Requests draft together (one forward per step, caches stacked left-padded) where the
        model takes a custom mask; a recurrent model drafts them one after another."""
        seqs = [self._seq(c.request, c.prefix) for c in calls]
        for c, s in zip(calls, seqs):
            self._start_draft(c, s)
        if self.runner.mode == "packed" and len(calls) > 1 and not self.batch_invariant:
            return self._draft_stacked(calls, seqs)
        return [self._draft_one(c, s) for c, s in zip(calls, seqs)]

    def _start_draft(self, c: DraftCall, s: _Seq) -> None:
        s.draft, s.branches = None, None
        self._rollback(s)
        if c.recompute:
            self._restart(s)
        self._catch_up(s)
        if self.runner.recurrent:  # a recurrent state cannot be cropped back: keep the prefix's
            s.snapshot = hf_cache.clone(s.cache)

    def _stop_set(self, c: DraftCall) -> set[int]:
        return set() if c.ignore_stop else {int(t) for t in self.runner.codec.stop_ids}

    @torch.inference_mode()
    def _draft_one(self, c: DraftCall, s: _Seq) -> DraftOut:
        stop_set = self._stop_set(c)
        tokens: list[int] = []
        logits = [s.next_logits]
        stopped = False
        for j in range(c.window):
            tok = int(sample_tokens(logits[-1][None], s.temperature, s.top_p, [s.generator])[0])
            if tok in stop_set:
                stopped = True
                break
            tokens.append(tok)
            if j == c.window - 1:
                break  # the last sampled token waits for the next round
            logits.append(self.runner.feed(s.cache, [tok], s.length + j)[-1])
        d = self._finish_draft(c, s, _Draft(tokens, logits, stopped))
        if self.runner.recurrent:
            if d.reuse != d.fed:  # the state went past the kept ids: back to the prefix's
                s.cache, s.snapshot, d.reuse = s.snapshot, None, 0
        else:
            hf_cache.crop(s.cache, s.length + d.reuse)
        return self._held(s, d)

    @torch.inference_mode()
    def _draft_stacked(self, calls: Sequence[DraftCall], seqs: list[_Seq]) -> list[DraftOut]:
        runner = self.runner
        lengths = [s.length for s in seqs]
        top = max(lengths)
        pads = [top - n for n in lengths]
        batch = hf_cache.stack([s.cache for s in seqs], lengths, runner.config)
        stops = [self._stop_set(c) for c in calls]
        tokens: list[list[int]] = [[] for _ in seqs]
        logits = [[s.next_logits] for s in seqs]
        stopped = [False] * len(seqs)
        going = list(range(len(seqs)))
        cur = torch.stack([s.next_logits for s in seqs])
        last = [0] * len(seqs)
        for j in range(max(c.window for c in calls)):
            drawn = torch.cat([sample_tokens(cur[i][None], seqs[i].temperature, seqs[i].top_p, [seqs[i].generator])
                               for i in going]).tolist()
            fed = []
            for i, tok in zip(going, drawn):
                if tok in stops[i]:
                    stopped[i] = True
                    continue
                tokens[i].append(tok)
                last[i] = tok
                if j < calls[i].window - 1:
                    fed.append(i)
            if not fed:
                break
            step = torch.tensor(last, dtype=torch.long, device=runner.device)  # rows not fed: ignored
            cur = runner.decode_rows(batch, step, [n + j for n in lengths], pads)
            for i in fed:
                logits[i].append(cur[i])
            going = fed
        out = []
        for i, (c, s) in enumerate(zip(calls, seqs)):
            d = self._finish_draft(c, s, _Draft(tokens[i], logits[i], stopped[i]))
            s.cache = hf_cache.unstack(batch, i, pads[i], top + d.reuse, runner.config)
            out.append(self._held(s, d))
        return out

    def _finish_draft(self, c: DraftCall, s: _Seq, d: _Draft) -> _Draft:
        d.text, d.ids = self.runner.codec.draft_segment(s.ids, d.tokens, d.stopped, exact=c.raw, alone=c.alone)
        d.reuse = 0 if c.recompute else common_prefix(d.ids, d.tokens[: d.fed])
        return d

    def _held(self, s: _Seq, d: _Draft) -> DraftOut:
        s.extra = d.reuse
        d.logits = d.logits[: d.reuse + 1]
        s.draft = d
        return DraftOut(tuple(d.tokens), d.text, tuple(d.ids), d.stopped)

    # -- commit ---------------------------------------------------------------
    def commit(self, calls: Sequence[CommitCall]) -> list[tuple[int, ...]]:
        return [self._commit_one(c) for c in calls]

    @torch.inference_mode()
    def _commit_one(self, c: CommitCall) -> tuple[int, ...]:
        s = self._seq(c.request, c.prefix)
        if s.branches is not None and c.winner is not None:
            b = s.branches[c.winner]
            ids = b.ids
            if b.keep is not None:
                hf_cache.keep_positions(s.cache, b.keep)
            elif b.row >= 0:
                hf_cache.select_rows(b.cache, torch.tensor([b.row], device=self.runner.device))
                s.cache = b.cache
            else:
                s.cache = b.cache
            s.length, s.next_logits = len(s.ids) + len(ids), b.final
            s.snapshot, s.extra = None, 0
        elif s.draft is not None and s.draft.text == c.text and s.length == len(s.ids):
            d = s.draft
            ids = d.ids
            s.length += s.extra
            s.snapshot, s.extra = None, 0
            s.next_logits = d.logits[d.reuse] if d.reuse == len(ids) else None
        else:
            self._rollback(s)
            ids = self.encode(c.text)
        s.ids += ids
        s.draft, s.branches = None, None
        return tuple(ids)

