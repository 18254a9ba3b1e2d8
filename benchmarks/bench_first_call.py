"""First-call cost: a fresh process's first `generate` against its warm calls.

Each run is a new Python process (as the CLI always is) that loads the
ensemble, then times the same greedy generation several times. With
--drop-caches (root only) the page cache is dropped before each process, so
the weights come from disk as after a reboot. Prints per run: import, load,
first call, warm call (median of the later ones) and first / warm; the issue's
target is first / warm <= 1.15.

    .venv/bin/python benchmarks/bench_first_call.py [--runs 3] [--calls 3] [--max-new-tokens 64]
        [--drop-caches] [--no-warmup] [--models A,B,C] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?")

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from specem_fast import Ensemble
t1 = time.perf_counter()
cfg = json.loads(sys.argv[1])
ens = Ensemble.from_pretrained(cfg["models"], warmup=cfg["warmup"])
t2 = time.perf_counter()
calls, texts = [], []
for _ in range(cfg["calls"]):
    s = time.perf_counter()
    texts.append(ens.generate(cfg["prompt"], max_new_tokens=cfg["max_new_tokens"]).text)
    calls.append(time.perf_counter() - s)
ens.close()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "calls_s": calls, "same_text": len(set(texts)) == 1,
                  "dtypes": ens.metadata["dtypes"]}))
"""


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh processes (default 3)")
    ap.add_argument("--calls", type=int, default=3, help="generate calls per process (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache before each process (root)")
    ap.add_argument("--no-warmup", action="store_true", help="load without the warm-up pass (the old behaviour)")
    ap.add_argument("--models", default=None, help="comma-separated models (default: the default models)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.calls < 2:
        ap.error("--calls must be >= 2: the warm time is the median of calls 2..N")
    cfg = {"models": args.models.split(",") if args.models else None, "warmup": not args.no_warmup,
           "calls": args.calls, "max_new_tokens": args.max_new_tokens, "prompt": PROMPT}
    rows = []
    print(f"{'run':>3} {'cache':>6} {'import':>7} {'load':>7} {'first':>7} {'warm':>7} {'first/warm':>10}")
    for i in range(args.runs):
        if args.drop_caches:
            drop_page_cache()
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(out.stdout.strip().splitlines()[-1])
        first, warm = row["calls_s"][0], statistics.median(row["calls_s"][1:])
        row.update(first_s=first, warm_s=warm, ratio=first / warm, cold=args.drop_caches)
        rows.append(row)
        print(f"{i:>3} {'cold' if args.drop_caches else 'warm':>6} {row['import_s']:>6.1f}s {row['load_s']:>6.1f}s "
              f"{first:>6.2f}s {warm:>6.2f}s {row['ratio']:>10.2f}" + ("" if row["same_text"] else "  TEXT DIFFERS"))
    worst = max(r["ratio"] for r in rows)
    print(f"worst first/warm {worst:.2f} (target <= 1.15); warm-up at load: {cfg['warmup']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": cfg, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["same_text"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
