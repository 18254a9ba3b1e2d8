"""The OpenAI-compatible HTTP app: ``create_app(ensemble)`` -> FastAPI.

Kept apart from the CLI so other stacks can mount it or serve it their way.
Requests are validated once (protocol.py), turned into GenerationSettings on top
of the server's defaults, and submitted to the engine loop through
:class:`AsyncEnsemble` before any byte of the answer is sent: a full queue, a
prompt over the cache budget or a bad setting is an HTTP error, never a broken
stream. A client that goes away cancels its request (its slot is free within
one round), streaming or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..aio import AsyncEnsemble, AsyncRequest
from ..config import GenerationSettings
from ..ensemble import Segment
from ..errors import CacheFullError, QueueFullError, RequestCancelled, SpecEMError
from ..results import GenerationResult, RoundRecord
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .protocol import ENSEMBLE_FIELDS, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("specem_fast.server")

# engine stop reasons -> OpenAI finish_reason (the engine's own goes in "engine_stop_reason")
FINISH_REASON = {"stop": "stop", "stop_string": "stop", "fast_eos": "stop", "empty": "stop",
                 "length": "length", "cache_full": "length"}


class APIError(Exception):
    """An error answered in OpenAI's JSON shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# the first words of the engine's messages -> the request field they are about
_PARAM_WORDS = {"max_new_tokens": "max_tokens", "the prompt": "prompt", "prompt": "prompt", "messages": "messages",
                "stop strings": "stop", "a stop string": "stop", "temperature": "temperature", "top_p": "top_p",
                "seed": "seed", **{f: f for f in ENSEMBLE_FIELDS}}


def _engine_error(exc: SpecEMError, input_field: str) -> APIError:
    """A SpecEMError (bad input the engine found) as a 400 naming the field it is about."""
    msg = str(exc)
    if isinstance(exc, CacheFullError):
        return APIError(400, msg, param=input_field, code="context_length_exceeded")
    param = next((p for w, p in sorted(_PARAM_WORDS.items(), key=lambda kv: -len(kv[0])) if msg.startswith(w)), None)
    if param in ("prompt", "messages"):
        param = input_field
    return APIError(400, msg, param=param)


def _validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's errors as one 400 that names the (first) bad field."""
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])}); "
                             "send a JSON object", code="invalid_json")

    def param_of(err) -> str | None:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        # union members and wrappers appear as loc parts like 'str', 'list[str]', "literal['off']"
        parts = [str(p) for p in loc if isinstance(p, int) or (str(p).isidentifier() and str(p) not in
                                                                 ("str", "int", "float", "bool", "list", "dict"))]
        return ".".join(parts) or None

    param = param_of(first)
    if first.get("type") == "missing" and param is None:
        return APIError(400, "the request body is missing; send a JSON object", code="invalid_json")
    msgs = []
    for err in errors:
        if param_of(err) != param:
            continue
        if err.get("type") == "extra_forbidden":
            m = "unknown field; this server takes the OpenAI fields it implements plus the ensemble settings " \
                f"{', '.join(ENSEMBLE_FIELDS)} and trace"
        else:
            m = err["msg"].removeprefix("Value error, ")
        if m not in msgs:
            msgs.append(m)
    if first.get("type") == "model_type" and param is None:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    return APIError(400, f"{param or 'body'}: {' or '.join(msgs)}", param=param)


def _round_dict(rd: RoundRecord) -> dict[str, Any]:
    return {"index": rd.index, "candidates": [{"model": c.model, "text": c.text} for c in rd.candidates],
            "winner": rd.winner, "winner_model": rd.winner_model, "accepted": rd.accepted,
            "combined": rd.combined, "weights": rd.weights, "verified": rd.verified}


class _ApiKey:
    """ASGI middleware: /v1/* needs ``Authorization: Bearer <key>`` (401 otherwise); health and metrics stay open."""

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


class _Stream(EventSourceResponse):
    """An SSE response that cancels its request however the response ends
    (also when the client leaves before the first chunk was sent)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _disconnected(request: Request) -> None:
    """Return when the client has gone away (the body was already read)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


