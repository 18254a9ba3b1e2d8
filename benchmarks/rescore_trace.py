"""Rescore a whole-response run: the same candidates, other selection rules.

With whole-response candidates (``--window`` = ``--max-new-tokens``, greedy) each
request has one round, and every member's candidate is its own answer alone: it
does not depend on which other members draft, on the weights or on the scoring
rule. The trace keeps every verifier's mean log-prob of every candidate and each
candidate's length in that verifier's tokens, so a selection rule (a subset of
drafters and verifiers, mean or summed log-probs, with or without self-votes,
uniform or prior weights) can be applied to the recorded scores with the engine's
own functions (`specem_fast.rounds.scoring`) instead of drafting everything again. The
rule the run itself used must reproduce the engine's winners; this is checked
and printed.

Each variant is written as a results file of `specem-fast eval` (graded again with
eval's grader), so `benchmarks/ablation_table.py` compares them with the members
and with real runs, paired item by item:

    python benchmarks/rescore_trace.py benchmarks/eval/ifbench100-whole.jsonl \\
        benchmarks/eval/ifbench100-whole.trace.jsonl --out-dir benchmarks/eval/rescored \\
        two=drafters=smollm2+qwen  qwen-judge=verifiers=qwen  sum=score=logprob_sum \\
        prior=weights=benchmarks/eval/weights-ifbench-dev.json

A variant is LABEL=KEY=VALUE[;KEY=VALUE...] with keys ``drafters``, ``verifiers``
(model names or unique prefixes joined by +), ``score`` (logprob | logprob_sum),
``self_votes`` (1 | 0), ``finished`` (1: only the candidates that ended
with a stop token such as EOS compete, when any did) and ``weights`` (a weights JSON whose prior starts every
request; default uniform).
"""

from __future__ import annotations

import argparse
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from specem_fast.rounds import scoring
from specem_fast.measure.datasets import HELD_OUT, load_items
from specem_fast.measure.evaluate import ENSEMBLE, FORMAT, score_output
from specem_fast.rounds.weights import WeightBook, read_weights_file


@dataclass
class Rule:
    drafters: list[str]
    verifiers: list[str]
    score: str = "logprob"
    self_votes: bool = True
    prior: dict[str, float] | None = None
    hedge_lr: float | None = 1.0
    schedule: str = "reference"
    finished: bool = False  # keep only the candidates that ended (a stop token) when any did

    def start(self) -> dict[str, float]:
        book = WeightBook(self.verifiers)
        if self.prior is not None:
            book.set_prior({v: self.prior[v] for v in self.verifiers})
            return book.initial("prior")
        return book.uniform()

    def pick(self, rnd: dict) -> int:
        """Index (into the round's candidates) this rule keeps, as the scheduler would pick it."""
        idx = [i for i, c in enumerate(rnd["candidates"]) if c["model"] in self.drafters and c["text"]]
        if self.finished and any(rnd["candidates"][i]["ended_with_stop"] for i in idx):
            idx = [i for i in idx if rnd["candidates"][i]["ended_with_stop"]]
        if len(idx) == 1:
            return idx[0]
        if not rnd["verified"]:
            raise SystemExit(f"request {rnd['request']}: its round was accepted without a verify pass; "
                             "rescoring needs a run without --skip-agreed / --fast-eos")
        models = [rnd["candidates"][i]["model"] for i in idx]
        raw = {}
        for v in self.verifiers:
            means = [rnd["raw_scores"][v][i] for i in idx]
            if self.score == "logprob_sum":
                means = [m * rnd["verify_tokens"][v][i] for m, i in zip(means, idx)]
            raw[v] = means
        learners = [m for m in self.drafters if m in self.verifiers]
        *_, win = scoring.pick_winner(raw, score=self.score, candidate_models=models, learners=learners,
                                      weights=self.start(), hedge_lr=self.hedge_lr, t=1, schedule=self.schedule,
                                      self_votes=self.self_votes)
        return idx[win]


def _resolve(names: str, known: list[str]) -> list[str]:
    out = []
    for n in names.split("+"):
        hits = [k for k in known if k == n] or [k for k in known if k.startswith(n)]
        if len(hits) != 1:
            raise SystemExit(f"{n!r} names {len(hits)} of the run's models ({', '.join(known)}); give a unique prefix")
        out.append(hits[0])
    return [k for k in known if k in out]  # the run's drafter order, as the scheduler keeps it


