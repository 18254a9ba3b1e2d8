"""The engine loop: the one owner of every request's life, with continuous batching.

Callers (any thread, or an asyncio loop through :class:`AsyncEnsemble`) submit
prepared requests; one background thread admits waiting requests into free
cache slots between rounds, runs one round at a time over every running
request from every caller, and hands each request its events (a
``RoundRecord`` per accepted segment, then the ``GenerationResult``, or an
exception). Requests join and leave between rounds; a request's answer does
not depend on what else runs, so batching never changes an answer.

Single-model requests (the baseline) are requests of the same loop: each round
also feeds every one of them one token.

Only this loop takes and gives back cache slots: a request's slot comes back
when it finishes, is cancelled, or when anything in its life raises, before its
last event is sent.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from specem_fast.rounds.single import Baseline, SingleRequest
from specem_fast.config import GenerationSettings
from specem_fast.errors import QueueFullError, RequestCancelled, SpecEMError
from specem_fast.rounds.profiles import Profile
from specem_fast.results import GenerationResult, RoundRecord
from specem_fast.rounds.executor import Request, RoundExecutor
from specem_fast.rounds.weights import WeightBook

if TYPE_CHECKING:  # the engine only takes and gives back slots; it never touches a tensor
    from specem_fast.model.kv_cache import KVCacheManager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """What to run: an ensemble request, or one member alone (``single`` names it)."""

    prompt: str
    ids: dict[str, list[int]]  # the prompt in each member's tokens
    settings: GenerationSettings
    single: str | None = None
    ignore_eos: bool = False
    t0: float = 0.0  # a single-model call's start (its timings count from there)
    profile: Profile | None = None  # whose weights an ensemble request starts from and feeds


@dataclass(eq=False)
class Handle:
    """One submitted request: its id and where its events go."""

    id: int
    job: Job
    sink: Callable[[object], None]
    done: threading.Event = field(default_factory=threading.Event)
    slot: int | None = None
    req: Request | SingleRequest | None = None

    @property
    def settings(self) -> GenerationSettings:
        return self.job.settings

    def send(self, ev: object) -> None:
        """Hand one event to the caller; a failing sink (a closed event loop) must not end the engine loop."""
        try:
            self.sink(ev)
        except Exception:  # noqa: BLE001
            log.exception("the event sink of request %d failed; its events are dropped", self.id)

    def finish(self, ev: object) -> None:
        """The last event (result or exception); after the slot went back."""
        try:
            self.send(ev)
        finally:
            self.done.set()


def _queue_full(n: int) -> QueueFullError:
    return QueueFullError(f"the engine's waiting queue is full ({n} requests wait for a slot); "
                          "retry later, or raise max_waiting / max_batch")


class EngineCore:
    """Waiting queue, admission, rounds over all running requests, release.

    ``max_waiting`` bounds the requests waiting for a slot; a submission beyond
    it raises :class:`QueueFullError` at once. The loop thread starts with the
    first submission and stops at :meth:`close`. ``metadata()`` is attached to
    every ensemble result.
    """

    def __init__(self, executor: RoundExecutor, baseline: Baseline, cache: "KVCacheManager", weights: WeightBook, *,
                 max_waiting: int = 256, metadata: Callable[[], dict] = dict):
        if not isinstance(max_waiting, int) or isinstance(max_waiting, bool) or max_waiting < 0:
            raise SpecEMError(f"max_waiting must be a whole number >= 0 (got {max_waiting!r})")
        self.executor, self.baseline, self.cache, self.weights = executor, baseline, cache, weights
        self.max_waiting = max_waiting
        self.metadata = metadata
        self._mu = threading.Condition()  # guards the queues below; never held during a round
        self._waiting: deque[Handle] = deque()
        self._running: dict[int, Handle] = {}
        self._cancel: set[int] = set()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False
        # rounds run, rounds that served more than one request, most requests in one round
        self.stats = {"rounds": 0, "batched_rounds": 0, "max_running": 0}
        # called on the engine thread after every round with (requests in it, seconds); for metrics
        self.round_listeners: list[Callable[[int, float], None]] = []

    # -- callers ---------------------------------------------------------------
    def submit(self, job: Job, sink: Callable[[object], None] | None = None) -> tuple[Handle, "queue.Queue | None"]:
        """Queue a prepared request; returns its handle and, without a sink, a queue of its events."""
        q = None
        if sink is None:
            q = queue.Queue()
            sink = q.put
        return self.submit_many([(job, sink)], all_or_none=True)[0], q

    def submit_many(self, items: list[tuple[Job, Callable[[object], None]]], all_or_none: bool = False
                    ) -> list[Handle]:
        """Queue several prepared requests at once, so that free slots admit them
        together (one prefill forward for single-model requests). Queues as many as
        ``max_waiting`` allows and returns their handles; none fitting raises
        :class:`QueueFullError`."""
        out = []
        with self._mu:
            if self._stop:
                raise SpecEMError("the engine is closed; build a new Ensemble")
            room = self.max_waiting - len(self._waiting)
            if room < (len(items) if all_or_none else 1):
                raise _queue_full(self.max_waiting)
            for job, sink in items[:room]:
                h = Handle(next(self._ids), job, sink)
                self._waiting.append(h)
                out.append(h)
            self._start()
            self._mu.notify_all()
        return out

    def run(self, jobs: list[Job]) -> Iterator[tuple[int, RoundRecord | GenerationResult | object]]:
        """Submit ``jobs`` (as many at once as the waiting queue takes, the rest as the
        first finish) and yield ``(job index, event)``; the last event of a job is its
        result. Stopping early or an error cancels the unfinished ones, and returns only
        when their slots are back."""
        events: queue.Queue = queue.Queue()
        pending = deque(enumerate(jobs))
        live: dict[int, Handle] = {}
        try:
            while pending or live:
                if pending:
                    try:  # one call's prompts go in together, so free slots take them into one prefill
                        handles = self.submit_many(
                            [(job, (lambda i: lambda ev: events.put((i, ev)))(i)) for i, job in pending])
                    except QueueFullError:
                        if not live:
                            raise
                        handles = []  # a long list: the rest goes in as its first requests finish
                    for h in handles:
                        live[pending.popleft()[0]] = h
                i, ev = events.get()
                if isinstance(ev, BaseException):
                    raise ev
                if not isinstance(ev, RoundRecord):  # the request's last event
                    del live[i]
                yield i, ev
        finally:
            for h in live.values():
                self.cancel(h.id)
            for h in live.values():
                self.wait(h)

    def cancel(self, request_id: int, wait: bool = False) -> None:
        """Stop a request: a waiting one leaves the queue, a running one gives its slot
        back before the next round. ``wait``: block until that is done."""
        with self._mu:
            h = next((x for x in self._waiting if x.id == request_id), None)
            if h is not None:
                self._waiting.remove(h)
            else:
                running = self._running.get(request_id)
                if running is None:
                    return
                self._cancel.add(request_id)
                self._mu.notify_all()
        if h is not None:
            h.finish(RequestCancelled(f"request {request_id} was cancelled"))
        elif wait:
            self.wait(running)

    def wait(self, h: Handle) -> None:
        """Block until ``h`` sent its last event (at once on the engine thread, which would deadlock)."""
        if threading.current_thread() is not self._thread:
            h.done.wait()

    def events(self, h: Handle, q: "queue.Queue") -> Iterator[RoundRecord | GenerationResult]:
        """A request's events, for a synchronous consumer; stopping early cancels it."""
        try:
            while True:
                ev = q.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if isinstance(ev, GenerationResult):
                    return
        finally:
            if not h.done.is_set():
                self.cancel(h.id, wait=True)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (no new requests are taken)."""
        return self._stop

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        """Whether the loop thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Cancel everything and stop the loop thread."""
        with self._mu:
            self._stop = True
            self._mu.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # -- the loop ----------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="specem-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._mu:
                while not (self._waiting or self._running or self._stop):
                    self._mu.wait()
                if self._stop:
                    stopping = list(self._waiting) + list(self._running.values())
                    self._waiting.clear()
                    break
            self._step()
        for h in stopping:
            self._end(h, RequestCancelled("the engine was closed"))

    def _end(self, h: Handle, ev: object) -> None:
        """Forget the request in the members, give its slot back, then send its last event."""
        try:
            if h.req is not None:
                self.executor.discard([h.id])  # idempotent: a finished request is already closed
        except Exception as exc:  # noqa: BLE001 - the request still ends
            ev = ev if isinstance(ev, BaseException) else exc
        try:
            if h.slot is not None:
                self.cache.free(h.slot)
                h.slot = None
        except Exception as exc:  # noqa: BLE001
            ev = ev if isinstance(ev, BaseException) else exc
        finally:
            with self._mu:
                self._running.pop(h.id, None)
                self._cancel.discard(h.id)
            h.finish(ev)

    def _step(self) -> None:
        with self._mu:
            cancelled = [self._running[i] for i in self._cancel if i in self._running]
        for h in cancelled:
            self._end(h, RequestCancelled(f"request {h.id} was cancelled"))
        self._admit()
        with self._mu:
            running = list(self._running.values())
        rounds = [h for h in running if h.job.single is None]
        singles = [h for h in running if h.job.single is not None]
        if rounds:
            self._round(rounds)
        if singles:
            self._decode(singles)

    def _admit(self) -> None:
        while self.cache.free_slots:
            with self._mu:
                if not self._waiting or self._stop:
                    return
                h = self._waiting.popleft()
                self._running[h.id] = h
            try:
                h.slot = self.cache.allocate()
                job, st = h.job, h.job.settings
                if job.single is not None:
                    req = SingleRequest(h.id, job.single, job.prompt, st, job.ignore_eos, job.t0)
                    self.baseline.open(req, job.ids[job.single], h.slot)
                else:
                    req = self.executor.open(h.id, job.prompt, st, job.ids, self._book(h).initial(st.init_weights),
                                              h.slot)
                h.req = req
            except Exception as exc:  # noqa: BLE001 - this request ends, the others run
                self._end(h, exc)

    def _round(self, running: list[Handle]) -> None:
        """One ensemble round over every running ensemble request."""
        by_id = {h.id: h for h in running}
        t0 = time.perf_counter()
        try:
            events = list(self.executor.round([h.req for h in running]))
        except Exception as exc:  # noqa: BLE001 - the round's state is unknown: every request in it ends
            for h in running:
                self._end(h, exc)
            return
        self.stats["rounds"] += 1
        self.stats["batched_rounds"] += len(running) > 1
        self.stats["max_running"] = max(self.stats["max_running"], len(running))
        seconds = time.perf_counter() - t0
        for listener in self.round_listeners:
            try:
                listener(len(running), seconds)
            except Exception:  # noqa: BLE001 - a metrics hook must not stop the engine
                log.exception("a round listener failed")
        for req, rec in events:
            by_id[req.id].send(rec)
        for h in running:
            if h.req.stop_reason:
                self._end(h, self._result(h))

    def _result(self, h: Handle) -> GenerationResult | Exception:
        try:
            res = self.executor.close(h.req)
            res.metadata = self.metadata()
            if h.job.profile is not None:
                res.metadata.update(h.job.profile.describe())
            st = h.settings
            if st.init_weights == "learned" and st.hedge_lr is not None and any(rd.verified for rd in h.req.rounds):
                self._book(h).observe(h.req.weights)
            return res
        except Exception as exc:  # noqa: BLE001
            return exc

    def _book(self, h: Handle) -> WeightBook:
        return h.job.profile.book if h.job.profile is not None else self.weights

    def _decode(self, singles: list[Handle]) -> None:
        """One token for every running single-model request: one step per member, so a
        failure ends only that member's requests."""
        groups: dict[str, list[Handle]] = {}
        for h in singles:
            groups.setdefault(h.job.single, []).append(h)
        for group in groups.values():
            try:
                self.baseline.step([h.req for h in group])
            except Exception as exc:  # noqa: BLE001 - the group's state is unknown: its requests end
                for h in group:
                    self._end(h, exc)
                continue
            for h in group:
                if h.req.stop_reason:
                    try:
                        res = self.baseline.close(h.req)
                    except Exception as exc:  # noqa: BLE001
                        res = exc
                    self._end(h, res)
