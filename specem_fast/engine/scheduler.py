"""The scheduler: which requests hold a slot and run in the next round.

As in vLLM, the scheduler decides and the engine loop acts on its decision: it
owns the queue of submitted requests, the request slots (the cache's: one per
running request), admission, cancellation marks and the list of requests that
join the next round. It runs no model and touches no tensor; the members' work
(opening a request, a round, forgetting it) is the engine's (:mod:`.core`).

Admission: a request submitted while a slot is free gets that slot at the next
round boundary and is never counted as waiting. ``max_waiting`` bounds only the
requests that have no slot to go to; with ``max_waiting=0`` there is no queue, and
a request is refused (:class:`QueueFullError`) exactly when every slot is taken or
promised.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from specem_fast.config import GenerationSettings
from specem_fast.errors import QueueFullError, SpecEMError
from specem_fast.rounds.executor import Request
from specem_fast.rounds.single import SingleRequest
from specem_fast.rounds.weights import WeightBook

log = logging.getLogger(__name__)


class SlotPool(Protocol):
    """Request slots (the KV cache manager's; a test's plain counter)."""

    num_slots: int

    @property
    def free_slots(self) -> int: ...
    def allocate(self) -> int: ...
    def free(self, slot: int) -> None: ...


@dataclass(frozen=True)
class Job:
    """A prepared request, as a front hands it to the engine: what to run, checked
    and tokenized (vLLM's ``EngineCoreRequest``).

    ``single`` names a member that runs alone (the baseline); otherwise the
    ensemble runs it, starting from the weights ``book`` gives when it is admitted
    (the rounds own that, and what the book learns from it at the end).
    ``metadata`` is attached to its result as it is.
    """

    prompt: str
    ids: dict[str, list[int]]  # the prompt in each member's tokens
    settings: GenerationSettings
    single: str | None = None
    ignore_eos: bool = False
    t0: float = 0.0  # a single-model call's start (its timings count from there)
    book: WeightBook | None = None  # the profile's: where the request starts from and what it teaches
    metadata: dict = field(default_factory=dict)


@dataclass(eq=False)
class Handle:
    """One submitted request in the engine: its id, where its events go, its slot
    and, once opened in the members, its round state ``req`` (vLLM's ``Request``)."""

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


@dataclass
class SchedulerOutput:
    """One step's decision: requests to end as cancelled (their slots already back),
    requests admitted into a slot (to open in the members), and every request that
    holds a slot (the admitted ones included): what the next round runs."""

    cancelled: list[Handle]
    admitted: list[Handle]
    running: list[Handle]


class Scheduler:
    """Queue, slots, admission and cancellation; safe to call from any thread."""

    def __init__(self, slots: SlotPool, max_waiting: int = 256):
        if not isinstance(max_waiting, int) or isinstance(max_waiting, bool) or max_waiting < 0:
            raise SpecEMError(f"max_waiting must be a whole number >= 0 (got {max_waiting!r})")
        self.slots = slots
        self.max_waiting = max_waiting
        # guards everything below, and every allocate/free of a slot; never held during a round
        self._mu = threading.Condition()
        self._queue: deque[Handle] = deque()  # submitted, no slot yet (admitted at the next step)
        self._running: dict[int, Handle] = {}  # holding a slot
        self._cancel: set[int] = set()
        self._ids = itertools.count(1)
        self.closed = False

    # -- callers -------------------------------------------------------------------
    def add(self, items: list[tuple[Job, Callable[[object], None]]], all_or_none: bool = False) -> list[Handle]:
        """Queue requests: as many as the free slots plus ``max_waiting`` take (all of
        them or none with ``all_or_none``); none fitting raises :class:`QueueFullError`."""
        with self._mu:
            if self.closed:
                raise SpecEMError("the engine is closed; build a new Ensemble")
            # slots not promised to a queued request, plus what may wait without one
            room = self.slots.free_slots - len(self._queue) + self.max_waiting
            if room < (len(items) if all_or_none else 1):
                raise QueueFullError(
                    f"the engine's waiting queue is full ({self._waiting()} requests wait for a slot, "
                    f"max_waiting={self.max_waiting}, and all {self.slots.num_slots} slots are busy); "
                    "retry later, or raise max_waiting / max_batch")
            out = [Handle(next(self._ids), job, sink) for job, sink in items[:room]]
            self._queue.extend(out)
            self._mu.notify_all()
        return out

    def cancel(self, request_id: int) -> tuple[Handle | None, bool]:
        """Take a queued request out of the queue (returns it and True: the caller ends
        it), or mark a running one to end at the next step (returns it and False).
        (None, False) for a request the scheduler does not hold."""
        with self._mu:
            h = next((x for x in self._queue if x.id == request_id), None)
            if h is not None:
                self._queue.remove(h)
                return h, True
            h = self._running.get(request_id)
            if h is not None:
                self._cancel.add(request_id)
                self._mu.notify_all()
            return h, False

    def close(self) -> None:
        """No new requests; :meth:`schedule` returns None from now on."""
        with self._mu:
            self.closed = True
            self._mu.notify_all()

    def _waiting(self) -> int:
        return max(0, len(self._queue) - self.slots.free_slots)

    @property
    def waiting(self) -> int:
        """Requests with no slot to go to (those a free slot takes at the next step are running)."""
        with self._mu:
            return self._waiting()

    @property
    def running(self) -> int:
        """Requests holding a slot, or one that is free for them at the next step."""
        with self._mu:
            return len(self._running) + min(len(self._queue), self.slots.free_slots)

    # -- the engine loop -------------------------------------------------------------
    def schedule(self) -> SchedulerOutput | None:
        """Block until there is work; then end the cancelled requests' hold on their
        slots, give free slots to queued requests in order, and say what runs. None
        once closed."""
        with self._mu:
            while not (self._queue or self._running or self.closed):
                self._mu.wait()
            if self.closed:
                return None
            cancelled = [self._running[i] for i in sorted(self._cancel) if i in self._running]
            for h in cancelled:
                self._release(h)
            admitted = []
            while self._queue and self.slots.free_slots:
                h = self._queue.popleft()
                h.slot = self.slots.allocate()
                self._running[h.id] = h
                admitted.append(h)
            return SchedulerOutput(cancelled, admitted, list(self._running.values()))

    def finish(self, h: Handle) -> None:
        """``h`` ends: its slot goes back (idempotent)."""
        with self._mu:
            self._release(h)

    def _release(self, h: Handle) -> None:
        self._running.pop(h.id, None)
        self._cancel.discard(h.id)
        if h.slot is not None:
            slot, h.slot = h.slot, None
            self.slots.free(slot)

    def drain(self) -> list[Handle]:
        """Every queued and running request, taken out (the engine ends them at close)."""
        with self._mu:
            out = list(self._queue) + list(self._running.values())
            self._queue.clear()
            for h in out:
                self._release(h)
            return out
