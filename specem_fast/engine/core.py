"""The engine loop: the one owner of every request's life, with continuous batching.

Callers (any thread, or an asyncio loop through :class:`AsyncEnsemble`) submit
prepared requests (:class:`Job`); one background thread repeats, as vLLM's
``EngineCore`` does, **schedule -> execute -> update**:

- *schedule*: the :class:`Scheduler` ends the hold of cancelled requests on their
  slots, admits queued requests into free slots and says which requests run;
- *execute*: cancelled requests are forgotten by the members, admitted ones are
  opened in them, then one round (:class:`RoundExecutor`) runs over every running
  ensemble request and one token (:class:`Baseline`) over every single-model one;
- *update*: each request gets its events (a ``RoundRecord`` per accepted segment,
  then the ``GenerationResult``, or an exception), and the finished ones give their
  slot back before their last event is sent.

Requests join and leave between rounds; a request's answer does not depend on
what else runs, so batching never changes an answer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Callable, Iterator

from specem_fast.engine.scheduler import Handle, Job, Scheduler, SlotPool
from specem_fast.errors import QueueFullError, RequestCancelled
from specem_fast.results import GenerationResult, RoundRecord
from specem_fast.rounds.executor import RoundExecutor
from specem_fast.rounds.single import Baseline, SingleRequest

__all__ = ["EngineCore", "Handle", "Job"]

log = logging.getLogger(__name__)


class EngineCore:
    """The loop thread and the calls into it: submit, run, cancel, close.

    ``slots``: the request slots (the KV cache manager). ``max_waiting`` bounds the
    requests that have no slot to go to (see :mod:`.scheduler`); a submission beyond
    it raises :class:`QueueFullError` at once. The loop thread starts with the first
    submission and stops at :meth:`close`.
    """

    def __init__(self, executor: RoundExecutor, baseline: Baseline, slots: SlotPool, *, max_waiting: int = 256):
        self.executor, self.baseline = executor, baseline
        self.scheduler = Scheduler(slots, max_waiting)
        self._thread: threading.Thread | None = None
        self._start_mu = threading.Lock()
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
        the free slots plus ``max_waiting`` take and returns their handles; none
        fitting raises :class:`QueueFullError`."""
        out = self.scheduler.add(items, all_or_none)
        with self._start_mu:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="specem-engine", daemon=True)
                self._thread.start()
        return out

    def run(self, jobs: list[Job]) -> Iterator[tuple[int, RoundRecord | GenerationResult | object]]:
        """Submit ``jobs`` (as many at once as the engine takes, the rest as the first
        finish) and yield ``(job index, event)``; the last event of a job is its
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
        h, queued = self.scheduler.cancel(request_id)
        if h is None:
            return
        if queued:
            h.finish(RequestCancelled(f"request {request_id} was cancelled"))
        elif wait:
            self.wait(h)

    def wait(self, h: Handle) -> None:
        """Block until ``h`` sent its last event (at once on the engine thread, which would deadlock)."""
        if threading.current_thread() is not self._thread:
            h.done.wait()

    @property
    def max_waiting(self) -> int:
        return self.scheduler.max_waiting

    @max_waiting.setter
    def max_waiting(self, n: int) -> None:
        self.scheduler.max_waiting = n

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (no new requests are taken)."""
        return self.scheduler.closed

    @property
    def waiting(self) -> int:
        """Requests with no slot to go to."""
        return self.scheduler.waiting

    @property
    def running(self) -> int:
        """Requests holding a slot (or one free for them at the next round)."""
        return self.scheduler.running

    @property
    def alive(self) -> bool:
        """Whether the loop thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Cancel everything and stop the loop thread."""
        self.scheduler.close()
        with self._start_mu:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        elif thread is None:
            self._cancel_all()

    # -- the loop: schedule -> execute -> update -----------------------------------
    def _loop(self) -> None:
        while (step := self.scheduler.schedule()) is not None:
            for h in step.cancelled:
                self._end(h, RequestCancelled(f"request {h.id} was cancelled"))
            for h in step.admitted:
                self._open(h)
            running = [h for h in step.running if h.slot is not None and h.req is not None]
            ensemble = [h for h in running if h.job.single is None]
            singles = [h for h in running if h.job.single is not None]
            if ensemble:
                self._round(ensemble)
            if singles:
                self._decode(singles)
        self._cancel_all()

    def _cancel_all(self) -> None:
        for h in self.scheduler.drain():
            self._end(h, RequestCancelled("the engine was closed"))

    def _open(self, h: Handle) -> None:
        """Open an admitted request in the members (its round state goes to ``h.req``)."""
        job, st = h.job, h.job.settings
        try:
            if job.single is not None:
                req = SingleRequest(h.id, job.single, job.prompt, st, job.ignore_eos, job.t0)
                self.baseline.open(req, job.ids[job.single], h.slot)
            else:
                req = self.executor.open(h.id, job.prompt, settings=st, prompt_ids=job.ids, slot=h.slot,
                                         book=job.book, metadata=job.metadata)
            h.req = req
        except Exception as exc:  # noqa: BLE001 - this request ends, the others run
            self._end(h, exc)

    def _end(self, h: Handle, ev: object) -> None:
        """Forget the request in the members, give its slot back, then send its last event."""
        try:
            if h.req is not None:
                self.executor.discard([h.id])  # idempotent: a finished request is already closed
        except Exception as exc:  # noqa: BLE001 - the request still ends
            ev = ev if isinstance(ev, BaseException) else exc
        try:
            self.scheduler.finish(h)
        except Exception as exc:  # noqa: BLE001
            ev = ev if isinstance(ev, BaseException) else exc
        finally:
            h.finish(ev)

    def _round(self, running: list[Handle]) -> None:
        """One ensemble round over every running ensemble request, then its events."""
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
                try:
                    res = self.executor.close(h.req)
                except Exception as exc:  # noqa: BLE001
                    res = exc
                self._end(h, res)

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
