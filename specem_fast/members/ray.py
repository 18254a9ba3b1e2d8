"""A member in a Ray actor of its own: its model, its KV cache and its requests live there.

:meth:`RayMember.start` places one actor per member on a Ray cluster (a running
one at ``ray_address`` or ``RAY_ADDRESS``, else a local one it starts), with its
resources: one GPU where the member's device is CUDA (Ray picks which), CPU
threads on a CPU (set explicitly: Ray sets ``OMP_NUM_THREADS=1`` in an actor it
gives no CPUs). The actor holds a :class:`~specem_fast.model.runner.ModelRunner`, a
KV cache of its own with the engine's slots, and a
:class:`~specem_fast.members.local.member.LocalMember` it hands every call to, so a
member computes the same in an actor as in the caller's process. Only the
member interface's plain data (ids, texts, scores) cross the boundary; the
tokenizer calls (``prompt_ids``, ``encode``, ``decode``) run in the caller's
process on the same tokenizer files, saving round trips.

The proxy, :class:`RayMember`, is the member the engine sees. Every call is a
``ray.get`` with a timeout (``SPECEM_RAY_TIMEOUT``, default 600 s), so nothing
waits forever:

- an actor that goes down during a call (killed, crashed, its node lost) fails
  that call with :class:`RayMemberLost` naming the member, and the engine ends
  the requests of that round; Ray restarts the actor (up to
  ``SPECEM_RAY_MAX_RESTARTS`` times, default 4) and the next call waits for it
  (``SPECEM_RAY_RESTART_WAIT`` seconds, default 120; errors name the member and
  its node);
- a member that has not come back within that wait (its node is gone and no
  other node has its resources free) is *down*: the call fails saying so, and
  every later call is refused at once in one line (after a one-second check)
  until Ray has restarted the actor, e.g. on the node when it rejoins, and the
  member serves again;
- an actor that does not answer within the timeout fails the call the same way
  and is restarted, so later calls do not queue behind it;
- an actor whose restarts are used up is dead: every call says so at once
  (build a new Ensemble);
- a request the actor no longer holds although the engine still runs it (the
  actor restarted between two of its calls) is re-opened from what the proxy
  kept (the prompt ids and every id committed since) and the call is retried
  once. Greedy requests go on exactly as before (the restarted actor
  re-processes the whole sequence in its next forward); a sampled request's
  sampler starts again from its seed at that point, so its text differs from an
  uninterrupted run (it is still a valid sample);
- ``close`` never raises: a dead or restarting actor holds nothing of the
  requests, and a slot the engine hands to a new request is emptied in the
  actor whatever it held.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from specem_fast.config import EngineConfig
from specem_fast.errors import SpecEMError
from specem_fast.model.kv_cache import KVCacheManager
from specem_fast.members.local.member import LocalMember
from specem_fast.members.interface import CommitCall, DraftCall, DraftOut, MemberStateError, OpenCall, VerifyCall, VerifyOut
from specem_fast.model.runner import ModelRunner, available_memory, memory_needs
from specem_fast.model.text import TextCodec

log = logging.getLogger(__name__)

# Defaults of the settings read from the environment (seconds, counts).
CALL_TIMEOUT_S = 600.0  # SPECEM_RAY_TIMEOUT: one call (a draft, a verify pass) of one member
START_TIMEOUT_S = 1800.0  # SPECEM_RAY_START_TIMEOUT: placing an actor and loading its model
RESTART_WAIT_S = 120.0  # SPECEM_RAY_RESTART_WAIT: a call's wait for an actor that went down to be back
DOWN_PROBE_S = 1.0  # a member that is down: each call checks this long whether it is back
CLOSE_TIMEOUT_S = 10.0  # forgetting requests: never raises, so it need not wait long
MAX_RESTARTS = 4  # SPECEM_RAY_MAX_RESTARTS: how often Ray restarts a member's actor
PROBE_TIMEOUT_S = 5.0  # reaching the cluster's address before ray.init (which retries for minutes)

INSTALL_HINT = "pip install 'specem-fast[ray]'"


class RayMemberError(SpecEMError):
    """A member in a Ray actor failed, did not answer in time, or could not be placed."""


class RayMemberLost(RayMemberError):
    """The member's actor went down during a call, or is dead."""


