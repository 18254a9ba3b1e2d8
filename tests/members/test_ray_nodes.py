"""Issue 28: members on two Ray nodes on one machine.

Two hosts are made of network namespaces joined by a veth pair (``ip netns``,
root): the head node (``ray start --head``) in one, a worker node (``ray start
--address HEAD:6379``) in the other, each with one CPU, and the members placed
as docs/scale-out.md says (``placement="ray"``, ``SPECEM_RAY_THREADS=1``: one CPU
per member, so one member lands on each node). The driver
(tests/members/ray_nodes_driver.py) runs in the head's namespace and checks:
the same greedy text as in process; 20 ms on the link (``tc netem``) changes
nothing but time; the worker node's processes killed mid-request fail that
request within the call timeout, naming the member and its node; while the node
is gone the member is down, requests are refused in one line and the server's
/health says "degraded" (503); once the node
rejoins, the member is restarted there and serves the same text again.

Skipped (with the reason) where network namespaces, root or Ray's CLI are not
available. Namespaces and every process in them are removed in a finally.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

RAY = Path(sys.executable).parent / "ray"
DRIVER = Path(__file__).with_name("ray_nodes_driver.py")
CALL_TIMEOUT = 30  # SPECEM_RAY_TIMEOUT of the driver
RESTART_WAIT = 5  # SPECEM_RAY_RESTART_WAIT of the driver
# the GCS declares a node dead after about 3 missed one-second health checks (default: about 30 s)
FAST_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
               "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"`{' '.join(cmd)}` exited {r.returncode}:\n{tail}")
    return r


def _kill_namespace(ns: str) -> None:
    out = _run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in out:
        _run("kill", "-9", pid, check=False)


class Hosts:
    """Two network namespaces joined by a veth pair, with a Ray node in each."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        net = 10 + os.getpid() % 200
        self.head_ns, self.worker_ns = f"sphead{tag}", f"spwork{tag}"
        self.head_dev, self.worker_dev = f"sph{tag}", f"spw{tag}"
        self.head_ip, self.worker_ip = f"10.213.{net}.1", f"10.213.{net}.2"
        self.tmp = Path(tempfile.mkdtemp(prefix="spray", dir="/tmp"))  # short: Ray's socket paths
        self.made: list[str] = []
        # every node and the driver share one token, as docs/scale-out.md says for a cluster over machines
        # (a token file a local cluster left in ~/.ray would otherwise turn it on for the head alone)
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))

    def build(self) -> None:
        for ns in (self.head_ns, self.worker_ns):
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _run("ip", "link", "add", self.head_dev, "type", "veth", "peer", "name", self.worker_dev)
        for ns, dev, ip in ((self.head_ns, self.head_dev, self.head_ip),
                            (self.worker_ns, self.worker_dev, self.worker_ip)):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")

    def worker_start(self) -> list[str]:
        return ["ip", "netns", "exec", self.worker_ns, str(RAY), "start", f"--address={self.head_ip}:6379",
                f"--node-ip-address={self.worker_ip}", "--num-cpus=1", "--disable-usage-stats",
                f"--temp-dir={self.tmp / 'w'}"]

    def start_ray(self) -> None:
        env = dict(self.env, **FAST_HEALTH)
        _run("ip", "netns", "exec", self.head_ns, str(RAY), "start", "--head", f"--node-ip-address={self.head_ip}",
             "--port=6379", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={self.tmp / 'h'}", env=env, timeout=120)
        _run(*self.worker_start(), env=self.env, timeout=120)

    def cleanup(self) -> None:
        for ns in reversed(self.made):
            _kill_namespace(ns)
        time.sleep(0.5)
        for ns in reversed(self.made):
            _kill_namespace(ns)  # anything a dying raylet started meanwhile
            _run("ip", "netns", "del", ns, check=False)
        _run("ip", "link", "del", self.head_dev, check=False)  # only if it never moved into a namespace
        shutil.rmtree(self.tmp, ignore_errors=True)


def _why_not() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    if not RAY.exists():
        return f"needs Ray's CLI at {RAY} (pip install 'specem-fast[ray]')"
    probe = f"spprobe{os.getpid() % 100000}"
    r = _run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"network namespaces are not available here: {r.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


@pytest.fixture(scope="module")
def phases(tiny_dirs):
    why = _why_not()
    if why:
        pytest.skip(why)
    hosts = Hosts()
    try:
        hosts.build()
        hosts.start_ray()
        cfg = {"models": [str(tiny_dirs[a]) for a in ("llama", "qwen2")], "head_ns": hosts.head_ns,
               "worker_ns": hosts.worker_ns, "head_dev": hosts.head_dev, "worker_dev": hosts.worker_dev,
               "worker_ip": hosts.worker_ip, "worker_start": hosts.worker_start(), "rejoin_within": 120}
        env = dict(hosts.env, RAY_ADDRESS=f"{hosts.head_ip}:6379", SPECEM_RAY_THREADS="1",
                   SPECEM_RAY_TIMEOUT=str(CALL_TIMEOUT), SPECEM_RAY_RESTART_WAIT=str(RESTART_WAIT),
                   OMP_NUM_THREADS="1")
        proc = _run("ip", "netns", "exec", hosts.head_ns, sys.executable, str(DRIVER), json.dumps(cfg),
                    check=False, env=env, timeout=420)
        out = {}
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                d = json.loads(line)
                out[d.pop("phase")] = d
        out["_log"] = (proc.stdout[-3000:], proc.stderr[-3000:], proc.returncode)
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("{")))  # shown with -s
        yield out
    finally:
        hosts.cleanup()


