"""A member served by vLLM's OpenAI-compatible server, over HTTP.

The tokenizer is local (:class:`~specem_fast.model.text.TextCodec` on the member's
tokenizer folder) and so is each request's sequence of ids; the server is
stateless for us (its prefix cache does what it can). Per round and request:

- ``draft``: ``POST /v1/completions`` with the sequence's token ids as the
  prompt, ``max_tokens`` = the window, the request's temperature, top_p and a
  seed derived from the request's seed and the sequence length (so a retried
  call draws the same tokens), the member's stop tokens as ``stop_token_ids``
  and ``return_token_ids``. The text is decoded and cut back to a word
  boundary here, exactly as the local member does.
- ``verify``: one ``POST /v1/completions`` for every request's candidates:
  each candidate is one prompt (sequence + candidate ids), ``max_tokens=1``,
  ``prompt_logprobs=0``; a candidate's score is the mean log-prob of its own
  tokens. vLLM computes prompt log-probs over the whole prompt and does not
  read its prefix cache for such a request, so every verify re-prefills the
  sequence, once per candidate (benchmarks/RESULTS.md, "Scale out", measures
  it; a vLLM member can instead be a drafter only, with local verifiers).
  vLLM gives no raw logits: ``score="logit"`` with a vLLM verifier is refused
  when the request is prepared (``logprob`` and ``logprob_sum`` work).

vLLM silently ignores request fields it does not know, so every field relied
on is checked in the answer (``token_ids``, ``prompt_logprobs``, the echoed
prompt ids, lengths, finite numbers); an answer that fails a check, a server
that is down (after bounded retries) or a call that times out ends the
round's requests with :class:`RemoteMemberError` naming the member and the
endpoint. No call changes the member's state before its answer was checked,
so the member stays usable for the next request.

Spec: ``vllm:URL#MODEL`` with optional ``;key=value`` options after MODEL
(see :data:`OPTIONS`), e.g.
``vllm:https://gpu1:8000#qwen2.5-coder-0.5b-instruct;served=qwen;key_env=GPU1_KEY``.
MODEL needs only the served model's tokenizer: a registry name, a folder holding just
tokenizer files, or a Hub id (hub/resolve.py; no weights, no config.json, any
architecture: the model runs on the server).
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from specem_fast.config import SEED_STRIDE
from specem_fast.errors import SpecEMError
from specem_fast.members.interface import CommitCall, DraftCall, DraftOut, MemberStateError, OpenCall, VerifyCall, VerifyOut, check_held
from specem_fast.model import room as cache_room
from specem_fast.model.text import TextCodec, generation_eos

# The spec's options (``;name=value`` after MODEL) and what they mean.
OPTIONS = {
    "served": "the served model name (vLLM's --served-model-name; default: MODEL as written)",
    "key_env": "the environment variable holding this endpoint's bearer key (default: SPECEM_VLLM_API_KEY, if set)",
    "timeout": f"seconds one HTTP call may take (default {60:g})",
    "retries": "how many times a call that could not reach the server (or got a 5xx/429) is retried (default 2)",
    "verify": "prompt_logprobs (default: one prompt per candidate, the sequence re-prefilled each time) or cached "
              "(one prompt per candidate token, reading vLLM's prefix cache; see VERIFY_MODES)",
}
# How a vLLM member scores candidates. ``prompt_logprobs``: one prompt per candidate
# (sequence + candidate) with prompt_logprobs; vLLM does not read its prefix cache for it,
# so each candidate costs a prefill of the whole sequence. ``cached``: one prompt per
# candidate token (sequence + the candidate's earlier tokens), max_tokens=1 and
# logprob_token_ids asking for that token's log-prob; such prompts read the prefix cache
# (whole blocks: 128 tokens on vLLM's CPU backend, 16 by default on GPUs), so each
# candidate token costs the sequence's tokens past its last full block plus the
# candidate's earlier tokens, whatever the sequence's length (benchmarks/RESULTS.md,
# "Scale out", measures both).
VERIFY_MODES = ("prompt_logprobs", "cached")
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's cap on logprob_token_ids per request
DEFAULT_KEY_ENV = "SPECEM_VLLM_API_KEY"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 2
BACKOFF_S = 0.5  # first pause between retries, doubled each time
MAX_CONCURRENT = 8  # HTTP calls one member has in flight at once (its drafts with different settings)
# checked against the server's own tokenizer at start-up (POST /tokenize), when it has one
TOKENIZER_PROBE = "Hello, world! 123 — naïve café, x=y*2;\n\tend."


class RemoteMemberError(SpecEMError):
    """A remote member's server could not be reached or gave an answer that does not check out."""