def _ray():
    try:
        import ray
    except ImportError:
        raise SpecEMError(f"placement='ray' (or a ray:NAME member) needs Ray, which is not installed: "
                          f"{INSTALL_HINT}, or use placement='local'") from None
    return ray


def _env_number(name: str, default: float, kind=float, least: float = 0) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < least:
        raise SpecEMError(f"{name} must be a number >= {least} (got {raw!r})")
    return value


# -- the cluster ------------------------------------------------------------------

def _host_port(address: str) -> tuple[str, int]:
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, "10001" if address.startswith("ray://") else "6379"
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise SpecEMError(f"the Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379, or ray://HOST:10001 "
                          "for Ray Client)") from None


def connect(address: str | None = None) -> str:
    """Connect this process to the Ray cluster at ``address`` (or ``RAY_ADDRESS``); with
    neither, to a cluster started on this machine by ``ray start``, else a new local one.
    Returns where it is connected. A process already connected keeps its connection
    (an explicit address must then be that cluster's)."""
    ray = _ray()
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None
    concrete = address is not None and address not in ("auto", "local")
    if concrete:
        host, port = _host_port(address)
        try:  # ray.init retries an unreachable address for minutes: fail fast instead
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as exc:
            raise SpecEMError(
                f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start its head node with "
                "`ray start --head --port=6379` and give that node's HOST:PORT (--ray-address / ray_address= / "
                "RAY_ADDRESS), or leave the address out to start a local cluster") from None
    if ray.is_initialized():
        where = ray.get_runtime_context().gcs_address
        if concrete and not address.startswith("ray://") and not _same_address(address, where):
            raise SpecEMError(f"this process is already connected to the Ray cluster at {where}, not {address}; "
                              "use that cluster, or call ray.shutdown() first")
        return where
    try:
        if address is None:
            # an existing cluster on this machine (`ray start --head`), else a new local one
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except Exception as exc:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, ValueError ...
        raise SpecEMError(f"cannot connect to the Ray cluster at {address or 'a new local cluster'}: "
                          f"{type(exc).__name__}: {exc}") from None
    return ray.get_runtime_context().gcs_address


def _same_address(a: str, b: str) -> bool:
    try:
        (ha, pa), (hb, pb) = _host_port(a), _host_port(b)
        return pa == pb and socket.gethostbyname(ha) == socket.gethostbyname(hb)
    except (OSError, SpecEMError):
        return a == b


def _resources(ray, name: str, device: torch.device, members: int) -> tuple[int, float, int]:
    """(torch threads, CPUs to reserve, GPUs) for one member's actor, checked against the cluster."""
    gpus = 1 if device.type == "cuda" else 0
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n.get("Resources", {}).get("CPU", 0.0) for n in nodes), default=0.0)
    if "SPECEM_RAY_THREADS" in os.environ:
        threads = int(_env_number("SPECEM_RAY_THREADS", 1, int, 1))
        cpus: float = threads
    elif gpus:
        threads, cpus = 1, 1  # the host side of a GPU member: one thread feeds it
    else:  # the node's cores shared among the CPU members
        share = node_cpus / max(1, members)
        threads = max(1, int(share))
        cpus = threads if share >= 1 else max(0.01, math.floor(share * 100) / 100)
    free = ray.available_resources()
    if free.get("CPU", 0.0) + 1e-9 < cpus or free.get("GPU", 0.0) + 1e-9 < gpus:
        raise RayMemberError(
            f"the Ray cluster has {free.get('CPU', 0.0):g} free CPUs and {free.get('GPU', 0.0):g} free GPUs; "
            f"member {name} needs {cpus:g} CPUs" + (f" and {gpus} GPU" if gpus else "") +
            "; add nodes (`ray start --address HEAD:6379` on each), use fewer members, or set SPECEM_RAY_THREADS")
    return threads, cpus, gpus


