"""Scale out: the same ensemble with its members in this process and in Ray actors.

Builds one ensemble per member kind (``local``: in process, ``ray``: every member
in a Ray actor of its own on a local cluster), runs the same greedy generations on
each, side by side per repetition, and prints per kind the tokens per second, the
round time and its phases, the ratio to the in-process ensemble and whether the
texts agree. For Ray members it also prints what the boundary costs per call and
per round (the proxy's wait in ``ray.get`` minus the actor's own compute time:
serialisation, RPC and scheduling) and the per-round time model
``round ~ sum over phases of max over members (compute + boundary)``, next to the
measured round and the sum over members (members in turn).

    .venv/bin/python benchmarks/bench_scaleout.py [--kinds local,ray] [--batch 1]
        [--max-new-tokens 48] [--reps 2] [--preset auto|reference|recommended] [--models A,B,C]
        [--ray-address HOST:PORT] [--out FILE.json]

Another member kind is one more entry in KINDS (a function from the model names
to an Ensemble); the tables get a row for it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from specem_fast import Ensemble
from specem_fast.measure.datasets import load_gsm8k
from specem_fast.hub.registry import DEFAULT_MODELS

PHASES = ("draft", "verify", "commit")
BUILD = dict(cache_tokens=1024)


def _local(models: list[str], args) -> Ensemble:
    return Ensemble.from_pretrained(models, max_batch=args.batch, dtype=args.dtype, preset=args.preset, **BUILD)


def _ray(models: list[str], args) -> Ensemble:
    return Ensemble.from_pretrained(models, max_batch=args.batch, dtype=args.dtype, preset=args.preset,
                                    placement="ray", ray_address=args.ray_address, **BUILD)


# kind -> builder; the first is the reference the ratios are taken against
KINDS: dict[str, Callable[[list[str], argparse.Namespace], Ensemble]] = {"local": _local, "ray": _ray}


def _boundary(ens: Ensemble) -> dict[str, dict]:
    """Per member with a boundary (``boundary()``): its counters."""
    return {n: m.boundary() for n, m in ens.members.items() if hasattr(m, "boundary")}


def _diff(after: dict, before: dict) -> dict:
    out = {}
    for n, kinds in after.items():
        out[n] = {}
        for k, v in kinds.items():
            b = before.get(n, {}).get(k, {"calls": 0, "wait_s": 0.0, "compute_s": 0.0})
            out[n][k] = {f: v[f] - b[f] for f in ("calls", "wait_s", "compute_s")}
    return out


def _add(total: dict, part: dict) -> None:
    for n, kinds in part.items():
        for k, v in kinds.items():
            t = total.setdefault(n, {}).setdefault(k, {"calls": 0, "wait_s": 0.0, "compute_s": 0.0})
            for f in t:
                t[f] += v[f]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"member kinds, comma-separated (default {','.join(KINDS)})")
    ap.add_argument("--batch", type=int, default=1, help="prompts per generate call (default 1)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per kind (default 2)")
    ap.add_argument("--models", default=None, help="comma-separated (default: the default models)")
    ap.add_argument("--dtype", default=None, help="weights dtype (default: the engine's default for the device)")
    ap.add_argument("--preset", default="auto", help="the ensemble's preset (default auto; reference: every "
                    "member drafts and verifies every round)")
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",")]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    models = args.models.split(",") if args.models else [m.name for m in DEFAULT_MODELS]
    prompts = [it.prompt for it in load_gsm8k(args.batch)]
    gen = dict(max_new_tokens=args.max_new_tokens, window=args.window, temperature=0.0)

    ens = {}
    for k in kinds:
        t0 = time.perf_counter()
        ens[k] = KINDS[k](models, args)
        load_s = time.perf_counter() - t0
        ens[k].generate(prompts, **gen)  # warm-up: one-off costs out of the timings
        print(f"{k}: loaded in {load_s:.1f}s; members {json.dumps(ens[k].metadata['remote']) if ens[k].metadata['remote'] else 'in process'}",
              flush=True)
    meta = next(iter(ens.values())).metadata
    print(f"models {', '.join(models)}; batch {args.batch}; {args.max_new_tokens} new tokens, window {args.window}, "
          f"greedy, preset {args.preset}; driver torch threads {torch.get_num_threads()}; dtypes {meta['dtypes'] or 'see members'}")

    runs = {k: [] for k in kinds}
    texts = {}
    cross = {k: {} for k in kinds}
    for _ in range(args.reps):
        for k in kinds:  # side by side per repetition: the machine's load hits every kind alike
            before = _boundary(ens[k])
            t0 = time.perf_counter()
            out = ens[k].generate(prompts, **gen)
            total = time.perf_counter() - t0
            _add(cross[k], _diff(_boundary(ens[k]), before))
            rounds = [rd for r in out for rd in r.rounds]
            n_rounds = max(len(r.rounds) for r in out)  # rounds of the batch (they run together)
            runs[k].append({
                "total_s": total, "rounds": n_rounds, "new_tokens": sum(r.new_tokens for r in out),
                # a round's phases are the batch's: every request's record of it has the same seconds
                **{p: statistics.mean(rd.seconds.get(p, 0.0) for rd in rounds) if rounds else 0.0 for p in PHASES}})
            texts[k] = [r.text for r in out]

    ref = kinds[0]
    rows = []
    med = lambda k, f: statistics.median(r[f] for r in runs[k])  # noqa: E731
    for k in kinds:
        tok_s = statistics.median(r["new_tokens"] / r["total_s"] for r in runs[k])
        round_ms = statistics.median(r["total_s"] / r["rounds"] * 1e3 for r in runs[k])
        rows.append({"kind": k, "tok_s": tok_s, "round_ms": round_ms, **{f"{p}_ms": med(k, p) * 1e3 for p in PHASES},
                     "same_text": texts[k] == texts[ref]})
    base = rows[0]
    print(f"\n{'kind':>6} {'tok/s':>6} {'round ms':>9} {'draft':>7} {'verify':>7} {'commit':>7} "
          f"{'tok/s ratio':>12} {'round ratio':>12} {'same text':>10}")
    for r in rows:
        r["tok_s_ratio"], r["round_ratio"] = r["tok_s"] / base["tok_s"], r["round_ms"] / base["round_ms"]
        print(f"{r['kind']:>6} {r['tok_s']:>6.2f} {r['round_ms']:>9.0f} {r['draft_ms']:>7.0f} {r['verify_ms']:>7.0f} "
              f"{r['commit_ms']:>7.0f} {r['tok_s_ratio']:>12.2f} {r['round_ratio']:>12.2f} {str(r['same_text']):>10}")

    model = {}
    for k in kinds:
        if not cross[k]:
            continue
        n_rounds = sum(r["rounds"] for r in runs[k])
        print(f"\n{k}: the boundary per call (proxy's wait - actor's compute), over {args.reps} runs, {n_rounds} rounds")
        print(f"{'member':>30} {'call':>7} {'calls':>6} {'wait ms':>8} {'compute ms':>11} {'boundary ms':>12}")
        per_phase = {p: [] for p in PHASES}
        over = []
        for n, kinds_ in cross[k].items():
            for c, v in sorted(kinds_.items()):
                if not v["calls"]:
                    continue
                b = (v["wait_s"] - v["compute_s"]) / v["calls"] * 1e3
                over.append((b, v["calls"]))
                print(f"{n:>30} {c:>7} {v['calls']:>6} {v['wait_s'] / v['calls'] * 1e3:>8.1f} "
                      f"{v['compute_s'] / v['calls'] * 1e3:>11.1f} {b:>12.2f}")
                if c in per_phase:
                    per_phase[c].append((v["compute_s"] / n_rounds, (v["wait_s"] - v["compute_s"]) / n_rounds))
        per_call = sum(b * c for b, c in over) / max(1, sum(c for _, c in over))
        calls_per_round = sum(v["calls"] for kinds_ in cross[k].values() for c, v in kinds_.items()
                              if c in PHASES) / max(1, n_rounds) / max(1, len(cross[k]))
        predicted = sum(max((cp + bd for cp, bd in per_phase[p]), default=0.0) for p in PHASES) * 1e3
        summed = sum(cp for p in PHASES for cp, _ in per_phase[p]) * 1e3
        boundary_round = sum(max((bd for _, bd in per_phase[p]), default=0.0) for p in PHASES) * 1e3
        measured = next(r["round_ms"] for r in rows if r["kind"] == k)
        model[k] = {"boundary_ms_per_call": per_call, "calls_per_round_per_member": calls_per_round,
                    "boundary_ms_per_round": boundary_round, "predicted_round_ms": predicted,
                    "sum_over_members_ms": summed, "measured_round_ms": measured}
        print(f"boundary: {per_call:.2f} ms per call, {calls_per_round:.1f} calls per member per round -> "
              f"{boundary_round:.1f} ms per round ({boundary_round / measured:.1%} of the round)")
        print(f"round model: sum over phases of max over members (compute + boundary) = {predicted:.0f} ms; "
              f"measured {measured:.0f} ms; members in turn (sum of compute) {summed:.0f} ms")
    for e in ens.values():
        e.close()
    if args.out:
        Path(args.out).write_text(json.dumps({"models": models, "batch": args.batch, "rows": rows, "runs": runs,
                                              "boundary": cross, "model": model}, indent=1) + "\n")
    return 0 if all(r["same_text"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
