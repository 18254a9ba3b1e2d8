"""Public API: build an ensemble once, generate many times."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .config import EngineConfig, GenerationSettings, check_text
from .engine import EngineCore, QueueFullError
from .errors import CacheFullError, SpecEMError
from .fetch import resolve_model
from .kv_cache import KVCacheManager
from .registry import DEFAULT_MODELS
from .results import GenerationResult, RoundRecord, SingleResult
from .runtime import ModelRunner, Run, available_memory, memory_needs, resolve_dtype
from .sampling import choose_tokens
from .scheduler import Scheduler
from .text import CHAT_ROLES, plain_chat
from .weights import WeightBook


@dataclass
class Segment:
    """Answer text released by :meth:`Ensemble.stream`, with the round that accepted it."""

    text: str
    model: str
    round: RoundRecord


@dataclass(eq=False)
class _Single:
    """A single-model request's decode state (``generate_single``); the engine loop
    advances it one token per round through :meth:`Ensemble._single_step`."""

    runner: ModelRunner
    ids: list[int]  # the templated prompt
    settings: GenerationSettings
    ignore_eos: bool
    t0: float  # when the call started: timings count from there, as the baseline always did
    gen: torch.Generator | None
    slot: int | None = None
    fed: bool = False  # prompt prefilled
    new: list[int] = field(default_factory=list)
    first_token_s: float = 0.0
    stop_reason: str | None = None

    @property
    def group(self) -> tuple:
        """Requests decoded in one forward: same member, same sampling."""
        return self.runner.name, self.settings.temperature, self.settings.top_p


class _Releaser:
    """Turn one request's events into streamable text that is never taken back.

    With stop strings, the last ``len(longest stop) - 1`` characters are held
    until the next round or the end: a stop string that straddles two segments
    cuts text the previous round had accepted. The segments' texts join to the
    final answer exactly; the GenerationResult comes last.
    """

    def __init__(self, stop: Sequence[str]):
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.answer, self.sent, self.last = "", 0, None

    def feed(self, ev: RoundRecord | GenerationResult) -> list[Segment | GenerationResult]:
        if isinstance(ev, RoundRecord):
            self.answer = self.answer[: ev.answer_chars - len(ev.accepted)] + ev.accepted
            self.last = ev
            end = max(self.sent, len(self.answer) - self.hold)
            seg = Segment(self.answer[self.sent:end], ev.winner_model, ev)
            self.sent = end
            return [seg]
        out: list[Segment | GenerationResult] = []
        if ev.text[self.sent:] and self.last is not None:
            out.append(Segment(ev.text[self.sent:], self.last.winner_model, self.last))
        return out + [ev]


def _release_segments(events: Iterator[tuple[int, RoundRecord | GenerationResult]], stop: Sequence[str]
                      ) -> Iterator[Segment | GenerationResult]:
    rel = _Releaser(stop)
    try:
        for _, ev in events:
            yield from rel.feed(ev)
    finally:
        events.close()  # an abandoned stream cancels its request: the slot comes back within a round


def _only_segments(events: Iterator[Segment | GenerationResult]) -> Iterator[Segment]:
    try:
        for ev in events:
            if isinstance(ev, Segment):
                yield ev
    finally:
        events.close()


def _prompt_list(prompts: object) -> list[str]:
    """The prompts as a list of valid strings; anything else is a SpecEMError."""
    if isinstance(prompts, str):
        plist = [prompts]
    elif isinstance(prompts, (list, tuple)):
        plist = list(prompts)
    else:
        kind = type(prompts).__name__
        hint = "decode it to str first" if isinstance(prompts, (bytes, bytearray)) else \
            "give one prompt string or a list of prompt strings"
        raise SpecEMError(f"the prompt must be a string or a list of strings, not {kind}; {hint}")
    for i, p in enumerate(plist):
        what = "the prompt" if isinstance(prompts, str) else f"prompt {i}"
        if not isinstance(p, str):
            raise SpecEMError(f"{what} is {type(p).__name__}, not a string; give text")
        check_text(p, what)
        if not p.strip():
            raise SpecEMError(f"{'the prompt' if isinstance(prompts, str) else what} is empty; give some text to answer")
    return plist


class Chat(tuple):
    """One conversation: ``(role, content)`` pairs, checked."""

    @property
    def text(self) -> str:
        return plain_chat(self)


def _chat(messages: object, what: str) -> Chat:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise SpecEMError(f"{what} must be a non-empty list of {{'role', 'content'}} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise SpecEMError(f"{what}[{i}] must be a dict with 'role' and 'content' (got {m!r:.80})")
        role, content = m["role"], m["content"]
        if role not in CHAT_ROLES:
            raise SpecEMError(f"{what}[{i}] has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise SpecEMError(f"{what}[{i}]'s content is {type(content).__name__}, not a string; give text")
        check_text(content, f"{what}[{i}]'s content")
        out.append((role, content))
    if not any(c.strip() for r, c in out if r == "user"):
        raise SpecEMError(f"{what} has no user message with text; give at least one")
    return Chat(out)


def _inputs(prompts: object, messages: object) -> tuple[list, bool]:
    """(prompt strings or Chats, whether one was given rather than a list)."""
    if messages is None:
        if prompts is None:
            raise SpecEMError("the prompt must be a string or a list of strings, not NoneType; give a prompt "
                              "or messages=[{'role': ..., 'content': ...}, ...]")
        return _prompt_list(prompts), isinstance(prompts, str)
    if prompts is not None:
        raise SpecEMError("give either a prompt or messages, not both")
    if isinstance(messages, (list, tuple)) and messages and all(isinstance(m, (list, tuple)) for m in messages):
        return [_chat(m, f"messages[{i}]") for i, m in enumerate(messages)], False
    return [_chat(messages, "messages")], True


# warmup(): a short chat turn, long enough for a verify pass and a second round
WARMUP_PROMPT = "Name three primary colours and say which two make green."
WARMUP_TOKENS = 24


class Ensemble:
    """Several causal LMs that write one answer together (SpecEM rounds).

    ``drafters`` propose the next segment each round; ``verifiers`` (default:
    the drafters) score every candidate in one packed forward. Models are
    registry names (``specem-fast models list``) or local Hugging Face folders.
    """

    def __init__(self, runners: dict[str, ModelRunner], drafters: list[str], verifiers: list[str], config: EngineConfig,
                 max_waiting: int = 256):
        self.config = config
        self.runners = runners
        self.drafters = drafters
        self.verifiers = verifiers
        self.cache = KVCacheManager([r.cache_shape for r in runners.values()], config.max_batch, config.cache_tokens)
        for r in runners.values():
            r.cache = self.cache[r.name]
        self.scheduler = Scheduler(runners, drafters, verifiers, self.cache, config.parallel)
        self.weights = WeightBook(verifiers)
        self._lock = threading.Condition(threading.RLock())
        # slot -> (thread id, owner): a slot is taken and given back only through
        # _acquire/_release, under the lock, by the call (owner) that holds it
        self._holders: dict[int, tuple[int, object]] = {}
        # the request lifecycle: waiting queue, admission, rounds over every caller's requests
        self.engine = EngineCore(self, max_waiting)

    @classmethod
    def from_pretrained(
        cls,
        models: Sequence[str] | str | None = None,
        verifiers: Sequence[str] | str | None = None,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        cache_tokens: int = 4096,
        max_batch: int = 8,
        kernels: str = "auto",
        flash_attn: str = "auto",
        devices: Sequence[str] = (),
        dtypes: Sequence[str | None] = (),
        progress: bool = False,
        weights: str | None = None,
        max_waiting: int = 256,
        compile: bool = False,
        parallel: str = "auto",
        warmup: bool = False,
    ) -> "Ensemble":
        drafters = _name_list(models, "models") if models is not None else [m.name for m in DEFAULT_MODELS]
        verifiers_ = _name_list(verifiers, "verifiers") if verifiers is not None else list(drafters)
        for what, per_model in (("devices", devices), ("dtypes", dtypes)):
            if per_model and len(per_model) != len(drafters):
                raise SpecEMError(f"{what} lists {len(per_model)} entries for {len(drafters)} models; give one per model")
        config = EngineConfig(device=device, dtype=dtype, cache_tokens=cache_tokens, max_batch=max_batch,
                              kernels=kernels, flash_attn=flash_attn, devices=tuple(devices), dtypes=tuple(dtypes),
                              compile=compile, parallel=parallel)
        # every name checked before loading; one model under two spellings (a registry
        # name and its folder, ./x and x/) is one model
        folders = {spec: resolve_model(spec) for spec in dict.fromkeys(drafters + verifiers_)}
        drafters = _distinct(drafters, folders, "models")
        verifiers_ = _distinct(verifiers_, folders, "verifiers")
        same = {folders[d].resolve(): d for d in drafters}
        verifiers_ = [same.get(folders[v].resolve(), v) for v in verifiers_]
        all_names = drafters + [v for v in verifiers_ if v not in drafters]
        placement = dict(zip(drafters, devices)) if devices else {}
        precision = dict(zip(drafters, dtypes)) if dtypes else {}
        _check_memory({n: (folders[n], placement.get(n, device), precision.get(n, dtype)) for n in all_names}, config)
        runners = {}
        for spec in tqdm(all_names, desc="loading models", unit="model", disable=not progress, leave=False):
            folder = folders[spec]
            runners[spec] = ModelRunner(spec, folder, placement.get(spec, device), precision.get(spec, dtype), kernels,
                                        flash_attn, compile)
        ens = cls(runners, drafters, verifiers_, config, max_waiting)
        if weights is not None:
            ens.load_weights(weights)
        if warmup:
            ens.warmup()
        return ens

    def warmup(self) -> float:
        """Run one short greedy generation and forget it, so that the first real
        call runs at warm speed (what it pays for alone is in benchmarks/RESULTS.md,
        "First call"). Returns its seconds. Learned weights, engine statistics
        and cost counters are left as they were."""
        t0 = time.perf_counter()
        stats = dict(self.engine.stats)
        fed = {n: (r.tokens_fed, r.tokens_refed) for n, r in self.runners.items()}
        self.generate(WARMUP_PROMPT, max_new_tokens=WARMUP_TOKENS, temperature=0.0)
        self.engine.stats.update(stats)
        for n, r in self.runners.items():
            r.tokens_fed, r.tokens_refed = fed[n]
        return time.perf_counter() - t0

    @property
    def model_names(self) -> list[str]:
        return list(self.drafters)

    @property
    def metadata(self) -> dict:
        return {
            "drafters": self.drafters,
            "verifiers": self.verifiers,
            "kernels": {n: r.kernel_path for n, r in self.runners.items()},
            "devices": {n: str(r.device) for n, r in self.runners.items()},
            "dtypes": {n: str(r.dtype).replace("torch.", "") for n, r in self.runners.items()},
            "cache_tokens": self.config.cache_tokens,
            "compile": self.config.compile,
            "parallel": [list(g) for g in self.scheduler.pool.groups] if self.scheduler.pool.concurrent else None,
        }

    # -- weights across requests ---------------------------------------------------
    def set_prior_weights(self, weights: dict[str, float] | None) -> None:
        """Prior weights per verifier (normalised), used by ``init_weights="prior"``
        and as the start of the running estimate; None clears them."""
        with self._lock:
            self.weights.set_prior(weights)

    def load_weights(self, path: str) -> None:
        """Load prior and learned weights from a JSON file (``save_weights``, ``calibrate``)."""
        with self._lock:
            self.weights.load(path)

    def save_weights(self, path: str) -> None:
        """Write the prior and the weights learned so far, so a deployment warms up once."""
        with self._lock:
            self.weights.save(path)

    # -- ensemble generation -------------------------------------------------------
    def generate(self, prompts: str | Sequence[str] | None = None,
                 settings: GenerationSettings | Sequence[GenerationSettings] | None = None, *,
                 messages: Sequence[dict] | Sequence[Sequence[dict]] | None = None,
                 **overrides) -> GenerationResult | list[GenerationResult]:
        """Generate an answer for one prompt (returns one result) or a list.

        ``messages``: a chat (``[{"role": "system"|"user"|"assistant", "content": ...}]``)
        instead of a prompt, or a list of chats. ``settings``: one
        :class:`GenerationSettings` for all prompts or one per prompt; keyword
        overrides apply on top. The requests join the engine's running batch
        (with every other caller's) and leave it when they finish.
        """
        items, single = _inputs(prompts, messages)
        results = [None] * len(items)
        for i, res in self.events(items, self._settings_for(items, settings, overrides)):
            if isinstance(res, GenerationResult):
                results[i] = res
        return results[0] if single else results

    @staticmethod
    def _settings_for(prompts, settings, overrides: dict) -> list[GenerationSettings]:
        n = 1 if isinstance(prompts, (str, Chat)) else len(prompts)
        if settings is None or isinstance(settings, GenerationSettings):
            base = [settings or GenerationSettings()] * n
        else:
            base = list(settings)
            if len(base) != n or not all(isinstance(x, GenerationSettings) for x in base):
                raise SpecEMError(f"settings must be one GenerationSettings or a list of one per prompt ({n})")
        if not overrides:
            return base
        return [b.with_overrides(**overrides) for b in base]

    def stream(self, prompt: str | None = None, **settings) -> Iterator[Segment]:
        """Yield the answer's text round by round; the texts join to the final answer.

        One segment per round (its text may be empty while a possible stop
        string is held back), plus a last one for held-back text. The prompt
        (or ``messages=``) and the settings are checked when this is called;
        the request is submitted when the first segment is asked for, and a
        consumer that stops reading (close, garbage collection) cancels it.
        """
        return _only_segments(self.stream_with_result(prompt, **settings))

    def stream_with_result(self, prompt: str | None = None, **settings) -> Iterator[Segment | GenerationResult]:
        """:meth:`stream`, then the GenerationResult as the last item."""
        messages = settings.pop("messages", None)
        if messages is None and not isinstance(prompt, str):
            if isinstance(prompt, (list, tuple)):
                raise SpecEMError("stream() takes one prompt string; use generate() for a list")
            _prompt_list(prompt)  # names what it is
        items, single = _inputs(prompt, messages)
        if not single:
            raise SpecEMError("stream() takes one conversation; use generate() for a list")
        st = self._settings_for(items[0], settings.pop("settings", None), settings)
        return _release_segments(self.events(items, st), st[0].stop)

    def events(self, prompts: str | Sequence[str], settings: Sequence[GenerationSettings]
               ) -> Iterator[tuple[int, RoundRecord | GenerationResult]]:
        """Run the prompts through the engine; yields (prompt index, RoundRecord) per
        accepted segment and (prompt index, GenerationResult) when a request finishes.

        Prompts and settings are checked (and the prompts tokenized) when this
        is called; the requests are submitted when the result is iterated.
        Stopping early or an error cancels the call's unfinished requests (their
        slots are free when the iterator is closed).
        """
        return self._drive(self._prepare_all(prompts, settings))

    def _prepare_all(self, prompts, settings) -> list:
        prompts = prompts if isinstance(prompts, list) and all(isinstance(p, Chat) for p in prompts) and prompts \
            else _prompt_list(prompts)
        if not prompts:
            raise SpecEMError("no prompts given")
        settings = list(settings)
        if len(settings) != len(prompts):
            raise SpecEMError(f"{len(settings)} settings for {len(prompts)} prompts; give one per prompt")
        prepared = [self._prepare(p, st) + (st,) for p, st in zip(prompts, settings)]
        for st in settings:
            self.weights.initial(st.init_weights)  # a missing prior is an error before anything is queued
        return prepared

    def _submit_each(self, items: list, sink_for) -> list:
        """Submit ensemble requests one by one; as many as the waiting queue takes."""
        handles = []
        for i, (p, ids, st) in items:
            try:
                h, _ = self.engine.submit(p, ids, st, sink=sink_for(i))
            except QueueFullError:
                if handles:
                    break
                raise
            handles.append(h)
        return handles

    def _drive(self, prepared: list, submit=None) -> Iterator[tuple[int, RoundRecord | GenerationResult]]:
        # The engine owns the slots; this call owns its requests and cancels the
        # unfinished ones on any exit (an error, or the consumer stopping).
        # ``submit(items, sink_for) -> handles`` queues a prefix of the pending items.
        submit = submit or self._submit_each
        events: queue.Queue = queue.Queue()
        pending = deque(enumerate(prepared))
        live = {}
        try:
            while pending or live:
                if pending:
                    try:
                        handles = submit(list(pending), lambda i: (lambda ev: events.put((i, ev))))
                    except QueueFullError:
                        if not live:
                            raise
                        handles = []  # a long list: the rest goes in as its first requests finish
                    for h in handles:
                        live[pending.popleft()[0]] = h
                i, ev = events.get()
                if isinstance(ev, BaseException):
                    raise ev
                if not isinstance(ev, RoundRecord):  # the request's last event
                    del live[i]
                yield i, ev
        finally:
            for h in live.values():
                self.engine.cancel(h.id)
            for h in live.values():
                if threading.current_thread() is not self.engine._thread:
                    h.done.wait()

    def cancel(self, request_id: int) -> None:
        """Cancel an engine request by id (see :meth:`submit`); its slot is free within one round."""
        self.engine.cancel(request_id)

    def submit(self, prompt: str | None = None, *, messages=None, settings: GenerationSettings | None = None,
               sink=None, **overrides):
        """Queue one request without waiting (the building block of the fronts).

        Returns ``(handle, events)``: ``handle.id`` for :meth:`cancel`, and, when
        no ``sink`` callable is given, a ``queue.Queue`` that receives a
        RoundRecord per round, then the GenerationResult or an exception.
        Raises :class:`QueueFullError` when ``max_waiting`` requests wait.
        """
        items, single = _inputs(prompt, messages)
        if not single:
            raise SpecEMError("submit() takes one prompt or one conversation")
        st = self._settings_for(items[0], settings, overrides)
        (p, ids, st0), = self._prepare_all(items, st)
        return self.engine.submit(p, ids, st0, sink)

    def close(self) -> None:
        """Cancel what runs or waits and stop the engine thread (and the member workers)."""
        self.engine.close()
        self.scheduler.pool.close()

    def _acquire(self, owner: object) -> int:
        """Take a free slot for ``owner`` (call with the lock held)."""
        slot = self.cache.allocate()
        self._holders[slot] = (threading.get_ident(), owner)
        return slot

    def _release(self, slot: int, owner: object) -> None:
        """Give ``slot`` back if ``owner`` holds it (call with the lock held); idempotent."""
        held = self._holders.get(slot)
        if held is None or held[1] is not owner:
            return
        del self._holders[slot]
        try:
            self.cache.free(slot)
        finally:
            self._lock.notify_all()

    def _prepare(self, prompt: str | Chat, st: GenerationSettings, names: Sequence[str] | None = None
                 ) -> tuple[str, dict[str, list[int]]]:
        if isinstance(prompt, Chat):
            ids = {n: self.runners[n].codec.chat_ids(prompt) for n in (names or self.runners)}
            prompt = prompt.text  # what the results report as the prompt
        else:
            _prompt_list(prompt)
            ids = {n: self.runners[n].codec.prompt_ids(prompt) for n in (names or self.runners)}
        # Room for the prompt plus one round's packed candidates must exist up front.
        need_scratch = len(self.drafters) * (st.window + 4)
        for n, p in ids.items():
            if len(p) + need_scratch > self.config.cache_tokens:
                raise CacheFullError(
                    f"the prompt is {len(p)} tokens for {n}, too long for the KV-cache budget of "
                    f"{self.config.cache_tokens} tokens per request (a round needs {need_scratch} more); "
                    "shorten the prompt or raise cache_tokens (--cache-tokens)"
                )
        return prompt, ids

    def count_tokens(self, text: str, model: str | None = None, as_prompt: bool = True) -> int:
        """Length of ``text`` in ``model``'s tokens, as a templated prompt or a plain
        segment; with no model, the most over the members (what the cache must hold)."""
        names = [model] if model else list(self.runners)
        counts = []
        for n in names:
            codec = self.runners[n].codec
            counts.append(len(codec.prompt_ids(text) if as_prompt else codec.encode_segment(text)))
        return max(counts)

    # -- one model alone (the baseline) --------------------------------------------
    def generate_single(
        self,
        model: str,
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] = 0,
        ignore_eos: bool = False,
    ) -> SingleResult | list[SingleResult]:
        """Plain autoregressive decoding with one member (same template, same runtime).

        ``seed`` may be a list with one seed per prompt. The prompts are requests of
        the engine loop like any other (one token per round, batched with the other
        single-model requests of this member and sampling setting), so they share
        the slots, the waiting queue and cancellation with ensemble requests.
        """
        if model not in self.runners:
            raise SpecEMError(f"{model!r} is not part of this ensemble ({', '.join(self.runners)})")
        single = isinstance(prompts, str)
        plist = _prompt_list(prompts)
        if not plist:
            raise SpecEMError("no prompts given")
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(plist)
        if len(seeds) != len(plist):
            raise SpecEMError(f"seed lists {len(seeds)} seeds for {len(plist)} prompts; give one per prompt")
        sts = [GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=s)
               for s in seeds]
        runner = self.runners[model]
        t0 = time.perf_counter()
        prepared = [self._prepare(p, st, [model]) + (st,) for p, st in zip(plist, sts)]  # refused before queueing

        def submit(items: list, sink_for) -> list:
            # one call's prompts are queued together, so free slots take them into one prefill
            return self.engine.submit_many([
                (p, ids, st, sink_for(i),
                 _Single(runner, ids[model], st, ignore_eos, t0,
                         None if st.greedy else torch.Generator().manual_seed(st.seed)))
                for i, (p, ids, st) in items])

        out: list = [None] * len(plist)
        for i, res in self._drive(prepared, submit):
            out[i] = res
        return out[0] if single else out

    @torch.inference_mode()
    def _single_step(self, states: list[_Single]) -> None:
        """One token for single-model requests of one member and one sampling setting
        (called by the engine loop, lock held): new requests are prefilled in one
        forward, the others fed their last token in another, then each forward's rows
        choose their next tokens. A request that ends gets its ``stop_reason``."""
        runner, st = states[0].runner, states[0].settings
        chunks = []
        fresh = [s for s in states if not s.fed]
        if fresh:
            h = runner.forward([Run(s.slot, s.ids, 0, 0, 0) for s in fresh])
            ends = torch.tensor([len(s.ids) for s in fresh]).cumsum(0) - 1
            for s in fresh:
                runner.cache.append(s.slot, len(s.ids))
                s.fed = True
            chunks.append((fresh, h[ends]))
        going = [s for s in states if s not in fresh]
        if going:
            pos = [runner.cache.append(s.slot, 1) for s in going]
            chunks.append((going, runner.forward([Run(s.slot, [s.new[-1]], p, p, p) for s, p in zip(going, pos)])))
        for group, last in chunks:
            toks = choose_tokens(runner.logits(last), st.temperature, st.top_p, [s.gen for s in group])
            for s, tok in zip(group, toks):
                if not s.new:
                    s.first_token_s = time.perf_counter() - s.t0
                if tok in runner.codec.stop_ids and not s.ignore_eos:
                    s.stop_reason = "stop"
                    continue
                s.new.append(tok)
                if len(s.new) >= s.settings.max_new_tokens:
                    s.stop_reason = "length"
                elif len(s.ids) + len(s.new) > runner.cache.capacity:
                    s.stop_reason = "cache_full"  # this token has no cache room to be fed: end here

    def _single_result(self, prompt: str, s: _Single) -> SingleResult:
        return SingleResult(s.runner.name, prompt, s.runner.codec.decode(s.new), len(s.new), s.stop_reason,
                            time.perf_counter() - s.t0, s.first_token_s, len(s.ids))


def _name_list(value: Sequence[str] | str, what: str) -> list[str]:
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    if not names or any(not n for n in names):
        raise SpecEMError(f"the {what} list is empty or has an empty entry; name at least one model")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecEMError(f"the {what} list names {', '.join(dup)} more than once; list each model once")
    return names


def _distinct(names: list[str], folders: dict, what: str) -> list[str]:
    """Refuse one model listed under two spellings (same folder once symlinks and
    relative parts are resolved): it would be loaded twice and vote twice."""
    seen: dict = {}
    for n in names:
        real = folders[n].resolve()
        if real in seen:
            raise SpecEMError(
                f"the {what} list names one model twice: {seen[real]!r} and {n!r} are both {str(real)!r}; "
                "list each model once"
            )
        seen[real] = n
    return names


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _check_memory(models: dict[str, tuple], config: EngineConfig) -> None:
    """Refuse cache_tokens x max_batch whose KV cache (plus the weights) cannot fit on
    its device, before any weights load; the message says what fits.

    ``models``: name -> (folder, device, dtype setting). The KV cache is
    ``2 * layers * kv_heads * head_dim * dtype size`` bytes per token and slot.
    """
    per_device: dict = {}
    for name, (folder, dev, dt) in models.items():
        d = torch.device(dev)
        if d.type == "cuda" and d.index is None and torch.cuda.is_available():
            d = torch.device("cuda", torch.cuda.current_device())
        kv, weights = memory_needs(folder, resolve_dtype(d, dt))
        per_device.setdefault(d, []).append((name, kv, weights))
    slots, tokens = config.max_batch, config.cache_tokens
    for dev, rows in per_device.items():
        avail = available_memory(dev)
        if avail is None:
            continue
        per_token = sum(kv for _, kv, _ in rows)  # bytes per cache token and slot, all models on dev
        weights = sum(w for _, _, w in rows)
        need = per_token * tokens * slots
        if need + weights <= avail:
            continue
        each = ", ".join(f"{n}: {_gib(kv * tokens * slots)}" for n, kv, _ in rows)
        room = avail - weights
        if room < per_token * 16 * slots and room < per_token * tokens:
            fits = "the weights alone nearly fill it; use fewer or smaller models, a smaller dtype or another device"
        else:
            fit_tokens = room // (per_token * slots)
            fit_slots = room // (per_token * tokens)
            options = []
            if fit_tokens >= 16:
                options.append(f"cache_tokens={fit_tokens} with max_batch={slots}")
            if fit_slots >= 1:
                options.append(f"max_batch={fit_slots} with cache_tokens={tokens}")
            fits = "at most " + " or ".join(options) + " fits; lower --cache-tokens or max_batch (--batch)"
        raise SpecEMError(
            f"cache_tokens={tokens} x max_batch={slots} needs {_gib(need)} of KV cache on {dev} ({each}) "
            f"plus {_gib(weights)} of weights, but only {_gib(avail)} is available; {fits}"
        )