# -- the actor --------------------------------------------------------------------

class MemberActor:
    """One member inside its Ray actor (``ray.remote`` is applied at start, so this module
    imports without Ray). A failure while loading is kept and raised by every call, so
    the caller gets the model's own message instead of a dead actor."""

    def __init__(self, name: str, folder: str, device: str, dtype: str | None, config: EngineConfig, threads: int,
                 backend: str = "native"):
        self.token = uuid.uuid4().hex[:12]  # this incarnation: a restarted actor has another
        self.error: BaseException | None = None
        self.slots: dict[int, int] = {}  # request -> slot, as opened
        self.info: dict = {}
        self.busy: dict[str, list] = {}  # per call kind: [calls, seconds computing] (what the boundary adds is the rest)
        try:
            torch.set_num_threads(threads)
            if backend == "transformers":
                self._load_hf(name, Path(folder), device, dtype, config, threads)
            else:
                self._load(name, Path(folder), device, dtype, config, threads)
        except Exception as exc:  # noqa: BLE001 - reported by ready() and every call
            self.error = exc if isinstance(exc, SpecEMError) else \
                RayMemberError(f"member {name} failed to load in its Ray actor: {type(exc).__name__}: {exc}")

    def _load(self, name, folder: Path, device, dtype, config: EngineConfig, threads: int) -> None:
        import ray

        ctx = ray.get_runtime_context()
        node = ray.util.get_node_ip_address()
        if not folder.is_dir():
            raise RayMemberError(f"member {name}: the model folder {folder} is not on Ray node {node}; install "
                                 "specem-fast and the models at the same paths on every node "
                                 "(`specem-fast models fetch` there)")
        if device == "cuda" and not torch.cuda.is_available():
            raise RayMemberError(f"member {name}: Ray node {node} gave its actor no usable GPU "
                                 f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        runner = ModelRunner(name, folder, device, dtype, config.kernels, config.flash_attn, config.compile)
        avail = available_memory(runner.device)
        kv, _ = memory_needs(folder, runner.dtype)
        need = kv * config.cache_tokens * config.max_batch
        if avail is not None and need > avail:
            raise RayMemberError(f"member {name}: cache_tokens={config.cache_tokens} x max_batch={config.max_batch} "
                                 f"needs {need / 2**30:.2f} GiB of KV cache on {runner.device} of Ray node {node}, "
                                 f"{avail / 2**30:.2f} GiB is free; lower --cache-tokens or max_batch")
        self.cache = KVCacheManager([runner.cache_shape], config.max_batch, config.cache_tokens)
        runner.cache = self.cache[name]
        runner.build_compiled_step()  # compile=True: the draft step over this cache
        self.member = LocalMember(runner, config.batch_invariant)
        self.name, self.max_batch = name, config.max_batch
        self.info = {"kind": "ray", "backend": "native", "node": node, "pid": os.getpid(), "actor": ctx.get_actor_id(),
                     "device": str(runner.device), "dtype": str(runner.dtype).replace("torch.", ""),
                     "kernels": runner.kernel_path, "threads": threads, "capacity": self.member.capacity}

    def _load_hf(self, name, folder: Path, device, dtype, config: EngineConfig, threads: int) -> None:
        """The member on the transformers backend: its caches grow per request, no slots to size."""
        import ray

        from specem_fast.members.local.hf_member import HFMember
        from specem_fast.model.hf_runner import HFRunner

        ctx = ray.get_runtime_context()
        node = ray.util.get_node_ip_address()
        if not folder.is_dir():
            raise RayMemberError(f"member {name}: the model folder {folder} is not on Ray node {node}; install "
                                 "specem-fast and the models at the same paths on every node")
        runner = HFRunner(name, folder, device, dtype)
        self.cache = None
        self.member = HFMember(runner, config.cache_tokens, config.batch_invariant)
        self.name, self.max_batch = name, config.max_batch
        self.info = {"kind": "ray", "backend": "transformers", "node": node, "pid": os.getpid(),
                     "actor": ctx.get_actor_id(), "device": str(runner.device),
                     "dtype": str(runner.dtype).replace("torch.", ""), "kernels": runner.kernel_path,
                     "threads": threads, "capacity": self.member.capacity}

    def ready(self) -> dict:
        if self.error is not None:
            raise self.error
        return dict(self.info, token=self.token)

    ping = ready

    def stats(self) -> dict[str, list]:
        """Per call kind: [calls, seconds spent computing them in this actor]."""
        return {k: list(v) for k, v in self.busy.items()}

    def call(self, method: str, calls: list) -> tuple[str, object, str]:
        t0 = time.perf_counter()
        try:
            return self._call(method, calls)
        finally:
            b = self.busy.setdefault(method, [0, 0.0])
            b[0] += 1
            b[1] += time.perf_counter() - t0

    def _call(self, method: str, calls: list) -> tuple[str, object, str]:
        """("ok", answer, incarnation), or ("missing", request ids, incarnation) when a call
        names requests this actor does not hold (it was restarted since they were opened):
        nothing is done then."""
        if self.error is not None:
            raise self.error
        if method == "open":
            self._open(calls)
            return "ok", None, self.token
        if method == "close":
            self._close(calls)
            return "ok", None, self.token
        if method not in ("draft", "verify", "commit"):
            raise RayMemberError(f"member {self.name}: no call {method!r}")
        held = set(self.member.requests)
        missing = sorted({c.request for c in calls} - held)
        if missing:
            return "missing", missing, self.token
        return "ok", getattr(self.member, method)(calls), self.token

    def _reset(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise MemberStateError(f"{self.name}: cache slot {slot} is out of range (max_batch={self.max_batch})")
        if self.cache is None:  # transformers backend: each request's cache goes with it
            return
        mc = self.cache[self.name]
        mc.length[slot] = mc.high[slot] = 0

    def _open(self, calls: list[OpenCall]) -> None:
        for c in calls:
            # the engine hands a slot to one request at a time: whoever held it here is over
            # (its close was lost on the way, e.g. while the caller timed out)
            stale = [r for r, s in self.slots.items() if s == c.slot and r != c.request]
            self._close(stale)
            if c.request not in self.slots:
                self._reset(c.slot)
        try:
            self.member.open(calls)
        finally:
            held = set(self.member.requests)
            self.slots.update({c.request: c.slot for c in calls if c.request in held and c.request not in self.slots})

    def _close(self, requests: Sequence[int]) -> None:
        for r in requests:
            slot = self.slots.pop(r, None)
            if slot is not None:
                self._reset(slot)
        self.member.close(requests)


_ACTOR_CLASS = None


def _actor_class(ray):
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = ray.remote(MemberActor)
    return _ACTOR_CLASS


# -- the proxy --------------------------------------------------------------------

@dataclass
class _Held:
    """What the proxy keeps of one open request, to re-open it on a restarted actor."""

    open: OpenCall
    committed: list[int] = field(default_factory=list)


class RayMember:
    """The member interface over one Ray actor (see the module docstring for failures)."""

    def __init__(self, name: str, folder: Path, actor, info: dict, *, timeout: float = CALL_TIMEOUT_S,
                 start_timeout: float = START_TIMEOUT_S, max_restarts: int = MAX_RESTARTS):
        self.name = name
        self.capacity = int(info["capacity"])
        self.timeout, self.start_timeout, self.max_restarts = timeout, start_timeout, max_restarts
        self._actor = actor
        self._token = info["token"]  # the actor's incarnation: another one after each restart
        self._info = {k: v for k, v in info.items() if k not in ("capacity", "token")}
        self.restarts = 0  # restarts seen
        self._codec = TextCodec(folder)  # the actor's tokenizer files, read here too
        self._held: dict[int, _Held] = {}
        self._down = False  # the actor went down during a call: wait for its restart before the next
        self._dead: str | None = None  # why the actor will not come back
        self._gone: str | None = None  # why it is down (not back within restart_wait): calls refused until it is
        self.restart_wait = _env_number("SPECEM_RAY_RESTART_WAIT", RESTART_WAIT_S, float, 0.1)
        self.reopened = 0  # requests re-opened on a restarted actor
        self.waited: dict[str, list] = {}  # per call kind: [calls, seconds in ray.get] (see boundary())

    @classmethod
    def start(cls, name: str, folder: Path, device: str, dtype: str | None, config: EngineConfig, *,
              ray_address: str | None = None, members: int = 1, backend: str = "native") -> "RayMember":
        """Place the member's actor on the cluster and wait until its model is loaded.

        ``members``: how many Ray members share the cluster (a CPU node's cores are split
        among them unless ``SPECEM_RAY_THREADS`` says how many threads each gets)."""
        ray = _ray()
        timeout = _env_number("SPECEM_RAY_TIMEOUT", CALL_TIMEOUT_S, float, 1)
        start_timeout = _env_number("SPECEM_RAY_START_TIMEOUT", START_TIMEOUT_S, float, 1)
        restarts = int(_env_number("SPECEM_RAY_MAX_RESTARTS", MAX_RESTARTS, int, 0))
        connect(ray_address)
        dev = torch.device(device)
        if dev.type not in ("cpu", "cuda"):
            raise SpecEMError(f"member {name}: a Ray member runs on cpu or cuda (got device {device!r})")
        threads, cpus, gpus = _resources(ray, name, dev, members)
        actor = _actor_class(ray).options(num_cpus=cpus, num_gpus=gpus, max_restarts=restarts, max_task_retries=0,
                                          max_concurrency=1).remote(
            name, str(folder), "cuda" if gpus else "cpu", dtype, config, threads, backend)  # Ray picks the GPU
        try:
            info = ray.get(actor.ready.remote(), timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            _kill(ray, actor)
            raise RayMemberError(
                f"member {name}'s Ray actor did not start within {start_timeout:.0f} s (it asks for {cpus:g} CPUs"
                + (f" and {gpus} GPU" if gpus else "") + ": no node may have them free, or the model loads "
                "slowly; raise SPECEM_RAY_START_TIMEOUT)") from None
        except ray.exceptions.RayTaskError as exc:
            _kill(ray, actor)
            cause = exc.cause
            if isinstance(cause, SpecEMError):
                raise cause from None
            raise RayMemberError(f"member {name} failed to start in its Ray actor: {type(cause).__name__}: "
                                 f"{cause}") from None
        except ray.exceptions.RayError as exc:
            _kill(ray, actor)
            raise RayMemberError(f"member {name}'s Ray actor failed to start: {_first_line(exc)}") from None
        return cls(name, folder, actor, info, timeout=timeout, start_timeout=start_timeout, max_restarts=restarts)

    # -- what the engine reads -------------------------------------------------------
    def describe(self) -> dict:
        state = "dead" if self._dead else "down" if self._gone else "restarting" if self._down else "up"
        return dict(self._info, restarts=self.restarts, reopened=self.reopened, state=state)

    @property
    def where(self) -> str:
        """The member and the Ray node its actor runs (or last ran) on, for messages."""
        return f"member {self.name} (Ray node {self._info.get('node', '?')})"

    @property
    def requests(self) -> list[int]:
        """The requests this member holds for the engine (as the proxy knows them)."""
        return list(self._held)

    def boundary(self) -> dict[str, dict]:
        """Per call kind since start: calls, seconds waited here, seconds the actor computed;
        the difference is what crossing the boundary costs (serialisation, RPC, scheduling).
        The actor's side is read with one more call."""
        ray = _ray()
        busy = self._get(ray, self._actor.stats.remote(), "stats")
        return {k: {"calls": n, "wait_s": w, "compute_s": busy.get(k, [0, 0.0])[1]}
                for k, (n, w) in self.waited.items() if k != "stats"}

    @property
    def actor(self):
        """The Ray actor handle (e.g. for ``ray.kill`` in a test of failures)."""
        return self._actor

    # -- text: the same tokenizer, here --------------------------------------------------
    def prompt_ids(self, prompt, limit: int | None = None) -> list[int]:
        codec = self._codec
        return codec.prompt_ids(prompt, limit) if isinstance(prompt, str) else codec.chat_ids(prompt, limit)

    def encode(self, text: str) -> list[int]:
        return self._codec.encode_segment(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._codec.decode(list(ids))

    # -- requests ------------------------------------------------------------------
    def open(self, calls: Sequence[OpenCall]) -> None:
        calls = list(calls)
        self._call("open", calls)
        for c in calls:
            self._held[c.request] = _Held(c)

    def draft(self, calls: Sequence[DraftCall]) -> list[DraftOut]:
        return self._call("draft", list(calls))

    def verify(self, calls: Sequence[VerifyCall]) -> list[VerifyOut]:
        return self._call("verify", list(calls))

    def commit(self, calls: Sequence[CommitCall]) -> list[tuple[int, ...]]:
        calls = list(calls)
        out = self._call("commit", calls)
        for c, ids in zip(calls, out):
            held = self._held.get(c.request)
            if held is not None:
                held.committed.extend(ids)
        return out

    def close(self, requests: Sequence[int]) -> None:
        """Forget the requests; never raises (see the module docstring)."""
        requests = list(requests)
        for r in requests:
            self._held.pop(r, None)
        if self._dead or self._down or not requests:
            return  # a dead or restarting actor holds nothing of them
        ray = _ray()
        try:
            ray.get(self._actor.call.remote("close", requests), timeout=CLOSE_TIMEOUT_S)
        except ray.exceptions.RayActorError:
            self._down = True
        except Exception as exc:  # noqa: BLE001 - a slow actor drops them when their slots are taken again
            log.warning("member %s: closing requests %s in its Ray actor failed (%s)", self.name, requests,
                        _first_line(exc))

    def shutdown(self) -> None:
        self._held.clear()
        _kill(_ray(), self._actor)
        self._dead = f"member {self.name}'s Ray actor was shut down with its ensemble"

    # -- calls -----------------------------------------------------------------------
    def _call(self, method: str, calls: list):
        ray = _ray()
        self._await_restart(ray)
        status, out, token = self._get(ray, self._actor.call.remote(method, calls), method)
        if token != self._token:  # restarted between two calls, without a call of ours seeing it
            self._restarted(ray)
        if status == "missing":  # the actor restarted since these requests were opened
            self._reopen(ray, out, calls)
            status, out, _ = self._get(ray, self._actor.call.remote(method, calls), method)
            if status == "missing":
                raise RayMemberLost(f"member {self.name}'s Ray actor lost requests {out} again while they were "
                                    "re-opened (it restarted twice in one call)")
        return out

    def _reopen(self, ray, requests: list[int], calls: list) -> None:
        expected = {c.request: c.prefix for c in calls}
        opens = []
        for r in requests:
            held = self._held.get(r)
            if held is None:
                raise MemberStateError(f"{self.name} holds no request {r}; open it first")
            ids = held.open.ids + tuple(held.committed)
            if len(ids) != expected[r]:
                raise MemberStateError(f"{self.name} holds {len(ids)} tokens of request {r}, the call expects "
                                       f"{expected[r]}: member and round executor are out of step")
            opens.append(replace(held.open, ids=ids))
        self._get(ray, self._actor.call.remote("open", opens), "open")
        self.reopened += len(opens)
        log.warning("member %s: its Ray actor restarted; re-opened request(s) %s from their prompt and committed "
                    "ids", self.name, ", ".join(map(str, requests)))

    def _await_restart(self, ray) -> None:
        """After the actor went down, wait until Ray has it back (or says it is dead): up to
        ``restart_wait`` seconds, then the member is down and each call checks only briefly."""
        if self._dead:
            raise RayMemberLost(self._dead)
        if not self._down:
            return
        wait = DOWN_PROBE_S if self._gone else self.restart_wait
        deadline = time.monotonic() + wait
        while True:
            try:
                info = ray.get(self._actor.ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
                break
            except ray.exceptions.ActorDiedError as exc:
                self._dead = (f"{self.where}: its Ray actor is dead and will not be restarted (restarts allowed: "
                              f"{self.max_restarts}; Ray: {_first_line(exc)}); build a new Ensemble")
                raise RayMemberLost(self._dead) from None
            except ray.exceptions.RayActorError:  # still restarting
                if time.monotonic() > deadline:
                    self._not_back(wait)
                time.sleep(0.2)
            except ray.exceptions.GetTimeoutError:
                self._not_back(wait)
            except ray.exceptions.RayTaskError as exc:  # it restarted, and failed to load this time
                cause = exc.cause
                raise cause if isinstance(cause, SpecEMError) else RayMemberError(
                    f"{self.where} failed to load after a restart: {cause}") from None
        self._down = False
        if self._gone:
            log.warning("%s is back after being down (%s)", self.where, self._gone)
            self._gone = None
        if info["token"] != self._token:
            self._new_incarnation(info)

    def _not_back(self, waited: float) -> None:
        if self._gone is None:
            self._gone = (f"{self.where} is down: its Ray actor went away and has not come back within "
                          f"{waited:.0f} s (SPECEM_RAY_RESTART_WAIT); no node with its resources has taken it yet. "
                          "Requests are refused until Ray restarts it (e.g. when its node rejoins the cluster)")
            log.warning("%s", self._gone)
        raise RayMemberLost(self._gone) from None

    def _restarted(self, ray) -> None:
        self._new_incarnation(self._get(ray, self._actor.ping.remote(), "ping"))

    def _new_incarnation(self, info: dict) -> None:
        self._token = info["token"]
        self._info = {k: v for k, v in info.items() if k not in ("capacity", "token")}
        self.restarts += 1

    def _get(self, ray, ref, what: str):
        t0 = time.perf_counter()
        try:
            out = ray.get(ref, timeout=self.timeout)
            w = self.waited.setdefault(what, [0, 0.0])
            w[0] += 1
            w[1] += time.perf_counter() - t0
            return out
        except ray.exceptions.GetTimeoutError:
            self._down = True
            _kill(ray, self._actor, restart=True)  # later calls must not queue behind a call that hangs
            raise RayMemberLost(f"{self.where} did not answer {what} within {self.timeout:.0f} s; "
                                "the requests of this call end and the actor is restarted (SPECEM_RAY_TIMEOUT "
                                "sets the wait)") from None
        except ray.exceptions.RayTaskError as exc:  # the call raised in the actor
            cause = exc.cause
            if isinstance(cause, SpecEMError):  # MemberStateError, CacheFullError...: they name the member
                raise cause from None
            raise RayMemberError(f"{self.where} failed in {what}: {type(cause).__name__}: "
                                 f"{cause}") from None
        except ray.exceptions.RayActorError as exc:  # died, killed, restarting, node lost
            self._down = True
            raise RayMemberLost(f"{self.where}: its Ray actor went down during {what} ({_first_line(exc)}); "
                                "the requests of this call end; Ray restarts the actor and later requests run on "
                                "it") from None
        except ray.exceptions.RayError as exc:
            raise RayMemberError(f"{self.where}: {what} failed: {_first_line(exc)}") from None


def _kill(ray, actor, restart: bool = False) -> None:
    try:
        ray.kill(actor, no_restart=not restart)
    except Exception as exc:  # noqa: BLE001 - already gone
        log.debug("ray.kill: %s", exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]