class _Service:
    def __init__(self, ensemble, model_name: str, defaults: GenerationSettings, shutdown_grace: float):
        self.ensemble = ensemble
        self.aens = AsyncEnsemble(ensemble)
        self.model_name = model_name
        self.defaults = defaults
        self.shutdown_grace = shutdown_grace
        self.metrics = ServerMetrics(ensemble)
        self.created = int(time.time())
        self.lead = ensemble.model_names[0]

    # -- helpers -------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} is not served here; this server serves {self.model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    def _usage(self, res: GenerationResult) -> dict[str, Any]:
        p = res.prompt_tokens.get(self.lead, 0)
        return {"prompt_tokens": p, "completion_tokens": res.new_tokens, "total_tokens": p + res.new_tokens,
                "prompt_tokens_per_model": res.prompt_tokens, "completion_tokens_per_model": res.tokens_per_model}

    def _observe_round(self, rd: RoundRecord, t0: float, first: bool) -> None:
        if first:
            self.metrics.first_segment.observe(time.perf_counter() - t0)
        self.metrics.won.labels(model=rd.winner_model).inc()

    def _observe_end(self, res: GenerationResult, t0: float) -> None:
        self.metrics.latency.observe(time.perf_counter() - t0)
        self.metrics.tokens.inc(res.new_tokens)
        self.metrics.prompt_tokens.inc(res.prompt_tokens.get(self.lead, 0))
        self.metrics.finished.labels(stop_reason=res.stop_reason).inc()

    def _failure(self, exc: BaseException) -> APIError:
        if isinstance(exc, RequestCancelled):
            return APIError(503, f"the request was cancelled: {exc} (the server is shutting down?); retry",
                            "server_error", code="cancelled")
        if isinstance(exc, SpecEMError):
            return APIError(400, str(exc))
        log.error("request failed", exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def _extra(self, res: GenerationResult, trace: bool) -> dict[str, Any]:
        out = {"stop_reason": res.stop_reason, "rounds": len(res.rounds), "wins": res.wins,
               "timings": res.timings, "settings": res.settings}
        if trace:
            out["trace"] = [_round_dict(r) for r in res.rounds]
        return out

    # -- the two completion endpoints ----------------------------------------------
    async def complete(self, request: Request, body: ChatCompletionRequest | CompletionRequest) -> Response:
        t0 = time.perf_counter()
        chat = isinstance(body, ChatCompletionRequest)
        field = "messages" if chat else "prompt"
        self._check_model(body.model)
        if self.ensemble.engine.closed:
            raise APIError(503, "the engine is closed (the server is shutting down); retry on another server",
                           "server_error", code="shutting_down")
        try:
            settings = self.defaults.with_overrides(**body.overrides())
        except SpecEMError as exc:
            raise _engine_error(exc, field) from None
        inputs = {"messages": [m.as_dict() for m in body.messages]} if chat else {"prompt": body.text}
        try:
            areq = await self.aens.submit(settings=settings, **inputs)
        except QueueFullError as exc:
            raise APIError(429, f"{exc}", "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except SpecEMError as exc:
            raise _engine_error(exc, field) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            return _Stream(self._chunks(areq, body, rid, t0), areq.cancel, sep="\n",
                           shutdown_grace_period=self.shutdown_grace)
        res = await self._wait(request, areq, t0)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": FINISH_REASON[res.stop_reason],
                                  "engine_stop_reason": res.stop_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": res.text}
        else:
            choice["text"] = res.text
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": [choice],
                             "usage": self._usage(res), "specem": self._extra(res, body.trace)})

    async def _wait(self, request: Request, areq: AsyncRequest, t0: float) -> GenerationResult:
        """The result; a client that disconnects first cancels the request."""

        async def collect() -> GenerationResult:
            first = True
            async for ev in areq.events():
                if isinstance(ev, RoundRecord):
                    self._observe_round(ev, t0, first)
                    first = False
                else:
                    return ev
            raise RuntimeError("the engine ended a request without a result")  # pragma: no cover

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (work, gone):
                if not t.done():
                    t.cancel()
            with contextlib.suppress(BaseException):
                await gone
        if not work.done() or work.cancelled():
            areq.cancel()
            self.metrics.cancelled.inc()
            with contextlib.suppress(BaseException):
                await work
            raise APIError(499, "the client closed the connection", code="client_closed")
        exc = work.exception()
        if exc is not None:
            raise self._failure(exc)
        res = work.result()
        self._observe_end(res, t0)
        return res

    async def _chunks(self, areq: AsyncRequest, body, rid: str, t0: float) -> AsyncIterator[ServerSentEvent]:
        """SSE events: one chunk per released segment, a closing chunk with the finish
        reason, the usage chunk when asked for, then ``data: [DONE]``."""
        chat = isinstance(body, ChatCompletionRequest)
        created = int(time.time())
        usage_field = {"usage": None} if body.include_usage else {}

        def chunk(choices: list, **extra) -> ServerSentEvent:
            obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                   "model": self.model_name, "choices": choices, **usage_field, **extra}
            return ServerSentEvent(data=json.dumps(obj, ensure_ascii=False))

        def choice(text: str, finish: str | None = None, **extra) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0}
            if chat:
                c["delta"] = {"role": "assistant", "content": text} if not sent_role else {"content": text}
            else:
                c["text"] = text
            c.update(logprobs=None, finish_reason=finish, **extra)
            return c

        sent_role, last_round = False, 0
        inner = areq.stream_with_result()
        try:
            async for ev in inner:
                if isinstance(ev, Segment):
                    new_round = ev.round.index > last_round
                    if new_round:
                        self._observe_round(ev.round, t0, last_round == 0)
                        last_round = ev.round.index
                    if ev.text or (body.trace and new_round):
                        extra = {"specem": {"round": _round_dict(ev.round)}} if body.trace and new_round else {}
                        yield chunk([choice(ev.text)], **extra)
                        sent_role = True
                    continue
                res = ev
                self._observe_end(res, t0)
                if chat and not sent_role:
                    yield chunk([choice("")])
                    sent_role = True
                yield chunk([choice("", FINISH_REASON[res.stop_reason], engine_stop_reason=res.stop_reason)],
                            specem=self._extra(res, False))
                if body.include_usage:
                    usage_field["usage"] = self._usage(res)
                    yield chunk([])
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.cancelled.inc()
            raise
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
            err = self._failure(exc)
            self.metrics.errors.labels(status=str(err.status)).inc()
            yield ServerSentEvent(data=json.dumps(err.body(), ensure_ascii=False))
        finally:
            await inner.aclose()
        yield ServerSentEvent(data="[DONE]")

    # -- the rest ----------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        ens = self.ensemble
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "specem-fast",
            "drafters": ens.drafters, "verifiers": ens.verifiers, "max_model_len": ens.config.cache_tokens,
            "max_batch": ens.config.max_batch}]}


