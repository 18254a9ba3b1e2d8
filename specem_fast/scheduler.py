"""The rounds: draft, verify, select, commit, for a batch of requests.

The scheduler only moves tokens between the model runtimes, the KV-cache
manager and the scoring functions; the math lives in :mod:`.scoring` and the
kernels. Cache invariant per (model, request): positions below the cache's
committed length hold ``ids[:length]``; ``ids[length:]`` is pending and gets
processed by the model's next forward; when nothing is pending,
``last_hidden`` is the hidden state of the last committed token, which
predicts the next one. No committed token is ever processed twice in cached
mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import scoring
from .config import GenerationSettings
from .results import Candidate, GenerationResult, RoundRecord
from .parallel import MemberPool
from .runtime import ModelRunner, Run, score_all
from .sampling import sample_tokens
from .text import trim_to_word_boundary


@dataclass
class SeqState:
    """One model's view of one request."""

    ids: list[int]
    prompt_len: int
    last_hidden: torch.Tensor | None = None
    generator: torch.Generator | None = None


@dataclass
class Draft:
    model: str
    tokens: list[int]  # sampled, stop token excluded
    fed: int  # tokens[:fed] have K/V above the committed length
    hiddens: list[torch.Tensor]  # hiddens[j] predicts tokens[j]; len fed + 1
    ended_with_stop: bool
    text: str = ""
    own_ids: list[int] = field(default_factory=list)  # the drafter's encoding of text
    reuse: int = 0  # leading own_ids whose K/V from drafting is kept
    encoded: dict[str, list[int]] = field(default_factory=dict)  # text in other models' tokens, encoded once


@dataclass
class Branch:
    """Where a verifier put one candidate in its scratch region."""

    ids: list[int]  # the candidate in the verifier's tokens
    qpos: int
    fed: int
    reuse: int
    final_hidden: torch.Tensor


@dataclass
class Request:
    prompt: str
    settings: GenerationSettings
    slot: int
    seqs: dict[str, SeqState]
    weights: dict[str, float]
    drafting: list[str]  # drafters that have not exited
    answer: str = ""
    rounds: list[RoundRecord] = field(default_factory=list)
    stop_reason: str | None = None
    timings: dict[str, float] = field(default_factory=lambda: {"draft_s": 0.0, "verify_s": 0.0, "commit_s": 0.0})
    started: float = field(default_factory=time.perf_counter)
    first_segment_s: float | None = None
    low_rounds: dict[str, int] = field(default_factory=dict)  # rounds in a row a drafter started below exit_threshold