def _phase(phases: dict, name: str) -> dict:
    if name not in phases:
        stdout, stderr, rc = phases["_log"]
        pytest.fail(f"the driver did not reach phase {name!r} (exit {rc}):\n{stdout}\n{stderr}")
    return phases[name]


def test_members_on_two_nodes_give_the_in_process_text(phases):
    placed = _phase(phases, "placed")
    assert len(set(placed["nodes"].values())) == 2, placed["nodes"]  # one member on each node
    assert placed["texts"] == _phase(phases, "local")["texts"]


def test_delay_on_the_link_changes_nothing_but_time(phases):
    d = _phase(phases, "netem")
    if "skipped" in d:
        pytest.skip(f"tc netem is not available: {d['skipped']}")
    assert d["texts"] == _phase(phases, "local")["texts"]


def test_a_lost_node_fails_its_request_then_refuses_then_serves_when_it_rejoins(phases):
    killed = _phase(phases, "killed")
    victim, worker = killed["victim"], _phase(phases, "placed")["nodes"][killed["victim"]]
    err = killed["error"]
    assert err is not None and "RayMemberLost" in err, killed  # the running request failed
    assert victim in err and worker in err, err  # naming the member and its node
    assert killed["seconds"] < CALL_TIMEOUT + 15, killed  # within the call timeout

    down = _phase(phases, "down")
    for i, a in enumerate(down["attempts"]):
        assert a["text"] is None and victim in a["error"] and "is down" in a["error"], a
        assert "\n" not in a["error"]  # one line
        limit = RESTART_WAIT + 10 if i == 0 else 5  # the first waits for a restart, later ones are refused at once
        assert a["seconds"] < limit, down
    assert down["state"] == "down"
    assert down["health"]["code"] == 503 and down["health"]["status"] == "degraded" and down["health"]["down"] == [victim]

    back = _phase(phases, "rejoined")
    assert back["text"] is not None, back
    assert back["texts"] == _phase(phases, "local")["texts"]
    assert back["member"]["node"] == worker and back["member"]["restarts"] >= 1 and back["member"]["state"] == "up"
    assert back["health"]["code"] == 200 and back["health"]["status"] == "ok"
