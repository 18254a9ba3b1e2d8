"""End-to-end cost of an ensemble answer on the default models, side by side.

In one run: the ensemble in cached mode, the ensemble in recompute mode (the
reference cost model: every round re-encodes every sequence), and each model
decoding alone the same number of new tokens, for a short and a long prompt.
Prints tokens/s and the ratios recompute/cached and cached/(sum alone).

    .venv/bin/python benchmarks/bench_e2e.py [--new-tokens 64] [--window 10] [--reps 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

from specem_fast import Ensemble
from specem_fast.measure.datasets import load_gsm8k

SHORT = "Explain why the sky is blue."


def long_prompt(ens: Ensemble, target_tokens: int = 1000) -> str:
    """GSM8K problems concatenated until the first model sees ~target tokens."""
    codec = ens.runners[ens.model_names[0]].codec
    parts = []
    for item in load_gsm8k():
        parts.append(item.prompt)
        text = "Here are some problems.\n\n" + "\n\n".join(parts) + "\n\nSolve the last problem."
        if len(codec.prompt_ids(text)) >= target_tokens:
            return text
    return text


def timed(fn, reps: int):
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--long-tokens", type=int, default=1000)
    args = ap.parse_args()
    ens = Ensemble.from_pretrained(cache_tokens=args.long_tokens + 512, max_batch=1)
    ens.generate("Warm up.", max_new_tokens=8, window=4)
    rows = []
    for label, prompt in (("short", SHORT), ("long", long_prompt(ens, args.long_tokens))):
        plen = len(ens.runners[ens.model_names[0]].codec.prompt_ids(prompt))
        kw = dict(max_new_tokens=args.new_tokens, window=args.window)
        t_cached, res = timed(lambda: ens.generate(prompt, **kw), args.reps)
        t_rec, rec = timed(lambda: ens.generate(prompt, mode="recompute", **kw), args.reps)
        n = res.new_tokens
        alone = {}
        for m in ens.model_names:
            alone[m], _ = timed(lambda m=m: ens.generate_single(m, prompt, max_new_tokens=n, ignore_eos=True), args.reps)
        rows.append((label, plen, n, t_cached, t_rec, alone, res.text == rec.text))
    print(f"\nensemble of {', '.join(ens.model_names)}; window {args.window}; torch path on CPU")
    head = f"{'prompt':<7}{'tokens':>7}{'new':>5}{'cached tok/s':>14}{'recompute tok/s':>17}{'sum alone tok/s':>17}{'recompute/cached':>18}{'cached/sum alone':>18}  same text"
    print(head)
    print("-" * len(head))
    for label, plen, n, tc, tr, alone, same in rows:
        s = sum(alone.values())
        print(f"{label:<7}{plen:>7}{n:>5}{n / tc:>14.2f}{n / tr:>17.2f}{n / s:>17.2f}{tr / tc:>18.2f}{tc / s:>18.2f}  {same}")
    print("\nalone (s): " + "; ".join(f"{lbl}: " + ", ".join(f"{m} {t:.2f}" for m, t in a.items()) for lbl, _, _, _, _, a, _ in rows))


if __name__ == "__main__":
    main()
