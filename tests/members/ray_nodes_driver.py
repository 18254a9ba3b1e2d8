"""The driver of tests/members/test_ray_nodes.py, run inside the head node's network
namespace (``ip netns exec HEAD python ray_nodes_driver.py CONFIG_JSON``).

Prints one JSON object per line, one per phase, so the test sees how far it got:
``local`` (the greedy texts in process), ``placed`` (members and their nodes, the
texts on two nodes), ``netem`` (the same with 20 ms on the link, or why not),
``killed`` (the request running when the worker node's processes were killed:
its error and how long it took), ``down`` (requests while the member's node is
gone), ``rejoined`` (the first request served after the node came back).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx

from specem_fast import Ensemble
from specem_fast.server import BackgroundServer, create_app

PROMPTS = ["Write a short poem about the sea.", "What is 17 plus 25?"]
KW = dict(max_new_tokens=12, window=4, temperature=0.0)
BUILD = dict(cache_tokens=512, max_batch=2, dtype="float32")


def emit(phase: str, **data) -> None:
    print(json.dumps({"phase": phase, **data}), flush=True)


def attempt(ens: Ensemble, prompt: str) -> tuple[str | None, str | None, float]:
    """(text, error, seconds) of one greedy request."""
    t0 = time.monotonic()
    try:
        return ens.generate(prompt, **KW).text, None, time.monotonic() - t0
    except Exception as exc:  # noqa: BLE001 - reported
        return None, f"{type(exc).__name__}: {exc}", time.monotonic() - t0


def netem(cfg: dict, on: bool) -> str | None:
    """20 ms each way on the veth pair (tc netem); None, or why it could not be set."""
    for ns, dev in ((cfg["head_ns"], cfg["head_dev"]), (cfg["worker_ns"], cfg["worker_dev"])):
        cmd = ["ip", "netns", "exec", ns, "tc", "qdisc", "add" if on else "del", "dev", dev, "root"]
        if on:
            cmd += ["netem", "delay", "20ms"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 and on:
            return f"`{' '.join(cmd)}` failed: {r.stderr.strip() or r.returncode}"
    return None


def kill_worker_node(ns: str) -> list[int]:
    """SIGKILL every process of the worker node's namespace (raylet, workers, agents)."""
    pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
    for p in pids:
        subprocess.run(["kill", "-9", str(p)], capture_output=True)
    return pids


def health(url: str) -> dict:
    r = httpx.get(url + "/health", timeout=30)
    return dict(r.json(), code=r.status_code)


def main(cfg: dict) -> None:
    local = Ensemble.from_pretrained(cfg["models"], **BUILD)
    try:
        ref = [r.text for r in local.generate(PROMPTS, **KW)]
    finally:
        local.close()
    emit("local", texts=ref)

    t0 = time.monotonic()
    ens = Ensemble.from_pretrained(cfg["models"], placement="ray", **BUILD)
    srv = BackgroundServer(create_app(ens)).start()  # the server's view: /health
    try:
        remote = ens.metadata["remote"]
        texts = [r.text for r in ens.generate(PROMPTS, **KW)]
        emit("placed", nodes={n: m["node"] for n, m in remote.items()}, texts=texts,
             load_s=time.monotonic() - t0)

        t0 = time.monotonic()
        texts = [r.text for r in ens.generate(PROMPTS, **KW)]
        plain_s = time.monotonic() - t0
        why = netem(cfg, True)
        if why is None:
            try:
                t0 = time.monotonic()
                texts = [r.text for r in ens.generate(PROMPTS, **KW)]
                emit("netem", texts=texts, plain_s=plain_s, delayed_s=time.monotonic() - t0)
            finally:
                netem(cfg, False)
        else:
            emit("netem", skipped=why)

        victim = next(n for n, m in remote.items() if m["node"] == cfg["worker_ip"])
        stream = ens.stream(PROMPTS[0], max_new_tokens=400, window=4, temperature=0.0)
        for _ in range(2):  # the request is running: two rounds released
            next(stream)
        pids = kill_worker_node(cfg["worker_ns"])
        t0 = time.monotonic()
        error = None
        try:
            for _ in stream:
                pass
        except Exception as exc:  # noqa: BLE001 - reported
            error = f"{type(exc).__name__}: {exc}"
        emit("killed", victim=victim, error=error, seconds=time.monotonic() - t0, pids=len(pids))

        down = [attempt(ens, PROMPTS[1]) for _ in range(3)]
        emit("down", attempts=[{"text": t, "error": e, "seconds": s} for t, e, s in down],
             state=ens.metadata["remote"][victim].get("state"), health=health(srv.url))

        t0 = time.monotonic()
        subprocess.run(cfg["worker_start"], check=True, capture_output=True)
        tries, text, error = 0, None, None
        while time.monotonic() - t0 < cfg["rejoin_within"]:
            tries += 1
            text, error, _ = attempt(ens, PROMPTS[1])
            if text is not None:
                break
            time.sleep(1)
        texts = [r.text for r in ens.generate(PROMPTS, **KW)] if text is not None else None
        emit("rejoined", text=text, error=error, texts=texts, tries=tries, seconds=time.monotonic() - t0,
             member=ens.metadata["remote"][victim], health=health(srv.url))
    finally:
        srv.stop()
        ens.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
