"""Does the win-rate reward track correctness? One table from an eval run.

Reads the results JSONL of `specem-fast eval` (members alone and the ensemble) and
the ensemble's round trace (`--trace`), and prints per member: its accuracy alone,
its mean win-rate reward over the verified rounds (recomputed from the recorded
scores), the share of rounds its segment won, and the Hedge weight answers ended
with. Also the reward on items where the member alone was right vs wrong.

    python benchmarks/reward_vs_accuracy.py benchmarks/eval/gsm8k200-reference.jsonl \
        benchmarks/eval/gsm8k200-reference.trace.jsonl.gz [--no-self-votes] \
        [--members benchmarks/eval/gsm8k200-members.jsonl]

--members reads the members' answers alone from another results file (an
ensemble run made with --no-singles); the first file's own answers come first.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from specem_fast.rounds import scoring
from specem_fast.measure.stats import accuracy, mean
from specem_fast.measure.trace import read_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("trace")
    ap.add_argument("--no-self-votes", action="store_true", help="rewards as with self_votes=False")
    ap.add_argument("--members", action="append", default=[], metavar="RESULTS",
                    help="another results file with the members' answers alone (repeatable)")
    args = ap.parse_args()

    recs = [json.loads(x) for x in open(args.results, encoding="utf-8") if x.strip()]
    header = next(r for r in recs if r.get("type") == "header")
    members = header["models"]
    correct: dict[tuple[str, str], bool | None] = {}
    for path in [args.results, *args.members]:
        for line in open(path, encoding="utf-8"):
            r = json.loads(line) if line.strip() else {}
            if r.get("type") == "item":
                correct.setdefault((r["system"], r["item_id"]), r.get("correct"))
    rounds = read_trace(args.trace)

    rewards: dict[str, list[float]] = defaultdict(list)
    by_outcome: dict[tuple[str, bool], list[float]] = defaultdict(list)
    wins: dict[str, int] = defaultdict(int)
    final_w: dict[str, list[float]] = defaultdict(list)
    last: dict[str, dict] = {}
    for rd in rounds:
        wins[rd["winner_model"]] += 1
        last[rd["request"]] = rd["weights"]
        if not rd.get("verified", True) or not rd["scores"]:
            continue
        models = [c["model"] for c in rd["candidates"]]
        learners = [m for m in members if m in rd["scores"]]
        r = scoring.win_rate_rewards(rd["scores"], models, learners, not args.no_self_votes)
        for m, v in r.items():
            if m in models:
                rewards[m].append(v)
                ok = correct.get((m, rd["request"]))
                if ok is not None:
                    by_outcome[(m, bool(ok))].append(v)
    for w in last.values():
        for m, v in w.items():
            final_w[m].append(v)
    n_rounds = sum(wins.values())
    print(f"{len(last)} ensemble answers, {n_rounds} rounds; rewards over verified rounds where the member drafted")
    print(f"{'member':<32} {'alone acc':>9} {'reward':>7} {'(alone right)':>13} {'(alone wrong)':>13} "
          f"{'won':>6} {'final w':>8}")
    for m in members:
        acc = accuracy(correct.get((m, i)) for i in last)
        fmt = lambda x: f"{x:.3f}" if x is not None else "-"  # noqa: E731
        print(f"{m:<32} {100 * (acc.value or 0):8.1f}% {fmt(mean(rewards[m])):>7} "
              f"{fmt(mean(by_outcome[(m, True)])):>13} {fmt(mean(by_outcome[(m, False)])):>13} "
              f"{100 * wins[m] / max(n_rounds, 1):5.1f}% {fmt(mean(final_w[m])):>8}")


if __name__ == "__main__":
    main()
