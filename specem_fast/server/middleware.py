"""ASGI middleware of the server: the API key, and the request body size limit."""

from __future__ import annotations

import hmac
import time
from typing import Callable

from specem_fast.server.errors import APIError

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
# A refused body is still read (and dropped) up to this much or this long, so a client that
# sends the whole body before it reads the answer gets the 413 instead of a reset connection.
_DRAIN_BYTES = 64 * 2**20
_DRAIN_SECONDS = 10.0


class ApiKey:
    """/v1/* needs ``Authorization: Bearer <key>`` (401 otherwise); health and metrics stay open."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                err = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                                    "key the server was started with (--api-key)", "authentication_error",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


class BodyLimit:
    """A request body over ``limit`` bytes is answered 413 (OpenAI's error shape) and
    never reaches the app: a Content-Length over the limit at once, a body sent in
    chunks as soon as it passes it. Bodies within the limit are read here and handed
    on whole; the app's later ``receive`` calls (disconnect watching) go to the server.
    """

    def __init__(self, app, limit: int, on_refuse: Callable[[], None] | None = None):
        self.app, self.limit, self.on_refuse = app, limit, on_refuse

    def _error(self, size: str) -> APIError:
        return APIError(413, f"the request body is {size}, over this server's limit of {self.limit} bytes "
                             f"({_mib(self.limit)}); send a shorter prompt, or start the server with a larger "
                             "--max-body-mb", code="request_too_large", headers={"Connection": "close"})

    async def _refuse(self, scope, receive, send, size: str, drain: bool) -> None:
        if drain:
            t_end, got = time.monotonic() + _DRAIN_SECONDS, 0
            while got < _DRAIN_BYTES and time.monotonic() < t_end:
                msg = await receive()
                if msg["type"] != "http.request":
                    return  # the client has gone: nobody to answer
                got += len(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
        if self.on_refuse is not None:
            self.on_refuse()
        await self._error(size).response()(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            declared = -1  # the HTTP server refuses a malformed length itself
        if declared > self.limit:
            # a client waiting for "100 Continue" has sent nothing yet: answer before it does
            expects = headers.get(b"expect", b"").lower() == b"100-continue"
            await self._refuse(scope, receive, send, f"{declared} bytes", drain=not expects)
            return
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # gone before the body arrived: no work for anyone
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                chunks.clear()
                await self._refuse(scope, receive, send, f"more than {self.limit} bytes", drain=msg.get("more_body"))
                return
            if not msg.get("more_body"):
                break
        body = [b"".join(chunks)]
        chunks.clear()

        async def replay():
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
