"""A text/event-stream response that ends the way its generator says.

The generator decides every event, including the last ones (an error event and
``data: [DONE]`` at shutdown): nothing outside it cuts the stream short, except
the client leaving, which cancels it (its ``finally`` cancels the request).
A comment line every ``ping`` seconds keeps idle proxies from closing a stream
that waits for a slot.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

from starlette.responses import Response

log = logging.getLogger("specem_fast.server")

_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no")]


class EventStream(Response):
    """``EventStream(events, on_close)``: sends ``data: <item>`` for each string ``events``
    yields; ``on_close`` runs however the response ends."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None], ping: float = 15.0):
        # a Response for the frameworks (returned as it is), sending its own messages
        self.status_code, self.raw_headers, self.background = 200, list(_HEADERS), None
        self.events, self.on_close, self.ping = events, on_close, ping

    async def __call__(self, scope, receive, send) -> None:
        lock, is_open = asyncio.Lock(), [True]

        async def put(data: bytes, more: bool = True) -> None:
            async with lock:
                if is_open[0]:  # a ping never follows the last message
                    is_open[0] = more
                    await send({"type": "http.response.body", "body": data, "more_body": more})

        async def pump() -> None:
            async for item in self.events:
                await put(f"data: {item}\n\n".encode())
            await put(b"", more=False)

        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        async def pings() -> None:
            while True:
                await asyncio.sleep(self.ping)
                await put(b": ping\n\n")

        tasks = []
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            tasks = [asyncio.ensure_future(c) for c in (pump(), gone(), pings())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await self.events.aclose()
            self.on_close()
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None and not isinstance(failed, OSError):  # OSError: the connection broke
            log.error("a stream failed", exc_info=failed)