def split_options(model: str) -> tuple[str, dict[str, str]]:
    """``MODEL;name=value;...`` -> (MODEL, options), every option name checked."""
    head, *rest = model.split(";")
    options: dict[str, str] = {}
    for part in rest:
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise SpecEMError(f"vLLM member option {part!r} is not name=value (options: {', '.join(OPTIONS)})")
        if name not in OPTIONS:
            raise SpecEMError(f"unknown vLLM member option {name!r}; the options are: "
                              + "; ".join(f"{k}: {v}" for k, v in OPTIONS.items()))
        options[name] = value
    return head.strip(), options


@dataclass(eq=False)
class _Seq:
    """One request as this member holds it: its ids, its sampling settings, this round's draft."""

    ids: list[int]
    temperature: float
    top_p: float
    seed: int | None
    draft: DraftOut | None = None


@dataclass
class CallStats:
    """What the member's HTTP calls cost (for benchmarks and describe())."""

    calls: dict[str, int] = field(default_factory=lambda: {"draft": 0, "verify": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"draft": 0.0, "verify": 0.0})
    prompt_tokens: dict[str, int] = field(default_factory=lambda: {"draft": 0, "verify": 0})
    retries: int = 0


class VLLMEndpoint:
    """One vLLM server's OpenAI-compatible API as a member uses it: a bearer key,
    timeouts, bounded retries, and errors that name the member and the endpoint."""

    def __init__(self, name: str, url: str, served: str, timeout: float, retries: int, key_env: str | None,
                 client: Any = None):
        import httpx  # the `remote` extra

        self.name, self.url, self.served, self.timeout, self.retries = name, url, served, timeout, retries
        self.key_env = key_env
        key = None
        if key_env:
            key = os.environ.get(key_env)
            if not key:
                raise SpecEMError(f"vLLM member {name}: the environment variable {key_env} (key_env) is not set "
                                  "or empty; export this endpoint's bearer key in it")
        else:
            key = os.environ.get(DEFAULT_KEY_ENV) or None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._pool: ThreadPoolExecutor | None = None  # concurrent calls of one member (map)
        self._client = client or httpx.Client(
            base_url=url, headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=MAX_CONCURRENT, max_keepalive_connections=MAX_CONCURRENT))
        self._httpx = httpx
        self.stats = CallStats()

    def where(self) -> str:
        return f"vLLM member {self.name} (model {self.served!r} at {self.url})"

    def error(self, what: str) -> RemoteMemberError:
        return RemoteMemberError(f"{self.where()}: {what}")

    def request(self, method: str, path: str, what: str, body: dict | None = None,
                 missing_ok: bool = False) -> Any:
        """One call with bounded retries: connection failures, 5xx, 408 and 429 are retried with
        a growing pause; a timeout is not (the server is busy; a retry would add to it)."""
        httpx = self._httpx
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                r = self._client.request(method, path, json=body)
            except httpx.TimeoutException as exc:
                if isinstance(exc, httpx.ConnectTimeout):
                    last = f"connecting timed out ({exc})"
                    continue
                raise self.error(f"{what}: no answer within {self.timeout:g} s ({type(exc).__name__}); "
                                  "raise the member's timeout (;timeout=S) or check the server's load") from None
            except httpx.TransportError as exc:
                last = f"cannot reach the server ({type(exc).__name__}: {exc})"
                continue
            if r.status_code == 404 and missing_ok:
                return None
            if r.status_code < 400:
                try:
                    return r.json()
                except ValueError:
                    raise self.error(f"{what}: the answer is not JSON ({r.text[:200]!r})") from None
            message = _server_message(r)
            if r.status_code in (401, 403):
                raise self.error(f"{what}: the server refused the bearer key (HTTP {r.status_code}: {message}); "
                                  f"set it in {self.key_env or DEFAULT_KEY_ENV}")
            if r.status_code in (408, 429) or r.status_code >= 500:
                last = f"HTTP {r.status_code}: {message}"
                continue
            raise self.error(f"{what}: HTTP {r.status_code}: {message}")
        tries = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
        raise self.error(f"{what} failed after {tries}: {last}")

    def post(self, kind: str, what: str, body: dict, prompt_tokens: int) -> Any:
        """POST /v1/completions, counted in ``stats`` as a ``kind`` ("draft"/"verify") call."""
        t0 = time.perf_counter()
        got = self.request("POST", "/v1/completions", what, body)
        self.stats.calls[kind] += 1
        self.stats.seconds[kind] += time.perf_counter() - t0
        self.stats.prompt_tokens[kind] += prompt_tokens
        return got

    def probe(self, codec: TextCodec, folder: Path) -> tuple[int, bool]:
        """The served model's length limit (GET /v1/models) and, where the server can say
        (POST /tokenize), that its tokenizer is the local one."""
        got = self.request("GET", "/v1/models", "listing the served models")
        data = got.get("data") if isinstance(got, dict) else None
        if not isinstance(data, list):
            raise self.error(f"GET /v1/models gave no model list ({str(got)[:200]}); is this an OpenAI-compatible "
                              "server?")
        ids = [m.get("id") for m in data if isinstance(m, dict)]
        card = next((m for m in data if isinstance(m, dict) and m.get("id") == self.served), None)
        if card is None:
            raise self.error(f"the server serves {', '.join(map(str, ids)) or 'no model'}, not {self.served!r}; "
                              f"name the served model with ;served=NAME or start vLLM with "
                              f"--served-model-name {self.served}")
        limit = card.get("max_model_len")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 2:
            limit = 2**31  # not vLLM's card: the server's limit is unknown, it refuses what is too long
        got = self.request("POST", "/tokenize", "checking the tokenizer", missing_ok=True,
                            body={"model": self.served, "prompt": TOKENIZER_PROBE, "add_special_tokens": False})
        if got is None:
            return limit, False
        mine = codec.encode_segment(TOKENIZER_PROBE)
        if not isinstance(got, dict) or got.get("tokens") != mine:
            raise self.error(f"the server's tokenizer encodes {TOKENIZER_PROBE!r} as {got.get('tokens') if isinstance(got, dict) else got}, "
                              f"the local one in {folder} as {mine}; point MODEL at the served model's tokenizer")
        return limit, True

    def choices(self, got: Any, n: int, what: str) -> list[dict]:
        choices = got.get("choices") if isinstance(got, dict) else None
        if not isinstance(choices, list) or len(choices) != n or not all(isinstance(c, dict) for c in choices):
            count = len(choices) if isinstance(choices, list) else "no"
            raise self.error(f"{what}: {count} choices came back for {n} prompt{'s' if n > 1 else ''}")
        index = [c.get("index") for c in choices]
        if sorted(i for i in index if isinstance(i, int)) != list(range(n)):
            raise self.error(f"{what}: the choices' indexes are {index}, not 0..{n - 1}")
        return sorted(choices, key=lambda c: c["index"])

    def map(self, fn, items: list) -> list:
        """``fn`` over the items, concurrently (one HTTP call each); the first error raised after all ended."""
        if len(items) <= 1:
            return [fn(x) for x in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(MAX_CONCURRENT, thread_name_prefix="specem-vllm")
        futures = [self._pool.submit(fn, x) for x in items]
        errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._client.close()


class VLLMMember:
    """One model served by vLLM (see the module docstring for the calls)."""

    score_modes = ("logprob", "logprob_sum")  # vLLM's API gives log-probs, not raw logits

    def __init__(self, name: str, url: str, model: str, folder: Path, config: Any = None, *,
                 served: str | None = None, key_env: str | None = None, timeout: float | str | None = None,
                 retries: int | str | None = None, verify: str | None = None, client: Any = None):
        self.name = name
        self.url = url.rstrip("/")
        self.model, options = split_options(model)
        served = served or options.get("served") or self.model
        self.served = served
        self.folder = Path(folder)
        self.verify_mode = verify or options.get("verify", VERIFY_MODES[0])
        if self.verify_mode not in VERIFY_MODES:
            raise SpecEMError(f"vLLM member {name}: verify must be one of {', '.join(VERIFY_MODES)} "
                              f"(got {self.verify_mode!r})")
        self.endpoint = VLLMEndpoint(
            name, self.url, served,
            _number(timeout if timeout is not None else options.get("timeout", DEFAULT_TIMEOUT_S), "timeout", float, name),
            _number(retries if retries is not None else options.get("retries", DEFAULT_RETRIES), "retries", int, name),
            key_env or options.get("key_env"), client)
        self.codec = TextCodec(self.folder, generation_eos(self.folder))
        self.vocab_size = len(self.codec.tok)
        self._seqs: dict[int, _Seq] = {}
        self._lock = threading.Lock()  # _seqs: calls come from the crew's thread, close() from the engine's
        self.stats = self.endpoint.stats
        self.max_model_len, self.tokenizer_checked = self.endpoint.probe(self.codec, self.folder)
        cache_tokens = getattr(config, "cache_tokens", None)
        self.capacity = min(cache_tokens, self.max_model_len) if cache_tokens else self.max_model_len

    # -- the endpoint -----------------------------------------------------------------
    def describe(self) -> dict:
        return {"kind": "vllm", "url": self.url, "served_model": self.served, "tokenizer": str(self.folder),
                "max_model_len": self.max_model_len, "tokenizer_checked": self.tokenizer_checked,
                "verify": self.verify_mode,
                "scores": list(self.score_modes)}

    def shutdown(self) -> None:
        self.endpoint.close()

    # -- text -------------------------------------------------------------------------
    def prompt_ids(self, prompt, limit: int | None = None) -> list[int]:
        codec = self.codec
        return codec.prompt_ids(prompt, limit) if isinstance(prompt, str) else codec.chat_ids(prompt, limit)

    def encode(self, text: str) -> list[int]:
        return self.codec.encode_segment(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.codec.decode(list(ids))

    # -- requests ---------------------------------------------------------------------
    @property
    def requests(self) -> list[int]:
        with self._lock:
            return list(self._seqs)

    def open(self, calls: Sequence[OpenCall]) -> None:
        with self._lock:
            for c in calls:
                if c.request in self._seqs:
                    raise MemberStateError(f"{self.name} already holds request {c.request}")
            for c in calls:
                self._seqs[c.request] = _Seq(list(c.ids), c.temperature, c.top_p, c.seed)

    def close(self, requests: Sequence[int]) -> None:
        with self._lock:
            for r in requests:
                self._seqs.pop(r, None)

    def _seq(self, request: int, prefix: int) -> _Seq:
        with self._lock:
            s = self._seqs.get(request)
        check_held(self.name, request, s.ids if s is not None else None, prefix)
        return s

    # -- draft ------------------------------------------------------------------------
    def draft(self, calls: Sequence[DraftCall]) -> list[DraftOut]:
        seqs = [self._seq(c.request, c.prefix) for c in calls]
        for s in seqs:
            s.draft = None
        # one HTTP call per group of requests with the same sampling parameters (greedy
        # requests of one window share one call); the groups' calls run concurrently
        groups: dict[tuple, list[int]] = {}
        for i, (c, s) in enumerate(zip(calls, seqs)):
            groups.setdefault(self._draft_params(c, s), []).append(i)
        answers = self.endpoint.map(lambda item: self._draft_call(item[0], [seqs[i] for i in item[1]]),
                            list(groups.items()))
        tokens: list = [None] * len(calls)
        for (_, idx), got in zip(groups.items(), answers):
            for i, t in zip(idx, got):
                tokens[i] = t
        outs = [self._finish_draft(c, s, *t) for c, s, t in zip(calls, seqs, tokens)]
        for s, out in zip(seqs, outs):  # only now, every answer checked
            s.draft = out
        return outs

    def _draft_params(self, c: DraftCall, s: _Seq) -> tuple:
        body: dict[str, Any] = {"max_tokens": c.window}
        if s.temperature > 0:
            body["temperature"] = s.temperature
            body["top_p"] = s.top_p
            if s.seed is not None:  # per request and round: a retried call draws the same tokens
                body["seed"] = (s.seed * SEED_STRIDE + len(s.ids)) % 2**63
        else:
            body["temperature"] = 0.0
        if c.ignore_stop:
            body["ignore_eos"] = True
        else:
            body["stop_token_ids"] = sorted(self.codec.stop_ids)
        return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in body.items()))

    def _draft_call(self, params: tuple, seqs: list[_Seq]) -> list[tuple[list[int], bool]]:
        body = {k: list(v) if isinstance(v, tuple) else v for k, v in params}
        window = body["max_tokens"]
        prompts = [list(s.ids) for s in seqs]
        body.update(model=self.served, prompt=prompts if len(prompts) > 1 else prompts[0],
                    return_token_ids=True)
        got = self.endpoint.post("draft", "drafting", body, sum(map(len, prompts)))
        choices = self.endpoint.choices(got, len(prompts), "drafting")
        out = []
        for ch, sent in zip(choices, prompts):
            ids = self._ids(ch.get("token_ids"), "token_ids", "drafting (the server ignored return_token_ids: "
                            "is it vLLM 0.10.2 or newer?)")
            self._echo(ch, sent, "drafting")
            if len(ids) > window:
                raise self.endpoint.error(f"drafting: {len(ids)} tokens came back for max_tokens={window}")
            finish = ch.get("finish_reason")
            if finish not in ("stop", "length"):
                raise self.endpoint.error(f"drafting: finish_reason {finish!r} (expected 'stop' or 'length')")
            stopped = False
            if not body.get("ignore_eos"):
                if ids and ids[-1] in self.codec.stop_ids:
                    ids, stopped = ids[:-1], True
                elif finish == "stop" and len(ids) < window:
                    stopped = True  # a stop of the server's own (its generation config), not sent back
            out.append((ids, stopped))
        return out

    def _finish_draft(self, c: DraftCall, s: _Seq, tokens: list[int], stopped: bool) -> DraftOut:
        text, ids = self.codec.draft_segment(s.ids, tokens, stopped, exact=c.raw, alone=c.alone)
        return DraftOut(tuple(tokens), text, tuple(ids), stopped)

    # -- verify -----------------------------------------------------------------------
    def verify(self, calls: Sequence[VerifyCall]) -> list[VerifyOut]:
        seqs = [self._seq(c.request, c.prefix) for c in calls]
        plan = []  # per call: the candidates' ids, or None without room
        for c, s in zip(calls, seqs):
            cands = [list(s.draft.ids) if m == self.name and s.draft is not None and s.draft.text == text
                     else self.encode(text) for m, text in c.candidates]
            room = cache_room.fits(len(s.ids), max((len(x) for x in cands), default=0) + 1, self.capacity)
            plan.append(cands if room else None)
        prompts, where = [], []
        for s, cands in zip(seqs, plan):
            for ids in cands or []:
                where.append((len(s.ids), ids))
                prompts.append(s.ids + ids)
        means: list[float] = []
        if prompts:
            means = self._score(prompts, where) if self.verify_mode == "prompt_logprobs" else \
                self._score_cached([s_ids[:start] for s_ids, (start, _) in zip(prompts, where)], where)
        out, k = [], 0
        for cands in plan:
            if cands is None:
                out.append(VerifyOut(room=False))
                continue
            out.append(VerifyOut(tuple(means[k : k + len(cands)]), (), lengths=tuple(len(x) for x in cands)))
            k += len(cands)
        return out

    def _score(self, prompts: list[list[int]], where: list[tuple[int, list[int]]]) -> list[float]:
        body = {"model": self.served, "prompt": prompts if len(prompts) > 1 else prompts[0], "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": 0, "return_token_ids": True}
        got = self.endpoint.post("verify", "verifying", body, sum(map(len, prompts)))
        choices = self.endpoint.choices(got, len(prompts), "verifying")
        means = []
        for ch, sent, (start, ids) in zip(choices, prompts, where):
            self._echo(ch, sent, "verifying")
            lps = ch.get("prompt_logprobs")
            if not isinstance(lps, list):
                raise self.endpoint.error("verifying: the answer has no prompt_logprobs (the server ignored the field: "
                                  "is it vLLM?)")
            if len(lps) != len(sent):
                raise self.endpoint.error(f"verifying: {len(lps)} prompt log-probs for a prompt of {len(sent)} tokens")
            total = 0.0
            for pos, tid in enumerate(ids, start):
                entry = lps[pos]
                value = entry.get(str(tid)) if isinstance(entry, dict) else None
                lp = value.get("logprob") if isinstance(value, dict) else value
                if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp) or lp > 1e-3:
                    raise self.endpoint.error(f"verifying: no finite log-prob <= 0 for token {tid} at position {pos} "
                                      f"(got {str(entry)[:120]}); the answer does not match the prompt sent")
                total += float(lp)
            means.append(total / len(ids) if ids else float("-inf"))
        return means

    def _score_cached(self, seqs: list[list[int]], where: list[tuple[int, list[int]]]) -> list[float]:
        """verify='cached': each candidate token's log-prob from a one-token completion of the
        sequence plus the candidate's earlier tokens (reads the prefix cache)."""
        rows = [(i, seq + ids[:j], tid) for i, (seq, (_, ids)) in enumerate(zip(seqs, where))
                for j, tid in enumerate(ids)]
        chunks, wanted = [[]], set()  # each call asks for at most MAX_LOGPROB_TOKEN_IDS distinct tokens
        for row in rows:
            if row[2] not in wanted and len(wanted) == MAX_LOGPROB_TOKEN_IDS:
                chunks.append([])
                wanted = set()
            chunks[-1].append(row)
            wanted.add(row[2])
        t0 = time.perf_counter()
        got = self.endpoint.map(self._forced_call, [c for c in chunks if c])
        self.stats.calls["verify"] += 1
        self.stats.seconds["verify"] += time.perf_counter() - t0
        self.stats.prompt_tokens["verify"] += sum(len(p) for _, p, _ in rows)
        totals = [0.0] * len(seqs)
        for chunk, lps in zip(chunks, got):
            for (i, _, _), lp in zip(chunk, lps):
                totals[i] += lp
        return [t / len(ids) if ids else float("-inf") for t, (_, ids) in zip(totals, where)]

    def _forced_call(self, chunk: list[tuple[int, list[int], int]]) -> list[float]:
        prompts = [p for _, p, _ in chunk]
        body = {"model": self.served, "prompt": prompts if len(prompts) > 1 else prompts[0], "max_tokens": 1,
                "temperature": 0.0, "logprobs": 0, "logprob_token_ids": sorted({t for _, _, t in chunk}),
                "return_tokens_as_token_ids": True, "return_token_ids": True}
        got = self.endpoint.request("POST", "/v1/completions", "verifying", body)
        out = []
        for ch, (_, sent, tid) in zip(self.endpoint.choices(got, len(prompts), "verifying"), chunk):
            self._echo(ch, sent, "verifying")
            lp = ch.get("logprobs")
            top = lp.get("top_logprobs") if isinstance(lp, dict) else None
            if not isinstance(top, list) or not top or not isinstance(top[0], dict):
                raise self.endpoint.error("verifying: the answer has no logprobs (the server ignored logprobs or "
                                  "logprob_token_ids: verify=cached needs a vLLM that takes logprob_token_ids, "
                                  "0.32 does; or use verify=prompt_logprobs)")
            value = top[0].get(f"token_id:{tid}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value > 1e-3:
                raise self.endpoint.error(f"verifying: no finite log-prob <= 0 for token {tid} after {len(sent)} tokens "
                                  f"(got {str(top[0])[:120]}); the answer does not match the prompt sent")
            out.append(float(value))
        return out

    # -- answers ------------------------------------------------------------------------
    def _ids(self, value: Any, field_name: str, what: str) -> list[int]:
        if not isinstance(value, list):
            raise self.endpoint.error(f"{what}: the answer has no {field_name}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in value):
            raise self.endpoint.error(f"{what.split(' (')[0]}: {field_name} holds values that are not token ids of "
                              f"{self.folder} (vocabulary of {self.vocab_size}): {value[:20]}")
        return value

    def _echo(self, ch: dict, sent: list[int], what: str) -> None:
        """The prompt ids the server read must be the ids sent (return_token_ids echoes them)."""
        echoed = self._ids(ch.get("prompt_token_ids"), "prompt_token_ids",
                           f"{what} (the server ignored return_token_ids: is it vLLM 0.10.2 or newer?)")
        if echoed != sent:
            at = next((i for i, (a, b) in enumerate(zip(echoed, sent)) if a != b), min(len(echoed), len(sent)))
            raise self.endpoint.error(f"{what}: the server read other prompt ids than were sent ({len(echoed)} vs "
                              f"{len(sent)} tokens, first difference at {at})")

    # -- commit -----------------------------------------------------------------------
    def commit(self, calls: Sequence[CommitCall]) -> list[tuple[int, ...]]:
        seqs = [self._seq(c.request, c.prefix) for c in calls]
        appended = []
        for c, s in zip(calls, seqs):
            own = s.draft
            ids = list(own.ids) if own is not None and own.text == c.text else self.encode(c.text)
            s.ids += ids
            s.draft = None
            appended.append(tuple(ids))
        return appended


def _server_message(r: Any) -> str:
    try:
        got = r.json()
    except ValueError:
        return r.text[:300] or r.reason_phrase
    err = got.get("error") if isinstance(got, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])[:300]
    if isinstance(got, dict) and got.get("detail"):
        return str(got["detail"])[:300]
    return str(got)[:300]


def _number(value: Any, what: str, kind: type, name: str):
    """A timeout (seconds > 0) or a retry count (a whole number >= 0)."""
    try:
        x = kind(value)
        ok = math.isfinite(x) and x > 0 if kind is float else x >= 0 and str(value).strip().lstrip("+").isdigit()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        need = "a number of seconds > 0" if kind is float else "a whole number >= 0"
        raise SpecEMError(f"vLLM member {name}: {what} must be {need} (got {value!r})")
    return x
