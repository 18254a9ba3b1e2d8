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

from specem_fast.members.local.codec_text import CodecText
from specem_fast.members.interface import CommitCall, DraftCall, DraftOut, MemberStateError, OpenCall, VerifyCall, VerifyOut, check_held
from specem_fast.model import hf_cache, room
from specem_fast.model.hf_runner import HFRunner, PackedRun
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


@dataclass
class _Branch:
    ids: list[int]
    final: torch.Tensor  # logits after the branch's last token
    keep: torch.Tensor | None = None  # packed: cache positions of the sequence with this branch
    cache: object = None  # branches: the group cache holding this branch
    row: int = 0


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


class HFMember(CodecText):
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
        d.reuse = 0 if c.recompute else _common_prefix(d.ids, d.tokens[: d.fed])
        return d

    def _held(self, s: _Seq, d: _Draft) -> DraftOut:
        s.extra = d.reuse
        d.logits = d.logits[: d.reuse + 1]
        s.draft = d
        return DraftOut(tuple(d.tokens), d.text, tuple(d.ids), d.stopped)

    # -- verify ---------------------------------------------------------------
    def verify(self, calls: Sequence[VerifyCall]) -> list[VerifyOut]:
        """In packed mode the requests' packed forwards are one forward (caches stacked,
        left-padded) unless batch-invariant; by branches each request runs on its own."""
        seqs = [self._seq(c.request, c.prefix) for c in calls]
        return self._verify_all(calls, seqs)

    @torch.inference_mode()
    def _verify_all(self, calls: Sequence[VerifyCall], seqs: list[_Seq]) -> list[VerifyOut]:
        out: list[VerifyOut | None] = [None] * len(calls)
        todo = []
        for i, (c, s) in enumerate(zip(calls, seqs)):
            prep = self._prepare_verify(c, s)
            if prep is None:
                out[i] = VerifyOut(room=False)
            elif self.runner.mode == "packed":
                todo.append((i, s, *prep, self._lay_out_packed(s, prep[0], prep[2])))
            else:
                enc, lengths, reuse = prep
                out[i] = self._scores(enc, lengths, self._verify_branches(s, enc, reuse))
        if len(todo) > 1 and not self.batch_invariant:
            caches, held, runs = [], [], []
            for _, s, _, _, _, (r, _) in todo:
                caches.append(s.cache)
                held.append(s.length + s.extra)
                runs.append(r)
            logits, caches = self.runner.feed_packed_batch(caches, held, runs)
            for (_, s, *_), cache in zip(todo, caches):
                s.cache = cache
        else:
            logits = [self.runner.feed_packed(s.cache, r) if r else None for _, s, _, _, _, (r, _) in todo]
        for (i, s, enc, lengths, reuse, (_, layout)), lg in zip(todo, logits):
            out[i] = self._scores(enc, lengths, self._finish_packed(s, layout, lg))
        return out

    def _prepare_verify(self, c: VerifyCall, s: _Seq):
        """(candidates in this member's tokens with its own draft where one is, their lengths,
        the own draft's kept positions), or None when they do not fit the cache budget."""
        own = s.draft
        enc = [(own.ids, own) if m == self.name and own is not None else (self.encode(t), None)
               for m, t in c.candidates]
        lengths = tuple(len(ids) for ids, _ in enc)
        if not room.fits(len(s.ids), sum(lengths), self.capacity):
            return None
        if any(n == 0 for n in lengths):
            raise ValueError("every candidate needs at least one token")
        if c.recompute:
            self._restart(s)
        if s.length < len(s.ids) and s.extra:  # pending tokens and a held draft do not go together
            self._rollback(s)
        return enc, lengths, own.reuse if own is not None and s.extra else 0

    def _scores(self, enc: list, lengths: tuple, rows: list) -> VerifyOut:
        targets = [t for ids, _ in enc for t in ids]
        lp, lg = self.runner.score(torch.cat(rows), targets, list(lengths))
        return VerifyOut(tuple(lp), tuple(lg), lengths=lengths)

    def _lay_out_packed(self, s: _Seq, enc: list, reuse: int) -> tuple[list[PackedRun], tuple]:
        """The packed forward's runs (pending tokens, then each candidate) and where each lies."""
        L, P = s.length, len(s.ids)
        runs, layout = [], []
        if L < P:
            runs.append(PackedRun(s.ids[L:], L, L))
        at = P - L
        for ids, mine in enc:
            r = reuse if mine is not None else 0
            run = PackedRun(ids[r:], P + r, P + r)
            layout.append((ids, r, at, len(run.tokens)))
            at += len(run.tokens)
            if run.tokens:
                runs.append(run)
        return runs, (L, P, L + s.extra, layout)

    def _finish_packed(self, s: _Seq, plan: tuple, logits: torch.Tensor | None) -> list:
        L, P, past, layout = plan
        first = logits[P - L - 1] if L < P else s.next_logits
        s.length, s.next_logits = P, first  # the pending tokens are in the cache now
        rows, s.branches = [], []
        dev = self.runner.device
        base = torch.arange(P, device=dev)
        for ids, r, at, n in layout:
            head = torch.stack(s.draft.logits[: r + 1]) if r else first[None]
            seq = torch.cat([head, logits[at : at + n]]) if n else head
            rows.append(seq[: len(ids)])
            keep = [base]
            if r:
                keep.append(torch.arange(P, P + r, device=dev))
            if n:
                keep.append(torch.arange(past + at, past + at + n, device=dev))
            s.branches.append(_Branch(ids, seq[len(ids)], keep=torch.cat(keep)))
        return rows

    def _verify_branches(self, s: _Seq, enc: list, reuse: int) -> list:
        runner = self.runner
        P = len(s.ids)
        if s.extra:  # own draft held: the others start from the prefix without it
            own_base = s.cache
            if s.snapshot is not None:
                prefix = s.snapshot
            else:
                prefix = hf_cache.clone(s.cache)
                hf_cache.crop(prefix, s.length)
        else:
            self._catch_up(s)
            own_base = prefix = s.cache
        first = s.next_logits
        groups: dict[tuple[bool, int], list[int]] = {}
        for i, (ids, mine) in enumerate(enc):
            r = reuse if mine is not None else 0
            groups.setdefault((r > 0, len(ids) - r), []).append(i)
        out: list = [None] * len(enc)
        dev = runner.device
        for (is_own, n), members in groups.items():
            src = own_base if is_own else prefix
            start = P + (reuse if is_own else 0)
            if n == 0:  # the own draft, wholly held already
                d = s.draft
                for i in members:
                    out[i] = (torch.stack(d.logits[:reuse]), _Branch(enc[i][0], d.logits[reuse], cache=src, row=-1))
                continue
            cache = hf_cache.clone(src)
            hf_cache.select_rows(cache, torch.zeros(len(members), dtype=torch.long, device=dev))
            r = reuse if is_own else 0
            ids = torch.tensor([enc[i][0][r:] for i in members], dtype=torch.long, device=dev)
            pos = torch.arange(start, start + n, device=dev)[None].expand(len(members), n)
            logits = runner.forward(cache, ids, pos)
            for row, i in enumerate(members):
                head = torch.stack(s.draft.logits[: r + 1]) if r else first[None]
                seq = torch.cat([head, logits[row]])
                out[i] = (seq[: len(enc[i][0])], _Branch(enc[i][0], seq[len(enc[i][0])], cache=cache, row=row))
        s.branches = [b for _, b in out]
        return [rows for rows, _ in out]

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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
