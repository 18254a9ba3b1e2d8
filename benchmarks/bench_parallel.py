"""Members in parallel on one CPU: one thread per member (cores split) vs one member at a time.

Loads the ensemble twice (parallel="off" and "on"), runs the same greedy
generations on both, side by side per repetition, and prints the time of each,
the ratio and whether the texts agree. On a GPU machine pass --devices to put
the members on different GPUs (then "auto" already runs them concurrently).

    .venv/bin/python benchmarks/bench_parallel.py [--batch 1,4] [--max-new-tokens 48] [--reps 2]
        [--models A,B,C] [--devices D1,D2,D3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from specem_fast import Ensemble
from specem_fast.measure.datasets import load_gsm8k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,4", help="prompts per call, comma-separated (default 1,4)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per mode (default 2)")
    ap.add_argument("--models", default=None)
    ap.add_argument("--devices", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    models = args.models.split(",") if args.models else None
    devices = args.devices.split(",") if args.devices else ()
    batches = [int(b) for b in args.batch.split(",")]
    ens = {mode: Ensemble.from_pretrained(models, devices=devices, dtype="float32", cache_tokens=1024,
                                          max_batch=max(batches), parallel=mode, warmup=True)
           for mode in ("off", "on")}
    prompts = [it.prompt for it in load_gsm8k(max(batches))]
    print(f"torch threads {torch.get_num_threads()}; members {ens['on'].metadata['parallel']}; "
          f"{args.max_new_tokens} new tokens, greedy")
    print(f"{'batch':>5} {'one at a time':>14} {'in parallel':>12} {'parallel/seq':>13} {'same text':>10}")
    rows = []
    for b in batches:
        times = {"off": [], "on": []}
        texts = {}
        for _ in range(args.reps):
            for mode in ("off", "on"):
                t0 = time.perf_counter()
                out = ens[mode].generate(prompts[:b], max_new_tokens=args.max_new_tokens, temperature=0.0)
                times[mode].append(time.perf_counter() - t0)
                texts[mode] = [r.text for r in out]
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        row = {"batch": b, "off_s": off, "on_s": on, "ratio": on / off, "same_text": texts["on"] == texts["off"]}
        rows.append(row)
        print(f"{b:>5} {off:>13.2f}s {on:>11.2f}s {row['ratio']:>13.2f} {str(row['same_text']):>10}", flush=True)
    for e in ens.values():
        e.close()
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")
    return 0 if all(r["same_text"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
