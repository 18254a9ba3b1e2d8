"""The completion endpoints' work: checks before the engine, waiting, streaming, shutdown.

Every request is checked before it costs the engine anything: the model name,
the settings, a window that leaves no room for a prompt, and the prompt's
length against the KV budget (characters first, then a count that stops past
the budget; see :meth:`TextCodec.refuse_too_long`). It is then submitted
through :class:`AsyncEnsemble` before any byte of the answer is sent, so a
full queue or a bad input is an HTTP error, never a broken stream. Each step
races the client: a client that goes away stops the request wherever it is.

Shutdown (:meth:`Service.begin_shutdown`): new requests get 503 at once;
running ones get the grace period to finish, then every one still running is
cancelled and answered: a stream with an error event in OpenAI's shape and
``data: [DONE]``, a non-streaming request with a JSON 503 saying it may be
retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from specem_fast.api.aio import AsyncEnsemble, AsyncRequest
from specem_fast.config import GenerationSettings, check_text
from specem_fast.errors import QueueFullError, RequestCancelled, SpecEMError
from specem_fast.results import GenerationResult, RoundRecord
from specem_fast.model.text import StopPrefixes
from specem_fast.server.errors import FINISH_REASON, APIError, engine_error
from specem_fast.server.metrics import ServerMetrics
from specem_fast.server.protocol import ChatCompletionRequest, CompletionRequest
from specem_fast.server.sse import EventStream

log = logging.getLogger("specem_fast.server")

# room one round of drafting needs in every member's cache, per drafter: its window plus
# the slack the engine keeps (Ensemble._prepare refuses prompts the same way)
_ROUND_SLACK = 4


class _ClientGone(Exception):
    """The client closed the connection while its request was being handled."""


class _Live:
    """One request in flight: its engine request once submitted, and the future that
    shutdown resolves (with the APIError to answer) when the grace period is over."""

    def __init__(self) -> None:
        self.areq: AsyncRequest | None = None
        self.aborted: asyncio.Future = asyncio.get_running_loop().create_future()

    def abort(self, err: APIError) -> None:
        if not self.aborted.done():
            self.aborted.set_result(err)
        if self.areq is not None:
            self.areq.cancel()


async def _disconnected(request: Request) -> None:
    """Return when the client has gone away (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _round_dict(rd: RoundRecord) -> dict[str, Any]:
    return {"index": rd.index, "candidates": [{"model": c.model, "text": c.text} for c in rd.candidates],
            "winner": rd.winner, "winner_model": rd.winner_model, "accepted": rd.accepted,
            "combined": rd.combined, "weights": rd.weights, "verified": rd.verified}


class _Release:
    """The answer's text as it may be streamed: never taken back. With stop strings only
    the end of the answer that may begin one is held (:class:`StopPrefixes`)."""

    def __init__(self, stops) -> None:
        self.stops = StopPrefixes(stops)
        self.answer, self.sent = "", 0

    def round(self, rd: RoundRecord) -> str:
        self.answer = self.answer[: rd.answer_chars - len(rd.accepted)] + rd.accepted
        end = max(self.sent, len(self.answer) - self.stops.hold(self.answer))
        out, self.sent = self.answer[self.sent:end], end
        return out

    def end(self, res: GenerationResult) -> str:
        return res.text[self.sent:]


class _ChunkJSON:
    """The JSON text of one stream's chunks: ``chunk(text)`` (the first chat chunk carries
    the role), ``chunk("", finish)``, ``chunk(None)`` (no choice: the usage chunk)."""

    def __init__(self, rid: str, model: str, chat: bool, include_usage: bool):
        self.head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model}
        self.chat, self.include_usage, self.sent_role = chat, include_usage, False
        self.usage: dict[str, Any] | None = None

    def __call__(self, text: str | None, finish: str | None = None, choice: dict | None = None, **extra) -> str:
        choices: list[dict[str, Any]] = []
        if text is not None:
            c: dict[str, Any] = {"index": 0}
            if self.chat:
                c["delta"] = {"content": text} if self.sent_role else {"role": "assistant", "content": text}
                self.sent_role = True
            else:
                c["text"] = text
            c.update(logprobs=None, finish_reason=finish, **(choice or {}))
            choices.append(c)
        usage = {"usage": self.usage} if self.include_usage else {}
        return json.dumps({**self.head, "choices": choices, **usage, **extra}, ensure_ascii=False)


