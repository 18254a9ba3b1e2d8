"""The transformers backend's cost, in one paired run.

1. Decode: tokens/s of a transformers-backend member drafting one long greedy segment
   (its own cache, our sampler) vs transformers' own ``generate`` on the very same
   model object, dtype and prompt; runs alternate, medians compared (target >= 0.8x).
2. Ensemble rounds: the same greedy generation on the default models with every member
   on the native runtime vs every member forced onto the transformers backend; seconds
   per round, and whether the texts agree.

    .venv/bin/python benchmarks/bench_backend.py [--tokens 64] [--reps 3] [--device cpu]
        [--dtype float32] [--model smollm2-135m-instruct] [--skip-ensemble] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_decode(model: str, tokens: int, reps: int, device: str, dtype: str) -> dict:
    from specem_fast.hub.fetch import resolve_model
    from specem_fast.members.interface import DraftCall, OpenCall
    from specem_fast.members.local.hf_member import HFMember
    from specem_fast.model.hf_runner import HFRunner

    runner = HFRunner(model, resolve_model(model), device, dtype)
    member = HFMember(runner, 4096)
    ids = member.prompt_ids(PROMPT)
    inp = torch.tensor([ids], device=runner.device)
    gen_kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    def ours(req: int) -> tuple[float, list[int]]:
        _sync(device)
        t0 = time.perf_counter()
        member.open([OpenCall(req, 0, tuple(ids))])
        out = member.draft([DraftCall(req, len(ids), tokens, raw=True, ignore_stop=True)])[0]
        _sync(device)
        dt = time.perf_counter() - t0
        member.close([req])
        return dt, list(out.tokens)

    def theirs() -> tuple[float, list[int]]:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = runner.model.generate(inp, **gen_kw)
        _sync(device)
        return time.perf_counter() - t0, out[0, len(ids):].tolist()

    ours(0), theirs()  # warm both
    t_ours, t_theirs = [], []
    same = True
    for r in range(reps):
        a, ta = ours(r + 1)
        b, tb = theirs()
        t_ours.append(a)
        t_theirs.append(b)
        same &= ta == tb
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    return {"model": model, "tokens": tokens, "dtype": str(runner.dtype)[6:], "device": str(runner.device),
            "backend_tok_s": tokens / mo, "generate_tok_s": tokens / mt, "ratio": mt / mo, "same_tokens": same}


def bench_ensemble(tokens: int, reps: int, device: str, dtype: str) -> dict:
    from specem_fast import Ensemble

    kw = dict(device=device, dtype=dtype, cache_tokens=1024, max_batch=1, preset="reference", parallel="off")
    gen = dict(max_new_tokens=tokens, window=10, temperature=0.0)
    out = {}
    texts = {}
    ens = {b: Ensemble.from_pretrained(backend=b, **kw) for b in ("native", "transformers")}
    try:
        for e in ens.values():
            e.generate(PROMPT, max_new_tokens=10, window=10, temperature=0.0)  # warm
        times: dict[str, list[float]] = {b: [] for b in ens}
        rounds = {}
        for _ in range(reps):
            for b, e in ens.items():
                _sync(device)
                t0 = time.perf_counter()
                res = e.generate(PROMPT, **gen)
                _sync(device)
                times[b].append(time.perf_counter() - t0)
                rounds[b], texts[b] = len(res.rounds), res.text
        for b in ens:
            out[b] = {"s": statistics.median(times[b]), "rounds": rounds[b],
                      "s_per_round": statistics.median(times[b]) / max(1, rounds[b])}
    finally:
        for e in ens.values():
            e.close()
    out["ratio_native_over_transformers_time"] = out["native"]["s_per_round"] / out["transformers"]["s_per_round"]
    out["same_text"] = texts["native"] == texts["transformers"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ensemble-tokens", type=int, default=40)
    ap.add_argument("--skip-ensemble", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = {"decode": bench_decode(args.model, args.tokens, args.reps, args.device, args.dtype)}
    d = res["decode"]
    print("| what | backend | reference | ratio |\n|---|---|---|---|")
    print(f"| decode {d['model']} {d['dtype']} {d['device']}, {d['tokens']} tokens (tok/s) | "
          f"{d['backend_tok_s']:.1f} | generate {d['generate_tok_s']:.1f} | {d['ratio']:.2f}x "
          f"(same tokens: {d['same_tokens']}) |", flush=True)
    if not args.skip_ensemble:
        e = res["ensemble"] = bench_ensemble(args.ensemble_tokens, args.reps, args.device, args.dtype)
        print(f"| ensemble round, default models, {args.dtype} (s/round) | transformers "
              f"{e['transformers']['s_per_round']:.3f} ({e['transformers']['rounds']} rounds) | native "
              f"{e['native']['s_per_round']:.3f} ({e['native']['rounds']} rounds) | "
              f"{e['ratio_native_over_transformers_time']:.2f}x of native speed (same text: {e['same_text']}) |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
