"""The engine loop: one owner of every request's life, with continuous batching.

Callers (any thread, or an asyncio loop through :class:`AsyncEnsemble`) submit
requests; one background thread admits waiting requests into free cache slots
between rounds, runs one round at a time over every running request from every
caller, and hands each request its events (a ``RoundRecord`` per accepted
segment, then the ``GenerationResult``, or an exception). Requests join and
leave between rounds; a request's answer does not depend on what else runs
(the rounds keep requests independent), so batching never changes an answer.

Single-model requests (``Ensemble.generate_single``, the baseline) are requests
of the same loop: each round also feeds every one of them one token.

Slots are taken and given back only through ``Ensemble._acquire/_release``
under the ensemble's lock: a request's slot comes back when it finishes, is
cancelled, or when anything in its life raises, before its last event is sent.
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

from .config import GenerationSettings
from .errors import QueueFullError, RequestCancelled, SpecEMError
from .results import GenerationResult, RoundRecord
from .scheduler import Request

if TYPE_CHECKING:
    from .ensemble import Ensemble

log = logging.getLogger(__name__)


@dataclass
class Handle:
    """One submitted request: its id and where its events go."""

    id: int
    prompt: str
    ids: dict[str, list[int]]
    settings: GenerationSettings
    sink: Callable[[object], None]
    done: threading.Event = field(default_factory=threading.Event)
    slot: int | None = None
    req: Request | None = None
    # a single-model request (``Ensemble.generate_single``): its decode state, advanced
    # one token per engine round by ``Ensemble._single_step``; None for ensemble requests
    single: object | None = None

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


class EngineCore:
    """Waiting queue, admission, rounds over all running requests, release.

    ``max_waiting`` bounds the requests waiting for a slot; a submission beyond
    it raises :class:`QueueFullError` at once. The loop thread starts with the
    first submission and stops at :meth:`close`.
    """

    def __init__(self, ens: "Ensemble", max_waiting: int = 256):
        if not isinstance(max_waiting, int) or isinstance(max_waiting, bool) or max_waiting < 0:
            raise SpecEMError(f"max_waiting must be a whole number >= 0 (got {max_waiting!r})")
        self.ens = ens
        self.max_waiting = max_waiting
        self._mu = threading.Condition()  # guards the queues below; never held during a round
        self._waiting: deque[Handle] = deque()
        self._running: dict[int, Handle] = {}
        self._cancel: set[int] = set()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._owner = object()  # the engine's slots, in Ensemble._holders
        # rounds run, rounds that served more than one request, most requests in one round
        self.stats = {"rounds": 0, "batched_rounds": 0, "max_running": 0}
        # called on the engine thread after every round with (requests in it, seconds); for metrics
        self.round_listeners: list[Callable[[int, float], None]] = []

    # -- callers ---------------------------------------------------------------
    def submit(self, prompt: str, ids: dict[str, list[int]], settings: GenerationSettings,
               sink: Callable[[object], None] | None = None) -> tuple[Handle, "queue.Queue | None"]:
        """Queue a prepared request; returns its handle and, without a sink, a queue of its events."""
        q = None
        if sink is None:
            q = queue.Queue()
            sink = q.put
        with self._mu:
            if self._stop:
                raise SpecEMError("the engine is closed; build a new Ensemble")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(
                    f"the engine's waiting queue is full ({self.max_waiting} requests wait for a slot); "
                    "retry later, or raise max_waiting / max_batch"
                )
            h = Handle(next(self._ids), prompt, ids, settings, sink)
            self._waiting.append(h)
            self._start()
            self._mu.notify_all()
        return h, q

    def submit_many(self, items: list[tuple[str, dict, GenerationSettings, Callable[[object], None], object]]
                    ) -> list[Handle]:
        """Queue several prepared requests at once ``(prompt, ids, settings, sink, single)``,
        so that free slots admit them together (one prefill forward for single-model
        requests, as one call's prompts always had). Queues as many as ``max_waiting``
        allows and returns their handles; none fitting raises :class:`QueueFullError`."""
        out = []
        with self._mu:
            if self._stop:
                raise SpecEMError("the engine is closed; build a new Ensemble")
            for prompt, ids, settings, sink, single in items:
                if len(self._waiting) >= self.max_waiting:
                    break
                h = Handle(next(self._ids), prompt, ids, settings, sink, single=single)
                self._waiting.append(h)
                out.append(h)
            if not out:
                raise QueueFullError(
                    f"the engine's waiting queue is full ({self.max_waiting} requests wait for a slot); "
                    "retry later, or raise max_waiting / max_batch"
                )
            self._start()
            self._mu.notify_all()
        return out

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
        elif wait and threading.current_thread() is not self._thread:
            running.done.wait()

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

    def close(self) -> None:
        """Cancel everything and stop the loop thread."""
        with self._mu:
            self._stop = True
            self._mu.notify_all()
        with self.ens._lock:
            self.ens._lock.notify_all()
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
        with self.ens._lock:
            for h in stopping:
                self._end(h, RequestCancelled("the engine was closed"))

    def _end(self, h: Handle, ev: object) -> None:
        """Give the request's slot back (lock held), then send its last event."""
        try:
            if h.slot is not None:
                self.ens._release(h.slot, self._owner)
        except Exception as exc:  # noqa: BLE001 - the request still ends
            ev = ev if isinstance(ev, BaseException) else exc
        finally:
            with self._mu:
                self._running.pop(h.id, None)
                self._cancel.discard(h.id)
            h.finish(ev)

    def _step(self) -> None:
        ens = self.ens
        with ens._lock:
            with self._mu:
                cancelled = [self._running[i] for i in self._cancel if i in self._running]
            for h in cancelled:
                self._end(h, RequestCancelled(f"request {h.id} was cancelled"))
            self._admit()
            with self._mu:
                running = list(self._running.values())
                starved = not running and bool(self._waiting) and not self._stop
            if starved:
                ens._lock.wait(0.05)  # every slot is held outside the engine: wait for one
            if not running:
                return
            rounds = [h for h in running if h.single is None]
            singles = [h for h in running if h.single is not None]
            if rounds:
                self._round(rounds)
            if singles:
                self._decode(singles)

    def _round(self, running: list[Handle]) -> None:
        """One ensemble round over every running ensemble request (lock held)."""
        ens = self.ens
        by_slot = {h.slot: h for h in running}
        t0 = time.perf_counter()
        try:
            events = list(ens.scheduler.round([h.req for h in running]))
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
            by_slot[req.slot].send(rec)
        for h in running:
            if h.req.stop_reason:
                self._finish(h)

    def _decode(self, singles: list[Handle]) -> None:
        """One token for every running single-model request (lock held): one step per
        member and sampling setting, so a failure ends only that group's requests."""
        groups: dict[tuple, list[Handle]] = {}
        for h in singles:
            groups.setdefault(h.single.group, []).append(h)
        for group in groups.values():
            try:
                self.ens._single_step([h.single for h in group])
            except Exception as exc:  # noqa: BLE001 - the group's state is unknown: its requests end
                for h in group:
                    self._end(h, exc)
                continue
            for h in group:
                if h.single.stop_reason:
                    try:
                        res = self.ens._single_result(h.prompt, h.single)
                    except Exception as exc:  # noqa: BLE001
                        res = exc
                    self._end(h, res)

    def _admit(self) -> None:
        ens = self.ens
        while ens.cache.free_slots:
            with self._mu:
                if not self._waiting or self._stop:
                    return
                h = self._waiting.popleft()
                self._running[h.id] = h
            try:
                h.slot = ens._acquire(self._owner)
                st = h.settings
                if h.single is not None:
                    h.single.slot = h.slot  # prefilled at its first decode step
                    continue
                h.req = ens.scheduler.open(h.prompt, st, h.ids, ens.weights.initial(st.init_weights), h.slot)
            except Exception as exc:  # noqa: BLE001 - this request ends, the others run
                self._end(h, exc)

    def _finish(self, h: Handle) -> None:
        ens = self.ens
        try:
            req = h.req
            res = ens.scheduler.close(req)
            res.metadata = ens.metadata
            res.prompt_tokens = {m: s.prompt_len for m, s in req.seqs.items()}
            st = req.settings
            if st.init_weights == "learned" and st.hedge_lr is not None and any(rd.verified for rd in req.rounds):
                ens.weights.observe(req.weights)
        except Exception as exc:  # noqa: BLE001
            res = exc
        self._end(h, res)
