"""asyncio front over the engine loop, for embedding in other serving stacks.

The engine thread runs every forward pass; events come back to the event loop
through ``loop.call_soon_threadsafe`` into an ``asyncio.Queue``, so awaiting a
generation never blocks the loop. Cancelling the awaiting task (a client that
disconnects) cancels the request: its slot is free within one round.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from specem_fast.api.ensemble import Ensemble
from specem_fast.api.streaming import Releaser, Segment
from specem_fast.results import GenerationResult, RoundRecord


class AsyncRequest:
    """One submitted request, seen from an event loop: iterate :meth:`events` or
    :meth:`stream_with_result`; leaving either early (or :meth:`cancel`) cancels it."""

    def __init__(self, ensemble: Ensemble, handle, q: asyncio.Queue):
        self.ensemble = ensemble
        self.handle = handle
        self.id = handle.id
        self._q = q
        self.finished = False

    async def events(self) -> AsyncIterator[RoundRecord | GenerationResult]:
        """A RoundRecord per accepted segment, then the GenerationResult (an error event is raised)."""
        try:
            while not self.finished:
                ev = await self._q.get()
                if isinstance(ev, BaseException):
                    self.finished = True
                    raise ev
                if isinstance(ev, GenerationResult):
                    self.finished = True
                yield ev
        finally:
            self.cancel()

    async def stream_with_result(self) -> AsyncIterator[Segment | GenerationResult]:
        """The answer's text as rounds accept it (see :meth:`Ensemble.stream`), then the GenerationResult."""
        rel = Releaser(self.handle.settings.stop)
        events = self.events()
        try:
            async for ev in events:
                for out in rel.feed(ev):
                    yield out
        finally:
            await events.aclose()

    def cancel(self) -> None:
        """Cancel the request unless it finished; never blocks (the slot is free before the next round)."""
        if not self.finished:
            self.finished = True
            self.ensemble.cancel(self.id)


class AsyncEnsemble:
    """``await generate(...)`` and ``async for seg in stream(...)`` over an :class:`Ensemble`.

    Takes the same arguments as :meth:`Ensemble.generate` for one prompt or one
    conversation (``messages=``); requests from every task and thread share the
    engine's batch.
    """

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble

    async def submit(self, prompt: str | None = None, *, messages=None, settings=None, **overrides) -> AsyncRequest:
        """Queue one request now and return it: bad input, a prompt over the cache
        budget and a full queue (:class:`QueueFullError`) raise here, before any
        event (a server answers them with an HTTP status before streaming)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(ev: object) -> None:  # runs on the engine thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(q.put_nowait, ev)

        # checking and tokenizing the prompt stays off the loop too
        fut = loop.run_in_executor(
            None, lambda: self.ensemble.submit(prompt, messages=messages, settings=settings, sink=sink, **overrides))
        try:
            h, _ = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # the submission may still go through on its thread: cancel what it queued
            def undo(f) -> None:
                if not f.cancelled() and f.exception() is None:
                    self.ensemble.cancel(f.result()[0].id)

            fut.add_done_callback(undo)
            raise
        return AsyncRequest(self.ensemble, h, q)

    async def generate(self, prompt: str | None = None, *, messages=None, settings=None, **overrides
                       ) -> GenerationResult:
        """One answer (a :class:`GenerationResult`)."""
        req = await self.submit(prompt, messages=messages, settings=settings, **overrides)
        events = req.events()
        try:
            async for ev in events:
                if isinstance(ev, GenerationResult):
                    return ev
        finally:
            await events.aclose()
        raise RuntimeError("the engine ended a request without a result")  # pragma: no cover

    async def stream_with_result(self, prompt: str | None = None, *, messages=None, settings=None, **overrides
                                 ) -> AsyncIterator[Segment | GenerationResult]:
        """The answer's segments as rounds accept them, then the GenerationResult."""
        req = await self.submit(prompt, messages=messages, settings=settings, **overrides)
        inner = req.stream_with_result()
        try:
            async for ev in inner:
                yield ev
        finally:
            await inner.aclose()

    async def stream(self, prompt: str | None = None, *, messages=None, settings=None, **overrides
                     ) -> AsyncIterator[Segment]:
        """The answer's text round by round (see :meth:`Ensemble.stream`)."""
        inner = self.stream_with_result(prompt, messages=messages, settings=settings, **overrides)
        try:
            async for ev in inner:
                if isinstance(ev, Segment):
                    yield ev
        finally:
            await inner.aclose()

    def cancel(self, request_id: int) -> None:
        self.ensemble.cancel(request_id)
