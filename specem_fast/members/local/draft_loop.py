"""A member's draft loop: up to W tokens for a batch of requests, sampled and fed
on the device with the host reading back once per round.

Each request state it is given has ``slot``, ``last_hidden`` (predicts the next
token), ``generator``, ``temperature`` and ``top_p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specem_fast.model.runner import ModelRunner
from specem_fast.model.sampling import sample_tokens


@dataclass(frozen=True)
class Sampled:
    """One request's draft as sampled (the member makes what competes of it)."""

    tokens: list[int]  # sampled, stop token excluded
    fed: int  # tokens[:fed] have K/V above the committed length
    hiddens: list[torch.Tensor]  # hiddens[j] predicts tokens[j]; len fed + 1
    stopped: bool


class Drafter:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._groups: dict[tuple, list] = {}  # sampling groups of the current draft call

    @torch.inference_mode()  # sampled tokens too: the compiled step sees one kind of tensor
    def draft(self, seqs: list, limits: list[int], ignore_stop: bool) -> list[Sampled]:
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
        runner = self.runner
        counts = [n - 1 for n in limits]  # tokens fed: the last sampled token waits for the next round
        steps = runner.plan_draft([s.slot for s in seqs], [runner.cache.length[s.slot] for s in seqs], counts)
        stop_set = set() if ignore_stop else {int(t) for t in runner.codec.stop_ids}
        stops = torch.tensor(sorted(stop_set), dtype=torch.long).to(runner.device)
        gens = [s.generator for s in seqs]
        states: dict[tuple[int, int], torch.Tensor] = {}
        self._groups = {}
        for j in sorted(set(counts)):  # each set of requests a step samples for
            self._sampling_groups([s for s, c in zip(seqs, counts) if c >= j])
        first = torch.stack([s.last_hidden for s in seqs])
        toks, hs = self.loop(seqs, steps, first, stops, gens, states, StopProbe(runner.device))
        flat = torch.cat(toks).tolist()  # the round's one device->host read
        sampled: list[list[int]] = [[] for _ in seqs]
        rows, at = list(range(len(seqs))), 0
        for j in range(len(toks)):
            for i in rows:
                sampled[i].append(flat[at])
                at += 1
            if j < len(steps):
                rows = steps[j].rows
        drafts = []
        for i, (s, seq) in enumerate(zip(seqs, sampled)):
            k = next((n for n, t in enumerate(seq) if t in stop_set), None)
            fed = counts[i] if k is None else k
            if k is not None and gens[i] is not None and (i, k + 1) in states:
                gens[i].set_state(states[i, k + 1])
            hiddens = [s.last_hidden] + [hs[j][steps[j].rows.index(i)] for j in range(fed)]
            drafts.append(Sampled(seq if k is None else seq[:k], fed, hiddens, k is not None))
        return drafts

    def loop(self, seqs: list, steps: list, hidden: torch.Tensor, stops: torch.Tensor, gens: list,
                    states: dict, probe: "StopProbe") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The per-token loop: sample, feed, repeat, all on the device.

        Returns the sampled tokens of every step (rows: the requests still
        drafting) and the hidden states of every fed step. Ends early only when
        every draft still to be fed has sampled a stop token, which the host
        learns without waiting on the device (:class:`StopProbe`).
        """
        runner = self.runner
        toks, hs = [], []
        rows = list(range(len(seqs)))
        going = None  # per row of this step: no stop token sampled yet
        for j in range(len(steps) + 1):
            for i in rows:  # where each generator stands before this step's draw
                if j and gens[i] is not None:
                    states[i, j] = gens[i].get_state()
            tok = self._choose(runner.logits(hidden), [seqs[i] for i in rows])
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

    def _choose(self, logits: torch.Tensor, seqs: list) -> torch.Tensor:
        """The next token of each row, as a device tensor [rows]; rows are grouped by
        (temperature, top_p), with the groups' index tensors made before the loop."""
        out = None
        for (temp, top_p), rows, index in self._sampling_groups(seqs):
            gens = [seqs[i].generator for i in rows]
            if index is None:
                return sample_tokens(logits, temp, top_p, gens)
            if out is None:
                out = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
            out[index] = sample_tokens(logits[index], temp, top_p, gens)
        return out

    def _sampling_groups(self, seqs: list) -> list[tuple]:
        """((temperature, top_p), rows, row index tensor or None when one group) per group."""
        key = tuple(id(s) for s in seqs)
        groups = self._groups.get(key)
        if groups is None:
            by: dict[tuple[float, float], list[int]] = {}
            for i, s in enumerate(seqs):
                by.setdefault((s.temperature, s.top_p), []).append(i)
            dev = self.runner.device
            groups = [(st, rows, None if len(by) == 1 else torch.tensor(rows).to(dev)) for st, rows in by.items()]
            self._groups[key] = groups
        return groups


class StopProbe:
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
