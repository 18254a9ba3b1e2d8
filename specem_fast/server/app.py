"""The OpenAI-compatible HTTP app: ``create_app(ensemble)`` -> FastAPI.

Kept apart from the CLI so other stacks can mount it or serve it their way.
Requests are validated once (protocol.py), turned into GenerationSettings on top
of the server's defaults, checked against the KV budget and submitted to the
engine loop (service.py) before any byte of the answer is sent. A body over the
size limit is refused before it is parsed (middleware.py).

Shutdown: whoever runs the app calls ``app.state.begin_shutdown()`` when it
starts shutting down (``specem-fast serve`` on SIGTERM/SIGINT, and
:class:`BackgroundServer` do); running requests then get ``shutdown_grace``
seconds, after which every one still running is answered with a shutdown error
(streams: an error event and ``data: [DONE]``; others: a JSON 503) and cancelled.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from specem_fast.config import GenerationSettings
from specem_fast.server.errors import APIError, validation_error
from specem_fast.server.metrics import CONTENT_TYPE_LATEST
from specem_fast.server.middleware import DEFAULT_MAX_BODY_BYTES, ApiKey, BodyLimit
from specem_fast.server.protocol import ChatCompletionRequest, CompletionRequest
from specem_fast.server.service import Service


def _add_error_handlers(app: FastAPI, svc: Service) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        svc.metrics.errors.labels(status=str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = validation_error(exc, request.headers.get("content-type"))
        svc.metrics.errors.labels(status="400").inc()
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=kind).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        svc.metrics.errors.labels(status="500").inc()
        return svc.failure(exc).response()


def _add_routes(app: FastAPI, svc: Service) -> None:
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
        svc.check_model(model_id)
        return next(m for m in svc.models()["data"] if m["id"] == model_id)

    @app.get("/health")
    async def health():
        eng = svc.ensemble.engine
        # a member that is down (a Ray member whose node is gone, not restarted yet) fails every request
        down = [n for n, m in getattr(svc.ensemble, "members", {}).items()
                if hasattr(m, "describe") and m.describe().get("state") == "down"]
        status = "closed" if eng.closed else "draining" if svc.draining else "degraded" if down else "ok"
        body = {"status": status, "running": eng.running, "waiting": eng.waiting}
        if down:
            body["down"] = down
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_app(ensemble, *, model_name: str = "specem-fast", api_key: str | None = None,
               defaults: GenerationSettings | None = None, shutdown_grace: float = 30.0,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               profiles: dict[str, GenerationSettings] | None = None) -> FastAPI:
    """An OpenAI-compatible app over ``ensemble`` (an :class:`~specem_fast.Ensemble`).

    ``model_name``: the id clients pass as ``model``; ``defaults``: the settings a
    request starts from (its fields override them; temperature defaults to 0,
    greedy); ``api_key``: require ``Authorization: Bearer <key>`` on /v1/*;
    ``shutdown_grace``: seconds running requests may finish after
    ``app.state.begin_shutdown()`` before they are answered with a shutdown error;
    ``max_body_bytes``: larger request bodies get 413 unread; ``profiles``: more
    model ids, each one of the ensemble's profiles (``Ensemble.add_profile``) with the
    settings its requests start from. The app does not close the ensemble.
    """
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a whole number of bytes >= 1 (got {max_body_bytes!r})")
    if defaults is None:  # the ensemble's preset, when it has one
        defaults = getattr(ensemble, "defaults", None) or GenerationSettings()
    svc = Service(ensemble, model_name, defaults, shutdown_grace, profiles)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await svc.startup()
        yield
        svc.shutdown_done()

    app = FastAPI(title="specem-fast", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = svc
    app.state.begin_shutdown = svc.begin_shutdown
    _add_error_handlers(app, svc)
    _add_routes(app, svc)
    app.add_middleware(BodyLimit, limit=max_body_bytes, on_refuse=svc.metrics.errors.labels(status="413").inc)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)  # added last: runs first, before any body is read
    return app