def create_app(ensemble, *, model_name: str = "specem-fast", api_key: str | None = None,
               defaults: GenerationSettings | None = None, shutdown_grace: float = 30.0) -> FastAPI:
    """An OpenAI-compatible app over ``ensemble`` (an :class:`~specem_fast.Ensemble`).

    ``model_name``: the id clients pass as ``model``; ``defaults``: the settings a
    request starts from (its fields override them; temperature defaults to 0,
    greedy); ``api_key``: require ``Authorization: Bearer <key>`` on /v1/*;
    ``shutdown_grace``: seconds a running stream may finish after shutdown starts
    before it is cancelled. The app does not close the ensemble.
    """
    svc = _Service(ensemble, model_name, defaults or GenerationSettings(), shutdown_grace)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        svc.metrics.detach()

    app = FastAPI(title="specem-fast", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = svc

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        svc.metrics.errors.labels(status=str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = _validation_error(exc)
        svc.metrics.errors.labels(status="400").inc()
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=kind).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        svc.metrics.errors.labels(status="500").inc()
        return svc._failure(exc).response()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await svc.complete(request, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await svc.complete(request, body)

    @app.get("/v1/models")
    async def models():
        return svc.models()

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        svc._check_model(model_id)
        return svc.models()["data"][0]

    @app.get("/health")
    async def health():
        eng = ensemble.engine
        ok = not eng.closed
        return JSONResponse({"status": "ok" if ok else "closed", "running": eng.running, "waiting": eng.waiting},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if api_key:
        app.add_middleware(_ApiKey, key=api_key)
    return app
