"""The verify side of a transformers-backend member (:class:`~.hf_member.HFMember`): every
candidate scored after the request's prefix, in one packed forward where the model takes a
4-D mask (requests stacked unless batch-invariant), else by branches over a copied prefix;
each branch keeps what a commit needs to make it the cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from specem_fast.members.interface import VerifyCall, VerifyOut
from specem_fast.model import hf_cache, room
from specem_fast.model.hf_runner import PackedRun

if TYPE_CHECKING:
    from specem_fast.members.local.hf_member import _Seq


@dataclass
class _Branch:
    ids: list[int]
    final: torch.Tensor  # logits after the branch's last token
    keep: torch.Tensor | None = None  # packed: cache positions of the sequence with this branch
    cache: object = None  # branches: the group cache holding this branch
    row: int = 0


class HFVerify:
    """Mixed into HFMember, whose runner, cache budget and request states it uses."""

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
