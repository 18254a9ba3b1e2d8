"""Errors answered in OpenAI's JSON shape, and the mapping of engine and validation
errors to them (the status, and the request field in ``param``)."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from specem_fast.errors import CacheFullError, SpecEMError
from specem_fast.server.protocol import ENSEMBLE_FIELDS

# engine stop reasons -> OpenAI finish_reason (the engine's own goes in "engine_stop_reason")
FINISH_REASON = {"stop": "stop", "stop_string": "stop", "fast_eos": "stop", "empty": "stop",
                 "length": "length", "cache_full": "length"}

_SEND_JSON = "send a JSON object with the header Content-Type: application/json"


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
                "the conversation": "prompt", "stop strings": "stop", "a stop string": "stop",
                "temperature": "temperature", "top_p": "top_p", "seed": "seed", **{f: f for f in ENSEMBLE_FIELDS}}


def engine_error(exc: SpecEMError, input_field: str, note: str = "") -> APIError:
    """A SpecEMError (bad input the engine found) as a 400 naming the field it is about;
    ``note`` is added to a prompt-too-long message (the server's own numbers)."""
    msg = str(exc)
    if isinstance(exc, CacheFullError):
        return APIError(400, msg + note, param=input_field, code="context_length_exceeded")
    param = next((p for w, p in sorted(_PARAM_WORDS.items(), key=lambda kv: -len(kv[0])) if msg.startswith(w)), None)
    if param in ("prompt", "messages"):
        param = input_field
    return APIError(400, msg, param=param)


def _param_of(err) -> str | None:
    loc = [p for p in err.get("loc", ()) if p != "body"]
    # union members and wrappers appear as loc parts like 'str', 'list[str]', "literal['off']"
    parts = [str(p) for p in loc if isinstance(p, int) or (str(p).isidentifier() and str(p) not in
                                                             ("str", "int", "float", "bool", "list", "dict"))]
    return ".".join(parts) or None


def _not_an_object(given: Any, content_type: str | None) -> APIError:
    """The body is there but is not a JSON object: say what came and what is expected."""
    if isinstance(given, (bytes, bytearray)):  # FastAPI parses JSON only when the content type says JSON
        got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        return APIError(400, f"the request body must be JSON, sent with Content-Type: application/json "
                             f"(got {got}); {_SEND_JSON}", code="invalid_body")
    kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(given), type(given).__name__)
    return APIError(400, f"the request body must be a JSON object, not {kind}; {_SEND_JSON}", code="invalid_body")


def validation_error(exc: RequestValidationError, content_type: str | None = None) -> APIError:
    """Pydantic's errors as one 400 that names the (first) bad field."""
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])}); "
                             f"{_SEND_JSON}", code="invalid_json")
    param = _param_of(first)
    if first.get("type") == "missing" and param is None:
        return APIError(400, f"the request body is missing; {_SEND_JSON}", code="invalid_body")
    if first.get("type") in ("model_type", "model_attributes_type") and param is None:
        return _not_an_object(first.get("input"), content_type)
    msgs = []
    for err in errors:
        if _param_of(err) != param:
            continue
        if err.get("type") == "extra_forbidden":
            m = "unknown field; this server takes the OpenAI fields it implements plus the ensemble settings " \
                f"{', '.join(ENSEMBLE_FIELDS)} and trace"
        else:
            m = err["msg"].removeprefix("Value error, ")
        if m not in msgs:
            msgs.append(m)
    return APIError(400, f"{param or 'body'}: {' or '.join(msgs)}", param=param)