class Service:
    def __init__(self, ensemble, model_name: str, defaults: GenerationSettings, shutdown_grace: float,
                 profiles: dict[str, GenerationSettings] | None = None):
        self.ensemble = ensemble
        self.aens = AsyncEnsemble(ensemble)
        self.model_name = model_name
        self.defaults = defaults
        # model id -> (the ensemble's profile, the settings its requests start from)
        self.served: dict[str, tuple[str | None, GenerationSettings]] = {model_name: (None, defaults)}
        for name, st in (profiles or {}).items():
            if name in self.served:
                raise ValueError(f"profile {name!r} has the name of another served model; name it differently")
            self.served[name] = (name, st)
        self.shutdown_grace = shutdown_grace
        self.metrics = ServerMetrics(ensemble)
        self.created = int(time.time())
        self.lead = ensemble.model_names[0]
        self.live: set[_Live] = set()
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._deadline: asyncio.TimerHandle | None = None

    # -- life ----------------------------------------------------------------------
    async def startup(self) -> None:
        self.loop = asyncio.get_running_loop()
        codecs = [r.codec for r in self.ensemble.runners.values()]
        # the length check's bound reads each vocabulary once: before the first request, not in it
        await self.loop.run_in_executor(None, lambda: [c.max_chars_per_token for c in codecs])

    def shutdown_done(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self.metrics.detach()

    def begin_shutdown(self, grace: float | None = None) -> None:
        """Start a graceful shutdown (thread-safe; a second call does nothing): new requests
        get 503, running ones ``grace`` seconds (default: the app's) before they are answered
        with a shutdown error and cancelled."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._drain, self.shutdown_grace if grace is None else grace)

    def _drain(self, grace: float) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: %d request(s) running get %g s to finish", len(self.live), grace)
        self._deadline = asyncio.get_running_loop().call_later(grace, self._abort_all, grace)

    def _abort_all(self, grace: float) -> None:
        err = APIError(503, f"the server shut down before this request finished (it had the shutdown grace period "
                            f"of {grace:g} s, --shutdown-timeout); it was cancelled and may be retried",
                       "server_error", code="shutting_down", headers={"Retry-After": "1"})
        for live in list(self.live):
            live.abort(err)

    # -- checks before the engine ------------------------------------------------------
    def check_model(self, model: str | None) -> tuple[str, str | None, GenerationSettings]:
        """(model id, ensemble profile, its default settings) of a request's ``model``."""
        model = self.model_name if model is None else model
        if model not in self.served:
            names = ", ".join(repr(n) for n in self.served)
            raise APIError(404, f"model {model!r} is not served here; this server serves {names} "
                                "(see GET /v1/models)", param="model", code="model_not_found")
        return (model, *self.served[model])

    def _check_open(self) -> None:
        if self.draining or self.ensemble.engine.closed:
            raise APIError(503, "the server is shutting down and takes no new requests; retry on another server "
                                "or once it is back", "server_error", code="shutting_down",
                           headers={"Retry-After": "1"})

    def _prompt_budget(self, settings: GenerationSettings) -> tuple[int, str]:
        """The tokens a prompt may take with these settings, and a note naming the numbers;
        a window that leaves no room for any prompt is a 400 about the window."""
        cache, k, w = self.ensemble.config.cache_tokens, len(self.ensemble.drafters), settings.window
        room = k * (w + _ROUND_SLACK)
        if room >= cache:
            fit = (cache - 1) // k - _ROUND_SLACK
            fix = f"use a window of at most {fit}" if fit >= 1 else "use fewer drafters"
            raise APIError(400, f"window {w} is too large for the KV-cache budget: one round of {k} drafter(s) "
                                f"needs {k} x ({w} + {_ROUND_SLACK}) = {room} of the {cache} tokens per request "
                                f"(--cache-tokens {cache}), leaving no room for a prompt; {fix} or raise "
                                "--cache-tokens", param="window")
        return cache - room, f" (this server: --cache-tokens {cache}, of which one round at window {w} takes {room})"

    async def _check_length(self, inputs: dict[str, Any], settings: GenerationSettings, field: str) -> None:
        limit, note = self._prompt_budget(settings)
        if "messages" in inputs:
            texts, what = [m["content"].strip() for m in inputs["messages"]], "the conversation"
        else:
            texts, what = [inputs["prompt"].strip()], "the prompt"
        codecs = [r.codec for r in self.ensemble.runners.values()]

        def check() -> None:
            for text in texts:  # what the engine checks first; tokenizers cannot take a lone surrogate
                check_text(text, what)
            for codec in sorted(codecs, key=lambda c: c.max_chars_per_token or 1 << 30):  # quickest refusal first
                codec.refuse_too_long(texts, limit, what)

        try:
            await asyncio.get_running_loop().run_in_executor(None, check)
        except SpecEMError as exc:
            raise engine_error(exc, field, note) from None

    async def _submit(self, inputs: dict[str, Any], settings: GenerationSettings, field: str) -> AsyncRequest:
        try:
            return await self.aens.submit(settings=settings, **inputs)
        except QueueFullError as exc:
            raise APIError(429, f"{exc}", "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except SpecEMError as exc:  # the engine's exact count: the prompt's template tokens tipped it over
            raise engine_error(exc, field, self._prompt_budget(settings)[1]) from None

    async def _race(self, live: _Live, aw, request: Request | None):
        """``await aw``, unless shutdown's deadline (raises its APIError) or, with a
        ``request``, the client leaving (raises _ClientGone) comes first; then ``aw``
        is cancelled. What ``aw`` gave wins a tie, unless it failed after the deadline
        cancelled the request (its events end without a result then)."""
        if live.aborted.done():
            if asyncio.iscoroutine(aw):
                aw.close()
            raise live.aborted.result()
        work = asyncio.ensure_future(aw)
        gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
        try:
            await asyncio.wait({work, live.aborted} | ({gone} if gone else set()), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (work, gone):
                if t is not None and not t.done():
                    t.cancel()
                    await asyncio.wait({t})
        if not work.cancelled() and work.exception() is None:
            return work.result()
        if live.aborted.done():
            raise live.aborted.result()
        if not work.cancelled():
            return work.result()  # raises its exception
        raise _ClientGone()

    # -- the two completion endpoints ----------------------------------------------
    async def complete(self, request: Request, body: ChatCompletionRequest | CompletionRequest) -> Response:
        t0 = time.perf_counter()
        chat = isinstance(body, ChatCompletionRequest)
        field = "messages" if chat else "prompt"
        model, profile, base = self.check_model(body.model)
        self._check_open()
        try:
            settings = base.with_overrides(**body.overrides())
        except SpecEMError as exc:
            raise engine_error(exc, field) from None
        inputs = {"messages": [m.as_dict() for m in body.messages]} if chat else {"prompt": body.text}
        if profile is not None:
            inputs["profile"] = profile
        live = _Live()
        self.live.add(live)
        try:
            await self._race(live, self._check_length(inputs, settings, field), request)
            live.areq = await self._race(live, self._submit(inputs, settings, field), request)
        except _ClientGone:
            self.live.discard(live)
            self.metrics.cancelled.inc()
            raise APIError(499, "the client closed the connection", code="client_closed") from None
        except BaseException:
            self.live.discard(live)
            raise
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            return EventStream(self._chunks(live, body, settings, rid, t0, model), lambda: self._finished(live))
        try:
            res = await self._wait(request, live, t0)
        finally:
            self._finished(live)
        return JSONResponse(self._answer(res, body, rid, model))

    def _finished(self, live: _Live) -> None:
        self.live.discard(live)
        if live.areq is not None:
            live.areq.cancel()  # nothing if it finished

    def _answer(self, res: GenerationResult, body, rid: str, model: str) -> dict[str, Any]:
        chat = isinstance(body, ChatCompletionRequest)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": FINISH_REASON[res.stop_reason],
                                  "engine_stop_reason": res.stop_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": res.text}
        else:
            choice["text"] = res.text
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model, "choices": [choice], "usage": self.usage(res),
                "specem": self._extra(res, body.trace)}

    async def _wait(self, request: Request, live: _Live, t0: float) -> GenerationResult:
        """The result; a client that disconnects first cancels the request."""

        async def collect() -> GenerationResult:
            first = True
            async for ev in live.areq.events():
                if isinstance(ev, RoundRecord):
                    self._observe_round(ev, t0, first)
                    first = False
                else:
                    return ev
            raise RuntimeError("the engine ended a request without a result")  # pragma: no cover

        try:
            res = await self._race(live, collect(), request)
        except _ClientGone:
            self.metrics.cancelled.inc()
            raise APIError(499, "the client closed the connection", code="client_closed") from None
        except APIError:  # shutdown's deadline
            self.metrics.cancelled.inc()
            raise
        except Exception as exc:  # noqa: BLE001 - an engine error: answered, never re-raised
            raise self.failure(exc) from None
        self._observe_end(res, t0)
        return res

    async def _chunks(self, live: _Live, body, settings: GenerationSettings, rid: str, t0: float, model: str
                      ) -> AsyncIterator[str]:
        """SSE data: one chunk per released segment, a closing chunk with the finish
        reason, the usage chunk when asked for, then ``[DONE]``; an error (the engine's,
        or shutdown's deadline) is an error event before ``[DONE]``."""
        chat = isinstance(body, ChatCompletionRequest)
        chunk = _ChunkJSON(rid, model, chat, body.include_usage)
        events = live.areq.events()
        release, last_round = _Release(settings.stop), 0
        try:
            while True:
                try:
                    ev = await self._race(live, anext(events), None)
                except StopAsyncIteration:  # pragma: no cover - the result always comes last
                    raise RuntimeError("the engine ended the request without a result") from None
                if isinstance(ev, RoundRecord):
                    self._observe_round(ev, t0, last_round == 0)
                    last_round = ev.index
                    text = release.round(ev)
                    if text or body.trace:
                        yield chunk(text, **({"specem": {"round": _round_dict(ev)}} if body.trace else {}))
                    continue
                self._observe_end(ev, t0)
                rest = release.end(ev)
                if rest or (chat and not chunk.sent_role):
                    yield chunk(rest)
                yield chunk("", FINISH_REASON[ev.stop_reason], choice={"engine_stop_reason": ev.stop_reason},
                            specem=self._extra(ev, False))
                if body.include_usage:
                    chunk.usage = self.usage(ev)
                    yield chunk(None)
                break
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.cancelled.inc()
            raise
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
            err = exc if isinstance(exc, APIError) else self.failure(exc)
            if isinstance(exc, APIError):
                self.metrics.cancelled.inc()
            self.metrics.errors.labels(status=str(err.status)).inc()
            yield json.dumps(err.body(), ensure_ascii=False)
        finally:
            await events.aclose()
        yield "[DONE]"

    # -- results and metrics ------------------------------------------------------------
    def usage(self, res: GenerationResult) -> dict[str, Any]:
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

    def failure(self, exc: BaseException) -> APIError:
        if isinstance(exc, RequestCancelled):
            return APIError(503, f"the request was cancelled: {exc} (the server is shutting down?); retry",
                            "server_error", code="cancelled")
        if isinstance(exc, SpecEMError):
            return APIError(400, str(exc))
        log.error("request failed", exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def _extra(self, res: GenerationResult, trace: bool) -> dict[str, Any]:
        meta = res.metadata or {}
        out = {"stop_reason": res.stop_reason, "rounds": len(res.rounds), "wins": res.wins,
               "timings": res.timings, "settings": res.settings,
               "preset": meta.get("preset"), "weights": meta.get("weights"), "profile": meta.get("profile")}
        if trace:
            out["trace"] = [_round_dict(r) for r in res.rounds]
        return out

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(self.ensemble, name, profile, self.created)
                                           for name, (profile, _) in self.served.items()]}


def _model_card(ens, name: str, profile: str | None, created: int) -> dict[str, Any]:
    """One served model id: the ensemble's members and budget, and the profile it runs."""
    prof = ens.profiles.get(profile) if hasattr(ens, "profiles") else None
    return {"id": name, "object": "model", "created": created, "owned_by": "specem-fast",
            "drafters": ens.drafters, "verifiers": ens.verifiers, "max_model_len": ens.config.cache_tokens,
            "max_batch": ens.config.max_batch, "batch_independent": getattr(ens.config, "batch_invariant", False),
            "profile": profile or "default",
            "preset": prof.preset if prof is not None else None,
            "weights": prof.weights_source if prof is not None else None}
