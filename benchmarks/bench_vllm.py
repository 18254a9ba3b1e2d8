"""Scale out over HTTP: what a member served by vLLM costs per round, against our own runner.

Part 1, per call (one request, SmolLM2-135M-Instruct in float32 on both sides), at several
sequence lengths P: the draft call (window W, greedy; the server's prefix cache holds the
sequence from the previous round), the verify call (K candidates of about W tokens as K
prompts with prompt_logprobs: vLLM re-prefills the whole sequence once per candidate; with
verify=cached one prompt per candidate token, which reads the prefix cache) and
the same two calls on our in-process runner (its KV cache holds the sequence), plus the
HTTP floor (a one-token prompt, one token out).

Part 2, end to end: the same greedy generations with gemma3-270m in process and SmolLM2
either in process or on vLLM, each as drafter and verifier or as a drafter only
(verifiers = gemma3-270m), one ensemble after another on the same prompts: tokens/s, round time, draft/verify time
per round, and whether the texts equal the in-process ensemble's.

    .venv/bin/python benchmarks/bench_vllm.py [--url http://127.0.0.1:PORT] [--compiled]
        [--prefixes 64,300,1000,2000] [--window 10] [--candidates 3] [--reps 5]
        [--max-new-tokens 48] [--e2e-reps 2] [--out FILE.json]

Without --url it starts a vLLM server (tests/vllm_server.py: .venv-vllm from
scripts/setup_vllm.sh; --compiled: with vLLM's torch.compile warm-up, as vLLM runs by
default, instead of --enforce-eager). The server's engine takes one of the CPU's cores
(vLLM binds it; the other is left to its API process), so on a 2-core machine the
in-process members and the server share the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from specem_fast import Ensemble  # noqa: E402
from specem_fast.config import EngineConfig  # noqa: E402
from specem_fast.hub.fetch import model_dir  # noqa: E402
from specem_fast.model.kv_cache import KVCacheManager  # noqa: E402
from specem_fast.members.local.member import LocalMember  # noqa: E402
from specem_fast.members.interface import CommitCall, DraftCall, OpenCall, VerifyCall  # noqa: E402
from specem_fast.model.runner import ModelRunner  # noqa: E402
from specem_fast.members.vllm import VLLMMember  # noqa: E402

SMOL, OTHER = "smollm2-135m-instruct", "gemma3-270m"
TEXT = ("The history of the river begins in the mountains, where snow melts each spring and feeds a "
        "thousand small streams. They join in the valleys, turn mills, water fields and carry boats, "
        "until the river reaches the sea at a wide, slow delta full of birds. ")
PROMPTS = ["Janet has 3 apples and buys 5 more. She gives 2 to her friend. How many apples does she have?",
           "Write a short paragraph about why the sky is blue."]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def per_call(remote: VLLMMember, cached: VLLMMember, local: LocalMember, prefixes: list[int], window: int, k: int,
             reps: int) -> list:
    codec = remote.codec
    long_ids = codec.encode_segment(TEXT * 200)
    rows = []
    members = (("vllm", remote), ("vllm_cached", cached), ("local", local))
    for rid, P in enumerate(prefixes, start=1):
        ids = tuple(long_ids[rid:rid + P])  # another start each time: nothing cached from the last one
        for _, m in members:
            m.open([OpenCall(rid, 0, ids)])
        t = {f"{name}_{call}": [] for name, _ in members for call in ("draft", "verify")}
        n = P
        try:
            for rep in range(reps + 1):  # the first round fills both caches: not timed
                for name, m in members:
                    t0 = time.perf_counter()
                    d, = m.draft([DraftCall(rid, n, window, ignore_stop=True)])
                    t1 = time.perf_counter()
                    cands = ((m.name, d.text), ("b", " and the river reaches the sea at"), ("c", " a slow delta, full of"))
                    m.verify([VerifyCall(rid, n, cands[:k])])
                    t2 = time.perf_counter()
                    if rep:
                        t[f"{name}_draft"].append(t1 - t0)
                        t[f"{name}_verify"].append(t2 - t1)
                    got = m.commit([CommitCall(rid, n, d.text, 0)])[0]
                    n_next = n + len(got)
                n = n_next
        finally:
            for _, m in members:
                m.close([rid])
        local.runner.cache.crop(0, 0)
        row = {"prefix": P, "window": window, "candidates": k, **{key: _median(v) for key, v in t.items()},
               "verify_tokens_prefilled": k * (P + window)}
        rows.append(row)
        print(f"P={P:>5}: vLLM draft {row['vllm_draft'] * 1e3:7.1f} ms, verify {row['vllm_verify'] * 1e3:7.1f} ms, "
              f"verify=cached {row['vllm_cached_verify'] * 1e3:7.1f} ms | "
              f"local draft {row['local_draft'] * 1e3:7.1f} ms, verify {row['local_verify'] * 1e3:7.1f} ms",
              flush=True)
    return rows


def http_floor(url: str, served: str, reps: int) -> float:
    times = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            c.post("/v1/completions", json={"model": served, "prompt": [1], "max_tokens": 1, "temperature": 0,
                                            "return_token_ids": True}).raise_for_status()
            times.append(time.perf_counter() - t0)
    return _median(times[1:])


def end_to_end(url: str, max_new: int, reps: int) -> list:
    spec = f"vllm:{url}#{SMOL}"
    build = dict(cache_tokens=1024, max_batch=1, dtype="float32", kernels="torch", preset="reference")
    kinds = {
        "in process": ([OTHER, SMOL], None),
        "SmolLM2 on vLLM": ([OTHER, spec], None),
        "SmolLM2 on vLLM, verify=cached": ([OTHER, spec + ";verify=cached"], None),
        "in process, SmolLM2 drafts only": ([OTHER, SMOL], [OTHER]),
        "SmolLM2 on vLLM, drafts only": ([OTHER, spec], [OTHER]),
    }
    runs: dict[str, list] = {}
    texts: dict[str, list] = {}
    for k, (models, ver) in kinds.items():  # one ensemble at a time (memory), the same prompts for each
        e = Ensemble.from_pretrained(models, verifiers=ver, **build)
        try:
            e.generate(PROMPTS[0], max_new_tokens=8, temperature=0.0)  # first-call costs out of the way
            runs[k] = []
            for _ in range(reps):
                t0 = time.perf_counter()
                out = [e.generate(p, max_new_tokens=max_new, temperature=0.0) for p in PROMPTS]  # one at a time
                runs[k].append((time.perf_counter() - t0, out))
                texts[k] = [r.text for r in out]
        finally:
            e.close()
        print(f"{k}: {[round(w, 1) for w, _ in runs[k]]} s", flush=True)
    rows = []
    base_text = {False: texts["in process"], True: texts["in process, SmolLM2 drafts only"]}
    for k, got in runs.items():
        walls = [w for w, _ in got]
        outs = got[-1][1]
        tokens = sum(r.new_tokens for r in outs)
        rounds = sum(len(r.rounds) for r in outs)
        draft = sum(r.timings["draft_s"] for r in outs)
        verify = sum(r.timings["verify_s"] for r in outs)
        wall = _median(walls)
        row = {"kind": k, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "rounds": rounds,
               "round_ms": 1e3 * wall / rounds, "draft_ms": 1e3 * draft / rounds, "verify_ms": 1e3 * verify / rounds,
               "same_text": texts[k] == base_text["drafts only" in k]}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running vLLM server serving SmolLM2 as smollm2-135m-instruct")
    ap.add_argument("--compiled", action="store_true", help="start the server with its torch.compile warm-up")
    ap.add_argument("--prefixes", default="64,300,1000,2000")
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--e2e-reps", type=int, default=2)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    server = None
    url = args.url
    if url is None:
        from vllm_server import VLLMServer

        server = VLLMServer(model_dir(SMOL), SMOL, max_model_len=4096, eager=not args.compiled).start()
        url = server.url
        print(f"vLLM server up in {server.start_s:.1f} s ({'compiled' if args.compiled else 'eager'})", flush=True)
    try:
        folder = model_dir(SMOL)
        remote = VLLMMember(f"vllm:{url}#{SMOL}", url, SMOL, folder, EngineConfig(cache_tokens=4096))
        cached = VLLMMember(f"vllm:{url}#{SMOL};verify=cached", url, SMOL, folder, EngineConfig(cache_tokens=4096),
                            verify="cached")
        runner = ModelRunner(SMOL, folder, "cpu", "float32", "torch")
        runner.cache = KVCacheManager([runner.cache_shape], 1, 4096)[SMOL]
        local = LocalMember(runner)
        print(f"torch threads here {torch.get_num_threads()}; server {url} ({remote.describe()})", flush=True)
        floor = http_floor(url, SMOL, args.reps)
        print(f"HTTP floor (1-token prompt, 1 token out): {floor * 1e3:.1f} ms", flush=True)
        calls = per_call(remote, cached, local, [int(p) for p in args.prefixes.split(",")], args.window,
                         args.candidates, args.reps)
        remote.shutdown()
        cached.shutdown()
        del local, runner
        e2e = [] if args.skip_e2e else end_to_end(url, args.max_new_tokens, args.e2e_reps)
        if e2e:
            print("\n| kind | tokens/s | round ms | draft ms/round | verify ms/round | same text |")
            print("|---|---|---|---|---|---|")
            for r in e2e:
                print(f"| {r['kind']} | {r['tokens_per_s']:.2f} | {r['round_ms']:.0f} | {r['draft_ms']:.0f} | "
                      f"{r['verify_ms']:.0f} | {r['same_text']} |")
        if args.out:
            Path(args.out).write_text(json.dumps({"url": url, "server": "given (--url)" if args.url else
                                                  ("started, compiled" if args.compiled else "started, eager"),
                                                  "http_floor_s": floor, "per_call": calls, "end_to_end": e2e},
                                                 indent=2))
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
