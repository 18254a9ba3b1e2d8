"""Draft decode step, eager vs compiled (issue 11 item 3): ms per step and the ratio.

For each model, batch size and prefix length: every request holds a prefix of
random tokens in the cache, then draft rounds of ``--window`` steps run through
the eager step and through the ``torch.compile``d one (CUDA graphs on CUDA) on
the same runner and cache. Prints one row per case: eager and compiled ms per
step (median over rounds), eager/compiled, the one-off compile time, and the
largest difference of the two steps' hidden states (float rounding only).

    .venv/bin/python benchmarks/bench_compile.py [--models a,b] [--batch 1,4] [--prefix 128,1024]
        [--window 10] [--rounds 5] [--device cpu] [--dtype float32] [--threads N] [--out FILE]
    .venv/bin/python benchmarks/bench_compile.py --quick   # tiny random model: checks that it runs

Time it on a quiet machine: the ratio is only as good as the timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from specem_fast import Ensemble


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fill(runner, batch: int, prefix: int, gen: torch.Generator) -> None:
    """Put a prefix of random tokens in slots 0..batch-1 (one forward)."""
    from specem_fast.model.runner import Run

    for s in range(batch):
        runner.cache.crop(s, 0)
    vocab = runner.model.args.vocab_size
    runs = [Run(s, torch.randint(0, vocab, (prefix,), generator=gen).tolist(), 0, 0, 0) for s in range(batch)]
    runner.forward(runs)
    for s in range(batch):
        runner.cache.append(s, prefix)


@torch.inference_mode()  # as a member drafts: the compiled step sees one kind of tensor
def _round(runner, batch: int, prefix: int, window: int, start_tokens: torch.Tensor) -> tuple[float, list]:
    """One draft round of window - 1 fed steps (greedy): seconds, hidden states."""
    steps = runner.plan_draft(list(range(batch)), [prefix] * batch, [window - 1] * batch)
    tok, hs = start_tokens, []
    _sync(runner.device)
    t0 = time.perf_counter()
    for step in steps:
        step.tokens = tok
        h = runner.forward(step)
        tok = runner.logits(h).argmax(-1)
        hs.append(h)
    _sync(runner.device)
    return time.perf_counter() - t0, hs


@torch.inference_mode()
def measure(runner, batch: int, prefix: int, window: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    _fill(runner, batch, prefix, gen)
    start = torch.randint(0, runner.model.args.vocab_size, (batch,), generator=gen).to(runner.device)
    compiled, runner.compiled = runner.compiled, None
    times = {}
    try:
        _round(runner, batch, prefix, window, start)  # warm-up
        times["eager"] = [_round(runner, batch, prefix, window, start)[0] for _ in range(rounds)]
        _, h_eager = _round(runner, batch, prefix, window, start)
    finally:
        runner.compiled = compiled
    t0 = time.perf_counter()
    _round(runner, batch, prefix, window, start)  # compiles (and captures on CUDA)
    compile_s = time.perf_counter() - t0
    times["compiled"] = [_round(runner, batch, prefix, window, start)[0] for _ in range(rounds)]
    _, h_comp = _round(runner, batch, prefix, window, start)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(h_eager, h_comp))
    per_step = {k: 1000 * statistics.median(v) / max(1, window - 1) for k, v in times.items()}
    return {"batch": batch, "prefix": prefix, "eager_ms": per_step["eager"], "compiled_ms": per_step["compiled"],
            "ratio": per_step["eager"] / per_step["compiled"], "compile_s": compile_s, "max_abs_diff": diff}


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<32} {'batch':>5} {'prefix':>6} {'eager ms':>9} {'compiled ms':>11} {'eager/comp':>10} " \
           f"{'compile s':>9} {'max|dh|':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model'][-32:]:<32} {r['batch']:>5} {r['prefix']:>6} {r['eager_ms']:>9.2f} "
                     f"{r['compiled_ms']:>11.2f} {r['ratio']:>10.2f} {r['compile_s']:>9.1f} {r['max_abs_diff']:>8.1e}")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated (default: the default models)")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--prefix", default="128,1024")
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="a tiny random model, batch 1 and 2, short prefix")
    ap.add_argument("--out", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, prefixes = _ints(args.batch), _ints(args.prefix)
    tmp = None
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import make_tiny_model_dir

        tmp = tempfile.TemporaryDirectory()
        models = [str(make_tiny_model_dir(Path(tmp.name), "llama", "smollm2-135m-instruct"))]
        batches, prefixes, args.rounds, args.window = [1, 2], [16], 2, 4
    else:
        from specem_fast.hub.registry import DEFAULT_MODELS

        models = args.models.split(",") if args.models else [m.name for m in DEFAULT_MODELS]
    rows = []
    for name in models:
        ens = Ensemble.from_pretrained([name], device=args.device, dtype=args.dtype, max_batch=max(batches),
                                       cache_tokens=max(prefixes) + args.window + 16, compile=True)
        runner = ens.runners[name]
        for b in batches:
            for p in prefixes:
                row = {"model": name, "device": args.device, "dtype": str(runner.dtype)[6:],
                       **measure(runner, b, p, args.window, args.rounds)}
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
        ens.close()
    print()
    print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(["benchmarks/bench_compile.py", *sys.argv[1:]]),
                                              "rows": rows}, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return rows


if __name__ == "__main__":
    main()