class Scheduler:
    def __init__(self, runners: dict[str, ModelRunner], drafters: list[str], verifiers: list[str], cache,
                 parallel: str = "auto"):
        self.runners = runners
        self.drafters = drafters
        self.verifiers = verifiers
        self.learners = [m for m in drafters if m in verifiers]
        self.cache = cache
        # per-member work of a round (drafting, a verifier's forward) on one thread per device group
        interpreted = any(r.triton and r.device.type == "cpu" for r in runners.values())
        self.pool = MemberPool({n: r.device for n, r in runners.items()}, parallel, interpreted)
        self._groups: dict[str, dict] = {}  # per drafter: sampling groups of the round it drafts (see _choose)

    # -- requests ---------------------------------------------------------------
    def open(self, prompt: str, settings: GenerationSettings, prompt_ids: dict[str, list[int]],
             weights: dict[str, float], slot: int) -> Request:
        """A request in ``slot`` (freshly allocated, empty), starting from ``weights`` (one per verifier).

        The caller owns the slot: it allocated it and frees it, whether this,
        any round or :meth:`close` succeeds or raises.
        """
        seqs = {}
        for i, (name, r) in enumerate(self.runners.items()):
            gen = None
            if not settings.greedy:  # on the model's device: sampling never leaves it
                gen = torch.Generator(device=r.device).manual_seed(settings.seed * 1_000_003 + i)
            seqs[name] = SeqState(ids=list(prompt_ids[name]), prompt_len=len(prompt_ids[name]), generator=gen)
        return Request(prompt, settings, slot, seqs, dict(weights), list(self.drafters))

    def close(self, req: Request) -> GenerationResult:
        """The finished request's result (its slot is the caller's to free)."""
        total = time.perf_counter() - req.started
        counts = {m: len(s.ids) - s.prompt_len for m, s in req.seqs.items()}
        timings = dict(req.timings, total_s=total, first_segment_s=req.first_segment_s or total)
        return GenerationResult(
            prompt=req.prompt,
            text=req.answer,
            stop_reason=req.stop_reason or "length",
            new_tokens=counts[req.drafting[0]],
            tokens_per_model=counts,
            rounds=req.rounds,
            timings=timings,
            settings=req.settings.to_dict(),
        )

    # -- one round for all active requests ---------------------------------------
    def round(self, reqs: list[Request]) -> Iterator[tuple[Request, RoundRecord]]:
        for r in reqs:  # no room to draft: the request ends with what it has
            if any(len(r.seqs[m].ids) + self._window(r) > self.runners[m].cache.capacity for m in self.drafters):
                r.stop_reason = "cache_full"
        reqs = [r for r in reqs if not r.stop_reason]
        for r in reqs:
            self._apply_exit(r)
        recompute = {r.slot for r in reqs if r.settings.mode == "recompute"}
        t0 = time.perf_counter()
        drafts = {r.slot: [] for r in reqs}
        mine = {m: [r for r in reqs if m in r.drafting] for m in self.drafters}
        for m, ds in zip(self.drafters, self.pool.map(lambda m: self._draft(m, mine[m], recompute), self.drafters)):
            for r, d in zip(mine[m], ds):
                drafts[r.slot].append(d)
        t1 = time.perf_counter()

        cands: dict[int, list[Draft]] = {}
        fast: dict[int, Draft] = {}
        for r in reqs:
            ds = drafts[r.slot]
            cands[r.slot] = [d for d in ds if d.text]
            if r.settings.fast_eos:
                ended = [d for d in ds if d.ended_with_stop]
                if ended:
                    fast[r.slot] = ended[0]
            texts = {d.text for d in cands[r.slot]}
            # One candidate: verifying cannot change the pick (and with one
            # candidate every reward is 0, so the weights stay). Identical
            # candidates: the verifiers would score the same ids alike.
            if r.slot not in fast and (len(cands[r.slot]) == 1 or (r.settings.skip_agreed and len(texts) == 1)):
                fast[r.slot] = cands[r.slot][0]
        to_verify = [r for r in reqs if r.slot not in fast and cands[r.slot]]
        for r in to_verify:
            if not self._verify_fits(r, cands[r.slot]):
                r.stop_reason = "cache_full"
        to_verify = [r for r in to_verify if not r.stop_reason]
        branches, raw = self._verify(to_verify, cands, recompute)
        t2 = time.perf_counter()

        for r in reqs:
            ds = cands[r.slot]
            if r.slot in fast:
                win = fast[r.slot]
                shown = ds if win in ds else ds + [win]
                record = self._record(r, shown, {}, {}, [], shown.index(win), win, drafts[r.slot], verified=False)
                start = len(r.answer)
                appended = self._commit(r, win, drafts[r.slot], {})
                self._check_finished(r, win, appended)
                if win.ended_with_stop and r.settings.fast_eos and r.stop_reason != "stop_string":
                    r.stop_reason = "fast_eos"
            elif r.stop_reason == "cache_full":
                continue
            elif not ds:
                r.stop_reason = "stop" if any(d.ended_with_stop for d in drafts[r.slot]) else "empty"
                continue
            else:
                record, win = self._select(r, ds, raw[r.slot], drafts[r.slot])
                start = len(r.answer)
                appended = self._commit(r, win, drafts[r.slot], branches.get(r.slot, {}))
                self._check_finished(r, win, appended)
            record.accepted = r.answer[start:]
            record.answer_chars = len(r.answer)
            t3 = time.perf_counter()
            record.seconds = {"draft": t1 - t0, "verify": t2 - t1, "commit": t3 - t2}
            r.timings["draft_s"] += t1 - t0
            r.timings["verify_s"] += t2 - t1
            r.timings["commit_s"] += t3 - t2
            if r.first_segment_s is None:
                r.first_segment_s = t3 - r.started
            r.rounds.append(record)
            yield r, record

    # -- draft -------------------------------------------------------------------
    def _catch_up(self, runner: ModelRunner, reqs: list[Request], extra: list[Run] | None = None):
        """Process pending tokens (plus optional extra runs) in one forward.

        Returns the hidden states of the extra runs, in order.
        """
        cache = runner.cache
        runs, owners = [], []
        for r in reqs:
            s = r.seqs[runner.name]
            start = cache.length[r.slot]
            pending = s.ids[start:]
            if pending:
                runs.append(Run(r.slot, pending, start, start, start))
                owners.append(r)
        runs_all = runs + (extra or [])
        if not runs_all:
            return torch.empty(0, runner.model.args.hidden_size, dtype=runner.dtype, device=runner.device)
        h = runner.forward(runs_all)
        pos = 0
        for run, r in zip(runs, owners):
            pos += len(run.tokens)
            cache.append(r.slot, len(run.tokens))
            r.seqs[runner.name].last_hidden = h[pos - 1]
        return h[pos:]

    def _draft(self, m: str, reqs: list[Request], recompute: set[int]) -> list[Draft]:
        runner = self.runners[m]
        cache = runner.cache
        for r in reqs:
            if r.slot in recompute:  # the reference cost model: no cache across rounds
                cache.crop(r.slot, 0)
        self._catch_up(runner, reqs)
        limits = [self._window(r) for r in reqs]
        drafts = self._draft_tokens(runner, reqs, limits)
        for d, r in zip(drafts, reqs):
            text = runner.codec.decode(d.tokens)
            if r.drafting == [m] and d.tokens and self._decodes_on(runner, r.seqs[m].ids, d.tokens, text):
                # Drafting alone (the others exited, or one drafter): no other
                # tokenizer has to start on this boundary, so the drafter keeps
                # the exact ids it sampled, as if it decoded alone.
                d.text, d.own_ids = text, list(d.tokens)
            else:
                d.text = text if d.ended_with_stop else trim_to_word_boundary(text)
                d.own_ids = runner.codec.encode_segment(d.text) if d.text else []
            if r.slot not in recompute:
                d.reuse = _common_prefix(d.own_ids, d.tokens[: d.fed])
        return drafts

    @torch.inference_mode()  # sampled tokens too: the compiled step sees one kind of tensor
    def _draft_tokens(self, runner: ModelRunner, reqs: list[Request], limits: list[int]) -> list[Draft]:
        """Up to ``limits[i]`` sampled tokens per request, stop token excluded.

        Host work happens once per round: before the loop, every step's
        placement and attention plan (:meth:`ModelRunner.plan_draft`); after it,
        one read of all sampled tokens. The steps between read nothing back, so
        on a GPU they queue up without waiting. Stop tokens are looked for after
        the loop: a draft that sampled one drafts on with the others and is cut
        afterwards (its extra K/V lies in scratch space above the committed
        length), and a sampled request's generator is put back to where that
        token left it, so the draws are those of a draft that stopped there.
        """
        if not reqs:
            return []
        m = runner.name
        counts = [n - 1 for n in limits]  # tokens fed: the last sampled token waits for the next round
        steps = runner.plan_draft([r.slot for r in reqs], [runner.cache.length[r.slot] for r in reqs], counts)
        stop_set = {int(t) for t in runner.codec.stop_ids}
        stops = torch.tensor(sorted(stop_set), dtype=torch.long).to(runner.device)
        gens = [r.seqs[m].generator for r in reqs]
        states: dict[tuple[int, int], torch.Tensor] = {}
        self._groups[m] = {}
        for j in sorted(set(counts)):  # each set of requests a step samples for
            self._sampling_groups([r for r, c in zip(reqs, counts) if c >= j], m, runner.device)
        first = torch.stack([r.seqs[m].last_hidden for r in reqs])
        toks, hs = self._draft_loop(runner, reqs, steps, first, stops, gens, states, _StopProbe(runner.device))
        flat = torch.cat(toks).tolist()  # the round's one device->host read
        seqs: list[list[int]] = [[] for _ in reqs]
        rows, at = list(range(len(reqs))), 0
        for j in range(len(toks)):
            for i in rows:
                seqs[i].append(flat[at])
                at += 1
            if j < len(steps):
                rows = steps[j].rows
        drafts = []
        for i, (r, seq) in enumerate(zip(reqs, seqs)):
            s = next((k for k, t in enumerate(seq) if t in stop_set), None)
            fed = counts[i] if s is None else s
            if s is not None and gens[i] is not None and (i, s + 1) in states:
                gens[i].set_state(states[i, s + 1])
            hiddens = [r.seqs[m].last_hidden] + [hs[j][steps[j].rows.index(i)] for j in range(fed)]
            drafts.append(Draft(m, seq if s is None else seq[:s], fed, hiddens, s is not None))
        return drafts

    def _draft_loop(self, runner: ModelRunner, reqs: list[Request], steps: list, hidden: torch.Tensor,
                    stops: torch.Tensor, gens: list, states: dict,
                    probe: "_StopProbe") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The per-token loop: sample, feed, repeat, all on the device.

        Returns the sampled tokens of every step (rows: the requests still
        drafting) and the hidden states of every fed step. Ends early only when
        every draft still to be fed has sampled a stop token, which the host
        learns without waiting on the device (:class:`_StopProbe`).
        """
        toks, hs = [], []
        rows = list(range(len(reqs)))
        going = None  # per row of this step: no stop token sampled yet
        for j in range(len(steps) + 1):
            for i in rows:  # where each generator stands before this step's draw
                if j and gens[i] is not None:
                    states[i, j] = gens[i].get_state()
            tok = self._choose(runner.logits(hidden), [reqs[i] for i in rows], runner.name)
            toks.append(tok)
            going = ~torch.isin(tok, stops) if going is None else going & ~torch.isin(tok, stops)
            if j == len(steps):
                break
            step = steps[j]
            if step.keep is not None:
                tok, going = tok[step.keep], going[step.keep]
            if probe.all_stopped(going.any()):
                break
            step.tokens = tok
            hidden = runner.forward(step)
            hs.append(hidden)
            rows = step.rows
        return toks, hs

    @staticmethod
    def _decodes_on(runner: ModelRunner, ids: list[int], new: list[int], text: str) -> bool:
        """Whether ``new`` decodes to ``text`` after the sequence's last tokens too, so
        the answer text stays the decode of the drafter's ids (a character split
        across the boundary, or a decoder that drops a leading space, would not)."""
        def raw(x: list[int]) -> str:
            return runner.codec.tok.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        tail = ids[-8:]
        joined = raw(tail + new)
        return bool(text) and not joined.endswith("\ufffd") and joined == raw(tail) + text

    def _choose(self, logits: torch.Tensor, reqs: list[Request], m: str) -> torch.Tensor:
        """The next token of each row, as a device tensor [rows].

        Requests may differ in sampling settings: rows are grouped by
        (temperature, top_p), with the groups' index tensors made before the
        round's loop (:meth:`_sampling_groups`).
        """
        out = None
        for (temp, top_p), rows, index in self._sampling_groups(reqs, m, logits.device):
            gens = [reqs[i].seqs[m].generator for i in rows]
            if index is None:
                return sample_tokens(logits, temp, top_p, gens)
            if out is None:
                out = torch.empty(len(reqs), dtype=torch.long, device=logits.device)
            out[index] = sample_tokens(logits[index], temp, top_p, gens)
        return out

    def _sampling_groups(self, reqs: list[Request], m: str, device: torch.device) -> list[tuple]:
        """((temperature, top_p), rows, row index tensor or None when one group) per group;
        made before a round's loop for each set of requests it samples for."""
        key = tuple(id(r) for r in reqs)
        made = self._groups.setdefault(m, {})  # each drafter's entry is touched by its own worker only
        groups = made.get(key)
        if groups is None:
            by: dict[tuple[float, float], list[int]] = {}
            for i, r in enumerate(reqs):
                by.setdefault((r.settings.temperature, r.settings.top_p), []).append(i)
            groups = [(st, rows, None if len(by) == 1 else torch.tensor(rows).to(device)) for st, rows in by.items()]
            made[key] = groups
        return groups

    def _apply_exit(self, r: Request) -> None:
        """Model exit: a drafter whose weight started ``exit_patience`` rounds in a
        row below ``exit_threshold`` stops drafting for the rest of the request.

        Only drafters with a weight (those that verify) can exit, and the
        heaviest drafter never does, so someone always drafts.
        """
        st = r.settings
        if st.exit_threshold is None or st.hedge_lr is None:
            return
        weighted = [m for m in r.drafting if m in r.weights]
        if not weighted:
            return
        keep = max(weighted, key=lambda m: r.weights[m])
        for m in weighted:
            low = r.weights[m] < st.exit_threshold
            r.low_rounds[m] = r.low_rounds.get(m, 0) + 1 if low else 0
            if m != keep and r.low_rounds[m] >= st.exit_patience:
                r.drafting.remove(m)

    def _window(self, r: Request) -> int:
        lead = r.seqs[r.drafting[0]]
        done = len(lead.ids) - lead.prompt_len
        return max(1, min(r.settings.window, r.settings.max_new_tokens - done))

    # -- verify ------------------------------------------------------------------
    def _verify_fits(self, r: Request, cands: list[Draft]) -> bool:
        """Whether every verifier has cache room for the request's packed candidates."""
        for v in self.verifiers:
            need = len(r.seqs[v].ids) + sum(len(self._ids_in(d, v)) for d in cands)
            if need > self.runners[v].cache.capacity:
                return False
        return True

    def _ids_in(self, d: Draft, m: str) -> list[int]:
        """The draft's text in model m's tokens (the fit check and the verify pass share it)."""
        if d.model == m:
            return d.own_ids
        if m not in d.encoded:
            d.encoded[m] = self.runners[m].codec.encode_segment(d.text)
        return d.encoded[m]

    def _verify(self, reqs: list[Request], cands: dict[int, list[Draft]], recompute: set[int]):
        """One forward per verifier over every request's packed candidates."""
        branches: dict[int, dict[str, list[Branch]]] = {r.slot: {} for r in reqs}
        raw: dict[int, dict[str, list[float]]] = {r.slot: {} for r in reqs}
        if not reqs:
            return branches, raw
        laid = self.pool.map(lambda v: self._verify_pass(v, reqs, cands, recompute), self.verifiers)
        for v, (mine, _) in zip(self.verifiers, laid):
            for slot, bs in mine.items():
                branches[slot][v] = bs
        problems = [problem for _, problem in laid]
        for v, sc in zip(self.verifiers, score_all([self.runners[v] for v in self.verifiers], problems)):
            lp, lg = sc.mean_logprob.tolist(), sc.mean_logit.tolist()
            c = 0
            for r in reqs:
                k = len(cands[r.slot])
                raw[r.slot][v] = (lp if r.settings.score == "logprob" else lg)[c : c + k]
                c += k
        return branches, raw

    def _verify_pass(self, v: str, reqs: list[Request], cands: dict[int, list[Draft]], recompute: set[int]):
        """Verifier v's forward over every request's candidates, laid out in scratch
        space above the prefix; returns its branches per slot and its scoring problem."""
        runner = self.runners[v]
        cache = runner.cache
        for r in reqs:
            if r.slot in recompute:
                cache.crop(r.slot, 0)
        plan = []  # (request, candidate ids, reuse, Run, draft)
        extra: list[Run] = []
        prefix = {r.slot: len(r.seqs[v].ids) for r in reqs}  # after catching up
        for r in reqs:
            P = prefix[r.slot]
            own = [d for d in cands[r.slot] if d.model == v]
            cursor = P + (own[0].reuse if own else 0)
            for d in cands[r.slot]:
                ids = self._ids_in(d, v)
                reuse = d.reuse if d.model == v else 0
                run = Run(r.slot, ids[reuse:], cursor, P + reuse, P + reuse)
                cursor += len(run.tokens)
                plan.append((r, ids, reuse, run, d))
                if run.tokens:
                    extra.append(run)
        h = self._catch_up(runner, reqs, extra)
        rows, targets, offsets = [], [], [0]
        mine: dict[int, list[Branch]] = {r.slot: [] for r in reqs}
        pos = 0
        for r, ids, reuse, run, d in plan:
            s = r.seqs[v]
            n = len(run.tokens)
            hb = h[pos : pos + n]
            pos += n
            if reuse:  # own draft: the drafting pass already has these hiddens
                base = d.hiddens[: reuse + 1]
            else:
                base = [s.last_hidden]
            seq = torch.cat([torch.stack(base), hb]) if n else torch.stack(base)
            rows.append(seq[: len(ids)])
            targets += ids
            offsets.append(offsets[-1] + len(ids))
            mine[r.slot].append(Branch(ids, run.qpos, n, reuse, seq[len(ids)]))
        return mine, runner.scoring_problem(torch.cat(rows), targets, offsets)

    # -- select & commit -----------------------------------------------------------
    def _select(self, r: Request, ds: list[Draft], raw: dict[str, list[float]], drafted: list[Draft]):
        st = r.settings
        t = len(r.rounds) + 1
        norm = {v: scoring.normalise(raw[v], st.score) for v in self.verifiers}
        models = [d.model for d in ds]
        if st.hedge_lr is None:
            weights = None
        else:
            rewards = scoring.win_rate_rewards(norm, models, self.learners, st.self_votes)
            eta = scoring.hedge_learning_rate(st.hedge_lr, len(self.learners), t, st.hedge_schedule)
            r.weights = scoring.hedge_update(r.weights, rewards, eta)
            weights = r.weights
        combined = scoring.combine(norm, weights, None if st.self_votes else models)
        w = scoring.argmax_first(combined)
        return self._record(r, ds, raw, norm, combined, w, ds[w], drafted, verified=True), ds[w]

    def _record(self, r, ds, raw, norm, combined, w, win, drafted, verified) -> RoundRecord:
        return RoundRecord(
            index=len(r.rounds) + 1,
            candidates=[Candidate(d.model, d.text, d.ended_with_stop, len(d.tokens)) for d in ds],
            raw_scores=raw,
            scores=norm,
            weights=dict(r.weights),
            combined=combined,
            winner=w,
            winner_model=win.model,
            seconds={},
            drafters=[d.model for d in drafted],
            verified=verified,
        )

    def _commit(self, r: Request, win: Draft, drafts: list[Draft], branches: dict[str, list[Branch]]) -> dict[str, int]:
        """Append the winner's text to every model's sequence, keeping reusable K/V.

        Returns how many ids each model's sequence grew by.
        """
        r.answer += win.text
        appended = {}
        for m, runner in self.runners.items():
            s = r.seqs[m]
            cache = runner.cache
            P = cache.length[r.slot]
            assert P == len(s.ids) or m not in branches, "verifier must be caught up"
            if m in branches:
                # branches follow the order of the competing (non-empty) drafts
                b = branches[m][[d.model for d in drafts if d.text].index(win.model)]
                ids = b.ids
                cache.commit(r.slot, P, b.reuse)
                cache.commit(r.slot, b.qpos, b.fed)
                s.last_hidden = b.final_hidden
            elif (own := _same_text_draft(drafts, m, win)) is not None:
                # m drafted the winning text (or, skipping verification on
                # agreement, the same text): keep the K/V it wrote drafting it
                ids = own.own_ids
                if P == len(s.ids):
                    cache.commit(r.slot, P, own.reuse)
                    if own.reuse == len(ids):
                        s.last_hidden = own.hiddens[own.reuse]
            else:
                ids = self._ids_in(win, m)
            s.ids += ids
            appended[m] = len(ids)
        return appended

    def _check_finished(self, r: Request, win: Draft, appended: dict[str, int]) -> None:
        st = r.settings
        for stop in st.stop:
            cut = r.answer.find(stop)
            if cut >= 0:
                r.answer = r.answer[:cut]
                r.stop_reason = "stop_string"
                return
        if win.ended_with_stop:
            r.stop_reason = "stop"
            return
        first = r.seqs[r.drafting[0]]
        excess = len(first.ids) - first.prompt_len - st.max_new_tokens
        if excess >= 0:
            r.stop_reason = "length"
            if excess:
                self._trim_to_budget(r, win, appended, excess)

    def _trim_to_budget(self, r: Request, win: Draft, appended: dict[str, int], excess: int) -> None:
        """Cut the last segment so the answer is exactly max_new_tokens of the lead drafter's tokens.

        Another model's segment can be longer in the lead drafter's tokens than
        the window left. The request ends here, so the caches need no update.
        """
        first = r.seqs[r.drafting[0]]
        seg = first.ids[len(first.ids) - appended[r.drafting[0]] :]
        keep = seg[: len(seg) - excess]
        text = self.runners[r.drafting[0]].codec.decode(keep)
        if not win.text.startswith(text):  # this tokenizer's prefix does not decode to a text prefix
            return
        r.answer = r.answer[: len(r.answer) - len(win.text)] + text
        for m, s in r.seqs.items():
            del s.ids[len(s.ids) - appended[m] :]
            s.ids += keep if m == r.drafting[0] else self.runners[m].codec.encode_segment(text)


class _StopProbe:
    """Lets the host learn that every draft has sampled a stop token, without waiting.

    Each step copies one flag to host memory. On CUDA the copy is asynchronous
    (pinned memory, checked through an event one step later); on the CPU there
    is no device to wait for and the flag is read at once. The flag is read
    through a NumPy view: a plain memory read, not a tensor operation.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.flag = torch.ones(1, dtype=torch.bool, pin_memory=self.cuda)
        self.view = self.flag.numpy()
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False

    def all_stopped(self, going: torch.Tensor) -> bool:
        """Push this step's 'some draft still going' flag; True once a landed flag says none is."""
        if not self.cuda:
            self.flag.copy_(going.reshape(1))
            return not self.view[0]
        landed = self.pending and self.event.query() and not self.view[0]
        self.flag.copy_(going.reshape(1), non_blocking=True)
        self.event.record()
        self.pending = True
        return landed


def _same_text_draft(drafts: list[Draft], m: str, win: Draft) -> Draft | None:
    if win.model == m:
        return win
    return next((d for d in drafts if d.model == m and d.text == win.text), None)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