def _rule(spec: str, header: dict) -> tuple[str, Rule]:
    label, sep, rest = spec.partition("=")
    if not sep or not label:
        raise SystemExit(f"bad variant {spec!r}: expected LABEL=KEY=VALUE[;KEY=VALUE...]")
    st = header["settings"]
    models = header["models"]
    rule = Rule(list(models), list(header["verifiers"] or models), st["score"], st["self_votes"],
                header.get("prior"), st["hedge_lr"], st["hedge_schedule"])
    for part in filter(None, rest.split(";")):
        key, sep, val = part.partition("=")
        if not sep:
            raise SystemExit(f"bad variant {spec!r}: {part!r} is not KEY=VALUE")
        if key in ("drafters", "verifiers"):
            setattr(rule, key, _resolve(val, models))
        elif key == "score" and val in ("logprob", "logprob_sum"):
            rule.score = val
        elif key == "self_votes" and val in ("0", "1"):
            rule.self_votes = val == "1"
        elif key == "finished" and val in ("0", "1"):
            rule.finished = val == "1"
        elif key == "weights":
            rule.prior = read_weights_file(val)["prior"]
        else:
            raise SystemExit(f"bad variant {spec!r}: unknown {part!r}")
    return label, rule


def _lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="the whole-response run's results JSONL")
    ap.add_argument("trace", type=Path, help="its --trace file (.jsonl or .jsonl.gz)")
    ap.add_argument("variants", nargs="*", help="LABEL=KEY=VALUE[;KEY=VALUE...]")
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_intermixed_args()

    recs = _lines(args.results)
    header = next(r for r in recs if r.get("type") == "header")
    st = header["settings"]
    if st["window"] < st["max_new_tokens"] or st["score"] != "logprob" or st["temperature"] != 0:
        raise SystemExit("rescoring needs a greedy whole-response run (--window = --max-new-tokens) "
                         "scored by mean log-prob (the default)")
    done = {r["item_id"]: r for r in recs if r.get("type") == "item" and r["system"] == ENSEMBLE and "error" not in r}
    first = {}
    for r in _lines(args.trace):
        first.setdefault(r["request"], r if r["round"] == 1 else None)
    # every item below the held-out ones: a results file names its items by id, not by position
    upto = HELD_OUT.get(header["dataset"].lower())
    items = [it for it in load_items(header["dataset"], seed=header["seed"], limit=upto)
             if it.id in done and first.get(it.id)]
    same = sum(_rule("run=", header)[1].pick(first[it.id]) == first[it.id]["winner"] for it in items)
    print(f"{len(items)} requests; the run's own rule picks the engine's winner in {same}; "
          f"{sum(done[it.id]['rounds'] > 1 for it in items)} needed more than one round")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for spec in args.variants:
        label, rule = _rule(spec, header)
        path = args.out_dir / f"{args.results.stem}-{label}.jsonl"
        settings = dict(st, score=rule.score, self_votes=rule.self_votes, prefer_finished=rule.finished,
                        init_weights="prior" if rule.prior else st["init_weights"])
        head = {"type": "header", "format": FORMAT, "dataset": header["dataset"], "seed": header["seed"],
                "settings": settings, "models": rule.drafters, "verifiers": rule.verifiers,
                "prior": rule.prior, "batch": None, "rescored_from": str(args.results)}
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(head) + "\n")
            for it in items:
                rnd, base = first[it.id], done[it.id]
                cand = rnd["candidates"][rule.pick(rnd)]
                rec = {k: base[k] for k in ("type", "system", "item_id", "index", "dataset", "prompt_sha", "seed")}
                # not timed: the run drafted for every member, whichever this rule keeps
                rec.update(output=cand["text"], new_tokens=cand["draft_tokens"], stop_reason="stop" if cand["ended_with_stop"] else "length",
                           seconds=0.0, latency_s=None, rescored=True,
                           rounds=1, wins={cand["model"]: 1}, mean_drafters=float(len(rule.drafters)),
                           skipped_verify=0, tokens_per_s=None, **score_output(it, cand["text"]))
                f.write(json.dumps(rec) + "\n")
        print(f"{label}: {path}")


if __name__ == "__main__":
    main()
