"""End-to-end cost of an ensemble answer on the default models, side by side.

One run, default models: the ensemble in cached mode, in recompute mode (the
reference cost model: every round re-encodes every sequence) and each model
decoding alone the same number of new tokens, for a short and a ~1,000-token
prompt. Prints tokens/s and the ratios recompute/cached and cached/(sum alone).
A thin preset over `specem-fast bench` (specem_fast.measure.bench).

    .venv/bin/python benchmarks/bench_e2e.py [--new-tokens 64] [--window 10] [--reps 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys

from specem_fast import Ensemble
from specem_fast.measure.bench import BenchPlan, format_bench, run_bench, write_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--long-tokens", type=int, default=1000)
    ap.add_argument("--out", help="also write the report as JSON")
    args = ap.parse_args()
    ens = Ensemble.from_pretrained(cache_tokens=args.long_tokens + 1024, max_batch=1)
    plan = BenchPlan(lengths=["short", args.long_tokens], windows=[args.window], new_tokens=args.new_tokens,
                     reps=args.reps, warmup=1)
    report = run_bench(ens, plan, progress=True, command=" ".join(["benchmarks/bench_e2e.py", *sys.argv[1:]]))
    print(format_bench(report))
    if args.out:
        write_report(report, args.out)


if __name__ == "__main__":
    main()
