"""asyncio front over the engine loop, for embedding in other serving stacks.

The engine thread runs every forward pass; events come back to the event loop
through ``loop.call_soon_threadsafe`` into an ``asyncio.Queue``, so awaiting a
generation never blocks the loop. Cancelling the awaiting task (a client that
disconnects) cancels the request: its slot is free within one round.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from .ensemble import Ensemble, Segment, _Releaser
from .results import GenerationResult


class AsyncEnsemble:
    """``await generate(...)`` and ``async for seg in stream(...)`` over an :class:`Ensemble`.

    Takes the same arguments as :meth:`Ensemble.generate` for one prompt or one
    conversation (``messages=``); requests from every task and thread share the
    engine's batch.
    """

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble

    async def _events(self, prompt, messages, settings, overrides) -> AsyncIterator:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(ev: object) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(q.put_nowait, ev)

        # checking and tokenizing the prompt stays off the loop too
        h, _ = await loop.run_in_executor(
            None, lambda: self.ensemble.submit(prompt, messages=messages, settings=settings, sink=sink, **overrides))
        finished = False
        try:
            while True:
                ev = await q.get()
                if isinstance(ev, BaseException):
                    finished = True
                    raise ev
                if isinstance(ev, GenerationResult):
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.ensemble.cancel(h.id)  # never blocks: the engine frees the slot before its next round

    async def generate(self, prompt: str | None = None, *, messages=None, settings=None, **overrides
                       ) -> GenerationResult:
        """One answer (a :class:`GenerationResult`)."""
        events = self._events(prompt, messages, settings, overrides)
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
        events = self._events(prompt, messages, settings, overrides)
        rel = None
        try:
            async for ev in events:
                if rel is None:
                    st = self.ensemble._settings_for(prompt or "", settings, dict(overrides))[0]
                    rel = _Releaser(st.stop)
                for out in rel.feed(ev):
                    yield out
        finally:
            await events.aclose()

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
