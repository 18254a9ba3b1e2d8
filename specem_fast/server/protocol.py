"""Request bodies of the OpenAI-compatible endpoints, validated once at the edge.

Strict pydantic models: a field of the wrong type, an unknown field or a value
out of range is a 400 naming the field, before anything reaches the engine.
OpenAI fields this server cannot honour (penalties, logprobs, n > 1) are
accepted only at their neutral values, so a client never silently gets less
than it asked for. Ensemble settings ride along as extra body fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from specem_fast.config import HEDGE_SCHEDULES, INIT_WEIGHTS, MAX_SEED, RUN_MODES, SCORE_MODES

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # NaN, Infinity: "finite number"

# request field -> GenerationSettings field, for the ensemble options passed through as they are
ENSEMBLE_FIELDS = ("window", "hedge_lr", "score", "fast_eos", "hedge_schedule", "init_weights", "exit_threshold",
                   "exit_patience", "skip_agreed", "self_votes", "prefer_finished", "mode")


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = _STRICT

    model: str | None = None  # None: the served ensemble
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # default 0 (greedy), the engine's default
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # ensemble settings (extra body fields)
    window: int | None = Field(None, ge=1)
    hedge_lr: float | Literal["off"] | None = None
    score: Literal[SCORE_MODES] | None = None  # type: ignore[valid-type]
    fast_eos: bool | None = None
    hedge_schedule: Literal[HEDGE_SCHEDULES] | None = None  # type: ignore[valid-type]
    init_weights: Literal[INIT_WEIGHTS] | None = None  # type: ignore[valid-type]
    exit_threshold: float | None = Field(None, gt=0, lt=1)
    exit_patience: int | None = Field(None, ge=1)
    skip_agreed: bool | None = None
    self_votes: bool | None = None
    prefer_finished: bool | None = None
    mode: Literal[RUN_MODES] | None = None  # type: ignore[valid-type]
    trace: bool = False  # return every round's candidates and winner

    @field_validator("n")
    @classmethod
    def _one_answer(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported (got {v}): the ensemble writes one answer per request; "
                             "send n requests with different seeds for n answers")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0, 0.0):
            raise ValueError("penalties are not supported; leave them out or set 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported (the members have different vocabularies); leave it out")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def overrides(self) -> dict[str, Any]:
        """The GenerationSettings overrides this request asks for (unset fields keep the server's defaults)."""
        out: dict[str, Any] = {}
        n = self.max_new_tokens()
        if n is not None:
            out["max_new_tokens"] = n
        for name in ("temperature", "top_p", "seed", *ENSEMBLE_FIELDS):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        if self.hedge_lr == "off":
            out["hedge_lr"] = None
        if self.stop is not None:
            out["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        """The engine's form: developer turns are system turns; text parts are joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported (each segment is scored by several models); leave it out")
        return v

    @model_validator(mode="after")
    def _one_limit(self) -> "ChatCompletionRequest":
        if None not in (self.max_completion_tokens, self.max_tokens) and self.max_completion_tokens != self.max_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; give one of them")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError(f"give one prompt per request (got a list of {len(v)}); send one request per prompt")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported; leave it out")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported; leave it out")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported; leave it out")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError("logprobs are not supported (each segment is scored by several models); leave it out")
        return v

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
