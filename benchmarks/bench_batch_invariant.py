"""What the batch-invariant mode (``batch_invariant=True``, ``serve --deterministic``) costs.

One ensemble; for each batch size B, B distinct GSM8K prompts are generated
together (greedy) with the mode off and on, alternating REPEATS times (paired
runs, so drift of a shared machine hits both alike; the mode is switched on the
members in place, the weights are the same). Prints tokens/s of each and the
ratio on/off per batch size, and whether each prompt's text under the mode
equals its text alone (the mode's promise) and the default's batch text equals
its text alone (the default's, which it need not keep in bfloat16).

    .venv/bin/python benchmarks/bench_batch_invariant.py [--models A,B] [--dtype bfloat16]
        [--batches 1,4,8] [--repeats 2] [--max-tokens 32] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from specem_fast import Ensemble
from specem_fast.measure.datasets import load_gsm8k


def set_mode(ens: Ensemble, on: bool) -> None:
    """Switch the mode on the ensemble's local members (a benchmark shortcut: an ensemble is
    built with ``batch_invariant=`` and keeps it)."""
    for m in ens.members.values():
        if hasattr(m, "batch_invariant"):
            m.batch_invariant = on


def timed(ens: Ensemble, prompts: list[str], kw: dict) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    res = ens.generate(prompts, **kw)
    wall = time.perf_counter() - t0
    return sum(r.new_tokens for r in res) / wall, [r.text for r in res]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated models (default: the default models)")
    ap.add_argument("--dtype", default="bfloat16", help="weights dtype (default bfloat16)")
    ap.add_argument("--batches", default="1,4,8", help="batch sizes (default 1,4,8)")
    ap.add_argument("--repeats", type=int, default=2, help="paired off/on runs per batch size (default 2)")
    ap.add_argument("--max-tokens", type=int, default=32, help="answer length (default 32)")
    ap.add_argument("--window", type=int, default=8, help="draft window (default 8)")
    ap.add_argument("--out", default=None, help="also write the report as JSON")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    ens = Ensemble.from_pretrained(args.models, dtype=args.dtype, max_batch=max(batches), cache_tokens=1024,
                                   preset="reference", progress=True)
    kw = dict(max_new_tokens=args.max_tokens, window=args.window, temperature=0.0)
    prompts = [it.prompt for it in load_gsm8k(max(batches))]
    report = {"models": ens.model_names, "dtype": args.dtype, "max_tokens": args.max_tokens, "rows": []}
    try:
        set_mode(ens, True)
        alone = [ens.generate(p, **kw).text for p in prompts]  # the mode's reference: each prompt alone
        print(f"models: {', '.join(ens.model_names)} ({args.dtype}); {args.max_tokens}-token greedy answers")
        print(f"{'batch':>5} {'off tok/s':>10} {'on tok/s':>9} {'on/off':>7} {'on = alone':>11} {'off = alone':>12}")
        for b in batches:
            off, on, same_on, same_off = [], [], True, True
            for _ in range(args.repeats):
                for mode in (False, True):
                    set_mode(ens, mode)
                    tps, texts = timed(ens, prompts[:b], kw)
                    (on if mode else off).append(tps)
                    if mode:
                        same_on &= texts == alone[:b]
                    else:
                        same_off &= texts == alone[:b]
            row = {"batch": b, "off_tps": statistics.median(off), "on_tps": statistics.median(on),
                   "on_equals_alone": same_on, "off_equals_alone": same_off, "off_runs": off, "on_runs": on}
            row["ratio"] = row["on_tps"] / row["off_tps"]
            report["rows"].append(row)
            print(f"{b:>5} {row['off_tps']:>10.2f} {row['on_tps']:>9.2f} {row['ratio']:>7.2f} {str(same_on):>11} "
                  f"{str(same_off):>12}", flush=True)
    finally:
        ens.close()
    report["command"] = "python benchmarks/bench_batch_invariant.py " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all(r["on_equals_alone"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
