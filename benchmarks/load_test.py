"""Load test of `specem-fast serve` on loopback: concurrent streaming clients.

Starts the OpenAI-compatible server in this process on 127.0.0.1 (a free port)
over the default models in float32, computes every prompt's greedy answer
offline first, then for each concurrency level C runs C streaming clients, each
sending REQUESTS chat requests one after another (48-token greedy answers to
distinct GSM8K prompts). Checks that every stream is complete (finish_reason,
`data: [DONE]`) and equals its own offline answer (nothing dropped or mixed),
and that no request failed other than with a 429 (retried after Retry-After).
Prints per level: total tokens/s, time to first segment p50/p95, request
latency p50/p95, mean requests per engine round, and tokens/s relative to C=1.
Bounded: at most max(levels) x REQUESTS requests per level, and --time-limit
seconds in all (it stops and fails past that).

    .venv/bin/python benchmarks/load_test.py [--quick] [--levels 1,2,4,8,16] [--max-tokens 48]
        [--requests 2] [--max-batch 16] [--out FILE.json] [--models A,B,C] [--recommended [--weights F]]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

import httpx

from specem_fast import Ensemble
from specem_fast.config import GenerationSettings
from specem_fast.measure.datasets import load_gsm8k
from specem_fast.server import BackgroundServer, create_app


# README's recommended setting (issue 8): what a deployment of these members would serve
RECOMMENDED = {"init_weights": "prior", "exit_threshold": 0.2, "exit_patience": 2, "skip_agreed": True}
RECOMMENDED_WEIGHTS = Path(__file__).parent / "eval" / "weights-gsm8k-dev-partial46.json"


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100); NaN for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def stream_one(url: str, messages: list, max_tokens: int, deadline: float, max_429: int = 50) -> dict:
    """One streaming chat request; returns its text, timings and what went wrong (if anything)."""
    body = {"model": "specem-fast", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    refused = 0
    while True:
        t0 = time.perf_counter()
        first = None
        parts, finish, usage, done, error = [], None, None, False, None
        timeout = max(1.0, deadline - time.monotonic())
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
            if r.status_code == 429 and refused < max_429 and time.monotonic() < deadline:
                refused += 1
                r.read()
                time.sleep(float(r.headers.get("retry-after", "1")))
                continue
            if r.status_code != 200:
                r.read()
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}", "refused": refused}
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    error = obj["error"]["message"]
                    continue
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj["choices"]:
                    text = ch["delta"].get("content") or ""
                    if text and first is None:
                        first = time.perf_counter() - t0
                    parts.append(text)
                    finish = ch.get("finish_reason") or finish
        latency = time.perf_counter() - t0
        problem = error or (None if done else "no [DONE]") or (None if finish else "no finish_reason") or \
            (None if usage else "no usage chunk")
        return {"text": "".join(parts), "ttfs": first if first is not None else latency, "latency": latency,
                "tokens": usage["completion_tokens"] if usage else 0, "error": problem, "refused": refused}


def run_level(url: str, chats: list, refs: list[str], clients: int, per_client: int, max_tokens: int,
              deadline: float) -> dict:
    """C clients, each sending its requests one after another; all prompts distinct."""
    results: list[dict | None] = [None] * (clients * per_client)

    def client(c: int) -> None:
        for k in range(per_client):
            i = c * per_client + k
            if time.monotonic() > deadline:
                results[i] = {"error": "time limit reached before this request"}
                return
            try:
                results[i] = stream_one(url, chats[i], max_tokens, deadline)
            except Exception as exc:  # noqa: BLE001 - reported below
                results[i] = {"error": f"{type(exc).__name__}: {exc}"}

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    errors, mismatched = [], []
    for i, res in enumerate(results):
        if res is None or res.get("error"):
            errors.append(f"request {i}: {res and res.get('error')}")
        elif res["text"] != refs[i]:
            mismatched.append(i)
    ok = [r for r in results if r and not r.get("error")]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "requests": len(results), "wall_s": wall, "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttfs_p50": percentile([r["ttfs"] for r in ok], 50), "ttfs_p95": percentile([r["ttfs"] for r in ok], 95),
        "latency_p50": percentile([r["latency"] for r in ok], 50),
        "latency_p95": percentile([r["latency"] for r in ok], 95),
        "refused_429": sum((r or {}).get("refused", 0) for r in results),
        "errors": errors, "mismatched": mismatched,
    }


def _histogram_sums(url: str, name: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    vals = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix + " "):
                vals[suffix] = float(line.split()[1])
    return vals.get("_sum", 0.0), vals.get("_count", 0.0)


def run_load(ens: Ensemble, prompts: list[str], levels: list[int], max_tokens: int, per_client: int,
             time_limit: float, log=print, settings: dict | None = None) -> dict:
    """Offline references, then every level against a server on 127.0.0.1; returns the report.

    ``settings``: ensemble settings of every request (the server's defaults and the offline run's).
    """
    settings = dict(settings or {})
    need = max(levels) * per_client
    if len(prompts) < need:
        raise ValueError(f"{need} distinct prompts needed, {len(prompts)} given")
    chats = [[{"role": "user", "content": p}] for p in prompts[:need]]
    t0 = time.perf_counter()
    refs = [r.text for r in ens.generate(messages=chats, max_new_tokens=max_tokens, temperature=0.0, **settings)]
    log(f"offline greedy answers: {need} in {time.perf_counter() - t0:.1f}s")
    deadline = time.monotonic() + time_limit
    report = {"max_tokens": max_tokens, "requests_per_client": per_client, "models": ens.model_names,
              "max_batch": ens.config.max_batch, "settings": settings, "levels": []}
    with BackgroundServer(create_app(ens, defaults=GenerationSettings().with_overrides(**settings))) as srv:
        for c in levels:
            s0, n0 = _histogram_sums(srv.url, "specem_round_requests")
            row = run_level(srv.url, chats, refs, c, per_client, max_tokens, deadline)
            s1, n1 = _histogram_sums(srv.url, "specem_round_requests")
            row["mean_batch"] = (s1 - s0) / (n1 - n0) if n1 > n0 else 0.0
            report["levels"].append(row)
            log(format_row(row, report["levels"][0]))
            if row["errors"] or row["mismatched"]:
                break
    base = report["levels"][0]["tokens_per_s"] or float("nan")
    for row in report["levels"]:
        row["ratio_to_1"] = row["tokens_per_s"] / base
    report["ok"] = all(not r["errors"] and not r["mismatched"] for r in report["levels"]) and \
        len(report["levels"]) == len(levels)
    return report


HEADER = (f"{'clients':>7} {'requests':>8} {'tokens':>6} {'tok/s':>7} {'x C=1':>6} {'TTFS p50':>9} {'p95':>7} "
          f"{'latency p50':>12} {'p95':>7} {'batch':>6} {'429s':>5}")


def format_row(row: dict, first: dict) -> str:
    ratio = row["tokens_per_s"] / first["tokens_per_s"] if first["tokens_per_s"] else float("nan")
    line = (f"{row['clients']:>7} {row['requests']:>8} {row['tokens']:>6} {row['tokens_per_s']:>7.2f} {ratio:>6.2f} "
            f"{row['ttfs_p50']:>8.2f}s {row['ttfs_p95']:>6.2f}s {row['latency_p50']:>11.2f}s {row['latency_p95']:>6.2f}s "
            f"{row.get('mean_batch', 0):>6.2f} {row['refused_429']:>5}")
    for e in row["errors"][:5]:
        line += f"\n        ERROR {e}"
    if row["mismatched"]:
        line += f"\n        MISMATCH: requests {row['mismatched']} differ from their offline greedy answers"
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="levels 1,2,4, 16 tokens, one request per client")
    ap.add_argument("--levels", default=None, help="concurrency levels (default 1,2,4,8,16)")
    ap.add_argument("--max-tokens", type=int, default=None, help="answer length (default 48)")
    ap.add_argument("--requests", type=int, default=None, help="requests per client per level (default 2)")
    ap.add_argument("--max-batch", type=int, default=16, help="engine slots (default 16)")
    ap.add_argument("--cache-tokens", type=int, default=1024, help="KV budget per request (default 1024)")
    ap.add_argument("--models", default=None, help="comma-separated models (default: the default models)")
    ap.add_argument("--time-limit", type=float, default=3600, help="seconds for all levels (default 3600)")
    ap.add_argument("--recommended", action="store_true",
                    help="serve README's recommended setting (prior weights from --weights, model exit, agreement "
                         "fast path) instead of the reference method")
    ap.add_argument("--weights", default=str(RECOMMENDED_WEIGHTS),
                    help=f"prior weights for --recommended (default {RECOMMENDED_WEIGHTS})")
    ap.add_argument("--out", default=None, help="also write the report as JSON")
    args = ap.parse_args(argv)
    levels = [int(x) for x in (args.levels or ("1,2,4" if args.quick else "1,2,4,8,16")).split(",")]
    max_tokens = args.max_tokens or (16 if args.quick else 48)
    per_client = args.requests or (1 if args.quick else 2)
    ens = Ensemble.from_pretrained(args.models, dtype="float32", cache_tokens=args.cache_tokens,
                                   max_batch=args.max_batch, progress=True)
    settings = {}
    if args.recommended:
        ens.load_weights(args.weights)
        settings = dict(RECOMMENDED)
    try:
        prompts = [it.prompt for it in load_gsm8k(max(levels) * per_client)]
        print(f"models: {', '.join(ens.model_names)}; {max_tokens}-token greedy answers, {per_client} request(s) "
              f"per client, max_batch {args.max_batch}")
        print(HEADER)
        report = run_load(ens, prompts, levels, max_tokens, per_client, args.time_limit,
                          log=lambda s: print(s, flush=True) if not s.startswith("offline") else
                          print(s, file=sys.stderr, flush=True), settings=settings)
    finally:
        ens.close()
    report["command"] = "python benchmarks/load_test.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("OK: every stream complete and equal to its offline greedy answer" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
