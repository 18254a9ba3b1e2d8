"""Soak test of `specem-fast serve`: N minutes of mixed load on loopback.

Starts `python -m specem_fast serve` as a child process on 127.0.0.1 (a free
port), asks each fixed greedy prompt once alone (its reference answer), then
runs CLIENTS client threads for MINUTES minutes, each picking at random:

- a fixed greedy prompt (chat or completion, streamed or not), whose text must
  equal its reference answer (else a mismatch);
- a sampled request (temperature 0.8, a seed), streamed or not;
- a client that hangs up: a stream closed after its first chunk, or a plain
  request given up after a fraction of a second;
- a bad request (a wrong type, an unknown field, n=2, a negative max_tokens,
  a body that is not JSON): it must be a 400;
- an oversized body (over --max-body-mb): it must be a 413;

plus a burst every BURST seconds of max_batch + max_waiting + 4 requests at
once, past the queue (429s expected). A 429 is an outcome, never retried.

Every 5 s it samples the server process (RSS, open file descriptors, threads)
and /health (running, waiting). Prints one line per minute: requests, latency
p50/p95/p99 of the answered ones, RSS, files, threads, outcomes by status,
mismatches; then the totals, and whether the server came back to running 0 and
waiting 0 and exited 0 on SIGTERM. Exit status 0 when there was no mismatch,
no 5xx, no broken answer, and the server came back idle.

    .venv/bin/python benchmarks/soak.py [--minutes 12] [--clients 5] [--max-batch 4] [--max-waiting 4]
        [--models A,B] [--dtype float32] [--preset auto] [--deterministic] [--max-tokens 32] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

# fixed greedy prompts: (kind, prompt or chat text); their answers alone are the references
FIXED = [
    ("chat", "What is 17 * 23?"),
    ("chat", "Name three primary colours."),
    ("completion", "The capital of France is"),
    ("chat", "Write one sentence about the sea."),
    ("completion", "def fibonacci(n):"),
    ("chat", "Give me a word that rhymes with cat."),
]
FREE = ["Tell me a short story about a robot.", "Why is the sky blue?", "List some fruits.",
        "Explain recursion briefly.", "What should I cook tonight?", "Describe a mountain."]
BAD = [
    {"prompt": "Hi", "max_tokens": "many"},
    {"prompt": "Hi", "max_tokens": -3},
    {"prompt": "Hi", "n": 2},
    {"prompt": "Hi", "no_such_field": 1},
    {"messages": []},
    {"prompt": "Hi", "temperature": "hot"},
    {"prompt": "Hi", "top_p": 7},
]
# what a client does, with its weight
ACTIONS = {"fixed": 40, "sampled": 20, "hang_up": 13, "bad": 8, "oversized": 2}


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100); NaN for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# -- the server process ----------------------------------------------------------

def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, str, list[str]]:
    """`specem-fast serve` on a free loopback port; returns (process, base URL, startup line, log)."""
    cmd = [sys.executable, "-m", "specem_fast", "serve", "--host", "127.0.0.1", "--port", "0",
           "--max-batch", str(args.max_batch), "--max-waiting", str(args.max_waiting),
           "--max-body-mb", str(args.max_body_mb), "--cache-tokens", str(args.cache_tokens),
           "--shutdown-timeout", "10", "--log-level", "warning", "--preset", args.preset]
    if args.models:
        cmd += ["--models", args.models]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.deterministic:
        cmd += ["--deterministic"]
    if args.threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    else:
        env = dict(os.environ)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    log: list[str] = []
    deadline = time.monotonic() + args.start_timeout
    for line in proc.stderr:
        log.append(line.rstrip())
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            threading.Thread(target=lambda: log.extend(x.rstrip() for x in proc.stderr), daemon=True).start()
            return proc, m.group(1), line.strip(), log
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the server did not start:\n" + "\n".join(log[-20:]))


def sample_process(pid: int) -> dict:
    """RSS (MiB), open file descriptors and threads of a process, from /proc."""
    out = {"rss_mib": float("nan"), "fds": -1, "threads": -1}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


# -- requests ----------------------------------------------------------------------

def _body(kind: str, text: str, max_tokens: int, **extra) -> tuple[str, dict]:
    if kind == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                                        **extra}
    return "/v1/completions", {"prompt": text, "max_tokens": max_tokens, **extra}


def _text(obj: dict, chat: bool, stream: bool) -> str:
    ch = obj["choices"][0]
    if stream:
        return (ch.get("delta") or {}).get("content") or "" if chat else ch.get("text") or ""
    return ch["message"]["content"] if chat else ch["text"]


def call(client: httpx.Client, path: str, body: dict, stream: bool, hang_up: float | None = None) -> dict:
    """One request: {"status", "text", "latency", "problem"}; ``hang_up``: leave after the
    first chunk (stream) or after that many seconds (plain)."""
    chat = path.endswith("chat/completions")
    t0 = time.perf_counter()
    if not stream:
        try:
            r = client.post(path, json=body, timeout=hang_up or 600)
        except httpx.TimeoutException:
            return {"status": "hung_up", "latency": time.perf_counter() - t0}
        out = {"status": r.status_code, "latency": time.perf_counter() - t0}
        if r.status_code == 200:
            out["text"] = _text(r.json(), chat, False)
            if not r.json()["choices"][0].get("finish_reason"):
                out["problem"] = "no finish_reason"
        return out
    parts, done, finish, problem = [], False, None, None
    with client.stream("POST", path, json=dict(body, stream=True), timeout=600) as r:
        if r.status_code != 200:
            r.read()
            return {"status": r.status_code, "latency": time.perf_counter() - t0}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if hang_up is not None:
                return {"status": "hung_up", "latency": time.perf_counter() - t0}
            if line[6:] == "[DONE]":
                done = True
                break
            obj = json.loads(line[6:])
            if "error" in obj:
                problem = "error event: " + obj["error"].get("message", "")[:200]
                continue
            parts.append(_text(obj, chat, True))
            finish = obj["choices"][0].get("finish_reason") or finish
    if problem is None and not done:
        problem = "no [DONE]"
    elif problem is None and not finish:
        problem = "no finish_reason"
    return {"status": 200, "text": "".join(parts), "latency": time.perf_counter() - t0, "problem": problem}


class Soak:
    def __init__(self, url: str, pid: int, args: argparse.Namespace):
        self.url, self.pid, self.args = url, pid, args
        self.t0 = time.monotonic()
        self.refs: dict[int, str] = {}
        self.lock = threading.Lock()
        self.events: list[dict] = []  # one per request: minute, action, status, latency, mismatch, problem
        self.samples: list[dict] = []  # one per 5 s: minute, rss, fds, threads, running, waiting
        self.stop = threading.Event()

    def minute(self) -> int:
        """The minute of the load now; what ends after the load counts in its last minute."""
        last = max(0, math.ceil(self.args.minutes) - 1)
        return min(last, int((time.monotonic() - self.t0) // 60))

    def record(self, action: str, res: dict, mismatch: bool = False) -> None:
        ev = {"minute": self.minute(), "action": action, "status": res.get("status"),
              "latency": res.get("latency"), "mismatch": mismatch, "problem": res.get("problem")}
        with self.lock:
            self.events.append(ev)

    def references(self) -> None:
        with httpx.Client(base_url=self.url) as c:
            for i, (kind, text) in enumerate(FIXED):
                path, body = _body(kind, text, self.args.max_tokens, temperature=0)
                res = call(c, path, body, stream=False)
                if res["status"] != 200:
                    raise SystemExit(f"reference answer of fixed prompt {i} failed: HTTP {res['status']}")
                self.refs[i] = res["text"]

    def one(self, c: httpx.Client, rng: random.Random, action: str) -> None:
        mt = self.args.max_tokens
        if action == "fixed":
            i = rng.randrange(len(FIXED))
            path, body = _body(*FIXED[i], mt, temperature=0)
            res = call(c, path, body, stream=rng.random() < 0.5)
            self.record(action, res, res.get("status") == 200 and not res.get("problem")
                        and res.get("text") != self.refs[i])
        elif action == "sampled":
            path, body = _body(rng.choice(["chat", "completion"]), rng.choice(FREE), mt, temperature=0.8,
                               top_p=0.95, seed=rng.randrange(10**6))
            self.record(action, call(c, path, body, stream=rng.random() < 0.5))
        elif action == "hang_up":
            path, body = _body(rng.choice(["chat", "completion"]), rng.choice(FREE), 4 * mt, temperature=0)
            stream = rng.random() < 0.5  # a stream is left after its first chunk, a plain request after a moment
            self.record(action, call(c, path, body, stream=stream, hang_up=1.0 if stream else rng.uniform(0.05, 0.5)))
        elif action == "bad":
            body = rng.choice(BAD + [None])
            if body is None:
                t0 = time.perf_counter()
                r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
                self.record(action, {"status": r.status_code, "latency": time.perf_counter() - t0})
            else:
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                self.record(action, call(c, path, body, stream=False))
        elif action == "oversized":
            size = int(self.args.max_body_mb * 2**20) + 4096
            body = {"prompt": "x" * size, "max_tokens": 4}
            with httpx.Client(base_url=self.url) as own:  # the server may close this connection
                self.record(action, call(own, "/v1/completions", body, stream=False))

    def client(self, k: int) -> None:
        rng = random.Random(self.args.seed * 1000 + k)
        names, weights = zip(*ACTIONS.items())
        with httpx.Client(base_url=self.url) as c:
            while not self.stop.is_set():
                action = rng.choices(names, weights)[0]
                try:
                    self.one(c, rng, action)
                except Exception as exc:  # noqa: BLE001 - an outcome like any other
                    self.record(action, {"status": f"exception:{type(exc).__name__}"})

    def burst(self) -> None:
        n = self.args.max_batch + self.args.max_waiting + 4
        while not self.stop.wait(self.args.burst):
            def fire(j: int) -> None:
                with httpx.Client(base_url=self.url) as c:
                    path, body = _body("completion", FREE[j % len(FREE)], 8, temperature=0)
                    try:
                        self.record("burst", call(c, path, body, stream=j % 2 == 0))
                    except Exception as exc:  # noqa: BLE001
                        self.record("burst", {"status": f"exception:{type(exc).__name__}"})
            ts = [threading.Thread(target=fire, args=(j,)) for j in range(n)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

    def health(self, c: httpx.Client) -> dict:
        try:
            h = c.get("/health", timeout=10).json()
            return {"running": h.get("running"), "waiting": h.get("waiting")}
        except Exception:  # noqa: BLE001
            return {"running": None, "waiting": None}

    def monitor(self) -> None:
        with httpx.Client(base_url=self.url) as c:
            while True:
                s = {"minute": self.minute(), **sample_process(self.pid), **self.health(c)}
                with self.lock:
                    self.samples.append(s)
                if self.stop.wait(5):
                    return

    def run(self, seconds: float) -> None:
        threads = [threading.Thread(target=self.client, args=(k,)) for k in range(self.args.clients)]
        threads += [threading.Thread(target=self.burst), threading.Thread(target=self.monitor)]
        self.t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(seconds)
        self.stop.set()
        for t in threads:
            t.join()

    def back_to_idle(self, within: float = 120) -> dict:
        deadline = time.monotonic() + within
        with httpx.Client(base_url=self.url) as c:
            while True:
                h = self.health(c)
                if (h["running"] == 0 and h["waiting"] == 0) or time.monotonic() > deadline:
                    return h
                time.sleep(0.5)


# -- the report ----------------------------------------------------------------------

def summarize(soak: Soak) -> dict:
    minutes = sorted({e["minute"] for e in soak.events} | {s["minute"] for s in soak.samples})
    rows = []
    for m in minutes:
        evs = [e for e in soak.events if e["minute"] == m]
        smp = [s for s in soak.samples if s["minute"] == m]
        lat = [e["latency"] for e in evs if e["status"] == 200 and e["action"] in ("fixed", "sampled", "burst")
               and e["latency"] is not None]
        last = smp[-1] if smp else {}
        rows.append({"minute": m, "requests": len(evs), "p50": percentile(lat, 50), "p95": percentile(lat, 95),
                     "p99": percentile(lat, 99), "rss_mib": last.get("rss_mib"), "fds": last.get("fds"),
                     "threads": last.get("threads"),
                     "outcomes": dict(Counter(str(e["status"]) for e in evs)),
                     "mismatches": sum(e["mismatch"] for e in evs)})
    evs = soak.events
    rss = [(s["minute"], s["rss_mib"]) for s in soak.samples if s["rss_mib"] == s["rss_mib"]]
    settled = [r for m, r in rss if m >= min(6, max(m for m, _ in rss))] if rss else []
    fixed_ok = [e for e in evs if e["action"] == "fixed" and e["status"] == 200 and not e["problem"]]
    return {
        "minutes": rows,
        "requests": len(evs),
        "outcomes": dict(Counter(str(e["status"]) for e in evs)),
        "by_action": {a: dict(Counter(str(e["status"]) for e in evs if e["action"] == a))
                      for a in sorted({e["action"] for e in evs})},
        "greedy_checked": len(fixed_ok),
        "mismatches": sum(e["mismatch"] for e in evs),
        "server_errors": sum(isinstance(e["status"], int) and e["status"] >= 500 for e in evs),
        "exceptions": sum(str(e["status"]).startswith("exception") for e in evs),
        "broken": [e["problem"] for e in evs if e["problem"] and e["action"] != "hang_up"][:10],
        "wrong_status": [f"{e['action']}: {e['status']}" for e in evs
                         if (e["action"] == "bad" and e["status"] != 400)
                         or (e["action"] == "oversized" and e["status"] != 413)][:10],
        "references": {FIXED[i][1]: t for i, t in soak.refs.items()},
        # RSS from minute 6 on (or the last minute of a shorter soak) to the end: (first, last, change in %)
        "rss_settled": (settled[0], settled[-1], 100 * (settled[-1] / settled[0] - 1)) if settled else None,
    }


HEADER = (f"{'min':>3} {'reqs':>5} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'RSS MiB':>8} {'fds':>4} {'thr':>4} "
          f"{'mism':>4}  outcomes")


def format_row(r: dict) -> str:
    r = {k: (-1 if v is None else v) for k, v in r.items()}
    outcomes = " ".join(f"{k}:{v}" for k, v in sorted(r["outcomes"].items()))
    return (f"{r['minute']:>3} {r['requests']:>5} {r['p50']:>7.2f} {r['p95']:>7.2f} {r['p99']:>7.2f} "
            f"{r['rss_mib']:>8.1f} {r['fds']:>4} {r['threads']:>4} {r['mismatches']:>4}  {outcomes}")


def run_soak(args: argparse.Namespace, log=print) -> dict:
    proc, url, startup, server_log = start_server(args)
    report: dict = {"startup": startup}
    try:
        log(startup)
        soak = Soak(url, proc.pid, args)
        t = time.perf_counter()
        soak.references()
        log(f"references: {len(soak.refs)} fixed greedy prompts answered alone in {time.perf_counter() - t:.1f}s")
        soak.run(args.minutes * 60)
        report.update(summarize(soak))
        report["after"] = soak.back_to_idle()
        report["after"].update(sample_process(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            report["exit_code"] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            report["exit_code"] = "killed after 60 s"
    report["server_log_tail"] = [x for x in server_log if "Traceback" in x or "ERROR" in x][:20]
    report["ok"] = (report.get("mismatches") == 0 and report.get("server_errors") == 0 and not report.get("broken")
                    and not report.get("wrong_status") and report.get("exceptions") == 0
                    and report.get("after", {}).get("running") == 0 and report["after"].get("waiting") == 0
                    and report["exit_code"] == 0)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=12, help="how long the load runs (default 12)")
    ap.add_argument("--clients", type=int, default=5, help="client threads (default 5)")
    ap.add_argument("--burst", type=float, default=20, help="seconds between bursts past the queue (default 20)")
    ap.add_argument("--max-batch", type=int, default=4, help="serve --max-batch (default 4)")
    ap.add_argument("--max-waiting", type=int, default=4, help="serve --max-waiting (default 4)")
    ap.add_argument("--max-body-mb", type=float, default=1.0, help="serve --max-body-mb (default 1)")
    ap.add_argument("--cache-tokens", type=int, default=1024, help="serve --cache-tokens (default 1024)")
    ap.add_argument("--max-tokens", type=int, default=32, help="answer length of the load (default 32)")
    ap.add_argument("--models", default=None, help="serve --models (default: the default models)")
    ap.add_argument("--dtype", default="float32", help="serve --dtype (default float32)")
    ap.add_argument("--preset", default="auto", help="serve --preset (default auto, as serve)")
    ap.add_argument("--deterministic", action="store_true", help="serve --deterministic (batch-independent answers)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default: unset)")
    ap.add_argument("--seed", type=int, default=0, help="the clients' random choices (default 0)")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds for the server to load (default 600)")
    ap.add_argument("--out", default=None, help="also write the report as JSON")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_soak(args)
    print(HEADER)
    for r in report.get("minutes", []):
        print(format_row(r))
    print(f"requests {report.get('requests')}, outcomes {report.get('outcomes')}")
    print(f"by action: {report.get('by_action')}")
    print(f"greedy answers checked {report.get('greedy_checked')}, mismatches {report.get('mismatches')}, "
          f"5xx {report.get('server_errors')}, client exceptions {report.get('exceptions')}")
    for what in ("broken", "wrong_status", "server_log_tail"):
        if report.get(what):
            print(f"{what}: {report[what]}")
    if report.get("rss_settled"):
        first, last, pct = report["rss_settled"]
        print(f"RSS from minute {min(6, len(report['minutes']) - 1)} to the end: {first:.1f} -> {last:.1f} MiB "
              f"({pct:+.2f}%)")
    print(f"afterwards: {report.get('after')}; exit code on SIGTERM {report.get('exit_code')}")
    report["command"] = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
