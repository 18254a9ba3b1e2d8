"""Public API: build an ensemble once, generate many times.

:class:`Ensemble` is a thin synchronous front: it checks the input once,
prepares each member's prompt ids, submits requests to the engine loop
(:class:`~specem_fast.engine.core.EngineCore`, which owns their life) and collects
their events.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

from specem_fast.model.backends import check_engine
from specem_fast.rounds.single import Baseline
from specem_fast.config import PRESET_CHOICES, EngineConfig, GenerationSettings
from specem_fast.engine.core import EngineCore, Job
from specem_fast.errors import CacheFullError, SpecEMError
from specem_fast.api.inputs import Chat, parse_inputs, prompt_list
from specem_fast.model import room
from specem_fast.model.kv_cache import KVCacheManager
from specem_fast.members.loading import load_members
from specem_fast.members.crew import MemberCrew
from specem_fast.members.local.member import LocalMember
from specem_fast.members.interface import Member
from specem_fast.api.streaming import Segment, only_segments, release_segments
from specem_fast.results import GenerationResult, SingleResult
from specem_fast.model.runner import ModelRunner
from specem_fast.rounds.executor import RoundExecutor
from specem_fast.rounds.profiles import Profile, Profiles
from specem_fast.rounds.weights import WeightBook, shipped_weights

__all__ = ["Ensemble", "Segment"]

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
                 max_waiting: int = 256, remote: dict[str, Member] | None = None):
        """``runners``: the members in this process; ``remote``: members in other processes
        or servers (Ray actors, vLLM endpoints), each holding its own cache."""
        self.config = config
        self.runners = runners
        self.drafters = drafters
        self.verifiers = verifiers
        # the engine's slots; the local members' K/V (a remote member keeps its own)
        self.cache = KVCacheManager([r.cache_shape for r in runners.values()], config.max_batch, config.cache_tokens)
        for r in runners.values():
            r.cache = self.cache[r.name]
            r.build_compiled_step()  # compile=True: the draft step over this cache
        remote = remote or {}
        order = list(dict.fromkeys(drafters + verifiers))
        self.members: dict[str, Member] = {n: remote[n] if n in remote else LocalMember(runners[n], config.batch_invariant)
                                           for n in order}
        self.crew = MemberCrew(self.members, config.parallel)
        self.executor = RoundExecutor(self.crew, drafters, verifiers)
        self.weights = WeightBook(verifiers)
        # the default profile (weights, preset) and any named others sharing these members
        self.profile = Profile("default", self.weights)
        self.profiles = Profiles(self.profile)
        # the request lifecycle: waiting queue, admission, slots, rounds over every caller's requests
        self.engine = EngineCore(self.executor, Baseline(self.crew), self.cache, max_waiting=max_waiting)

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
        placement: str = "local",
        ray_address: str | None = None,
        backend: str | Sequence[str] | dict | None = "auto",
        weights: str | None = None,
        max_waiting: int = 256,
        compile: bool = False,
        parallel: str = "auto",
        warmup: bool = False,
        preset: str = "auto",
        batch_invariant: bool = False,
    ) -> "Ensemble":
        """``preset``: the settings a request runs with by default (every option still
        overrides): "auto" is "recommended" when the ensemble has prior weights (``weights``,
        or the calibration shipped for the default members) and "reference" (the paper's
        method) otherwise; see :meth:`use_preset`. ``batch_invariant``: each request's forwards
        run as a batch of one in every member, so its greedy answer does not depend on the
        requests it runs with, in any dtype (slower under load: docs/limits.md)."""
        if preset not in PRESET_CHOICES:
            raise SpecEMError(f"preset must be one of {', '.join(PRESET_CHOICES)} (got {preset!r})")
        config = EngineConfig(device=device, dtype=dtype, cache_tokens=cache_tokens, max_batch=max_batch,
                              kernels=kernels, flash_attn=flash_attn, devices=tuple(devices), dtypes=tuple(dtypes),
                              compile=compile, parallel=parallel, batch_invariant=batch_invariant)
        check_engine(config)
        runners, remote, drafters, verifiers_ = load_members(models, verifiers, config, progress, placement,
                                                             ray_address, backend)
        ens = cls(runners, drafters, verifiers_, config, max_waiting, remote)
        if weights is not None:
            ens.load_weights(weights)
        elif preset != "reference" and (shipped := shipped_weights(ens.verifiers)) is not None:
            ens.profile.load(shipped, f"shipped: {shipped.name} (calibrated on GSM8K items 300-399)")
        ens.use_preset(preset)
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
        return self._describe()

    def _describe(self) -> dict:
        pool = self.crew.pool
        return {
            "drafters": self.drafters,
            "verifiers": self.verifiers,
            "kernels": {n: r.kernel_path for n, r in self.runners.items()},
            "devices": {n: str(r.device) for n, r in self.runners.items()},
            "dtypes": {n: str(r.dtype).replace("torch.", "") for n, r in self.runners.items()},
            "remote": {n: m.describe() for n, m in self.members.items() if n not in self.runners},
            # native runtime, transformers backend, or where the member runs (ray, vllm)
            "backends": {n: "native" if n in self.runners else m.describe().get("backend", m.describe().get("kind"))
                         for n, m in self.members.items()},
            "cache_tokens": self.config.cache_tokens,
            "compile": self.config.compile,
            "parallel": [list(g) for g in pool.groups] if pool.concurrent else None,
            "batch_invariant": self.config.batch_invariant,
        }

    @property
    def preset(self) -> str:  # the default profile's
        return self.profile.preset

    @property
    def defaults(self) -> GenerationSettings:  # what a request gives none runs with (default profile)
        return self.profile.defaults

    def use_preset(self, preset: str) -> None:
        """Make ``preset`` the default profile's settings (see :meth:`Profile.use_preset`)."""
        self.profile.use_preset(preset)

    def add_profile(self, name: str, weights: str | None = None, preset: str = "auto") -> Profile:
        """Another way to run these members, chosen per request (``profile=name``), with its
        own weights (a ``calibrate`` file, e.g. one per task) and default settings."""
        return self.profiles.add(name, WeightBook(self.verifiers), weights, preset)

    # -- weights across requests ---------------------------------------------------
    def set_prior_weights(self, weights: dict[str, float] | None) -> None:
        """Prior weights per verifier (normalised), used by ``init_weights="prior"``
        and as the start of the running estimate; None clears them."""
        self.weights.set_prior(weights)

    def load_weights(self, path: str) -> None:
        """Load prior and learned weights from a JSON file (``save_weights``, ``calibrate``)."""
        self.profile.load(path)

    def save_weights(self, path: str) -> None:
        """Write the prior and the weights learned so far, so a deployment warms up once."""
        self.weights.save(path)

    # -- ensemble generation -------------------------------------------------------
    def generate(self, prompts: str | Sequence[str] | None = None,
                 settings: GenerationSettings | Sequence[GenerationSettings] | None = None, *,
                 messages: Sequence[dict] | Sequence[Sequence[dict]] | None = None, profile: str | None = None,
                 **overrides) -> GenerationResult | list[GenerationResult]:
        """Generate an answer for one prompt (returns one result) or a list.

        ``messages``: a chat (``[{"role": "system"|"user"|"assistant", "content": ...}]``)
        instead of a prompt, or a list of chats. ``settings``: one
        :class:`GenerationSettings` for all prompts or one per prompt; keyword
        overrides apply on top of the profile's defaults (``profile``: a name given to
        :meth:`add_profile`; default: the ensemble's own). The requests join the
        engine's running batch (with every other caller's) and leave it when they finish.
        """
        items, single = parse_inputs(prompts, messages)
        prof = self.profiles.get(profile)
        results = [None] * len(items)
        sts = _settings_for(len(items), settings, overrides, prof.defaults)
        for i, res in self.engine.run(self._jobs(items, sts, prof)):
            if isinstance(res, GenerationResult):
                results[i] = res
        return results[0] if single else results

    def stream(self, prompt: str | None = None, **settings) -> Iterator[Segment]:
        """Yield the answer's text round by round; the texts join to the final answer.

        One segment per round (empty while a possible stop string is held back),
        plus a last one for held-back text. Input and settings are checked now; the
        request is submitted at the first segment asked for, and a consumer that
        stops reading (close, garbage collection) cancels it.
        """
        return only_segments(self.stream_with_result(prompt, **settings))

    def stream_with_result(self, prompt: str | None = None, **settings) -> Iterator[Segment | GenerationResult]:
        """:meth:`stream`, then the GenerationResult as the last item."""
        if settings.get("messages") is None and isinstance(prompt, (list, tuple)):
            raise SpecEMError("stream() takes one prompt string; use generate() for a list")
        job = self.prepare(prompt, messages=settings.pop("messages", None), settings=settings.pop("settings", None),
                           profile=settings.pop("profile", None), what="stream", **settings)
        return release_segments(self.engine.run([job]), job.settings.stop)

    def submit(self, prompt: str | None = None, *, messages=None, settings: GenerationSettings | None = None,
               sink=None, profile: str | None = None, **overrides):
        """Queue one request without waiting (the building block of the fronts).

        Returns ``(handle, events)``: ``handle.id`` for :meth:`cancel`, and, when
        no ``sink`` callable is given, a ``queue.Queue`` that receives a
        RoundRecord per round, then the GenerationResult or an exception.
        Raises :class:`QueueFullError` when every slot is busy and ``max_waiting``
        requests already wait for one (a free slot always takes the request).
        """
        return self.engine.submit(self.prepare(prompt, messages=messages, settings=settings, profile=profile,
                                               **overrides), sink)

    def prepare(self, prompt: str | None = None, *, messages=None, settings: GenerationSettings | None = None,
                profile: str | None = None, what: str = "submit", **overrides) -> Job:
        """One request checked and tokenized for every member, ready for ``engine.submit``
        (so the work of preparing can happen off the thread that submits)."""
        items, single = parse_inputs(prompt, messages)
        if not single:
            raise SpecEMError(f"{what}() takes one prompt or one conversation; use generate() for a list")
        prof = self.profiles.get(profile)
        return self._jobs(items, _settings_for(1, settings, overrides, prof.defaults), prof)[0]

    def cancel(self, request_id: int) -> None:
        """Cancel an engine request by id (see :meth:`submit`); its slot is free within one round."""
        self.engine.cancel(request_id)

    def close(self) -> None:
        """Cancel what runs or waits and stop the engine thread (and the member workers)."""
        self.engine.close()
        self.crew.shutdown()

    def count_tokens(self, text: str, model: str | None = None, as_prompt: bool = True) -> int:
        """Length of ``text`` in ``model``'s tokens, as a templated prompt or a plain
        segment; with no model, the most over the members (what the cache must hold)."""
        names = [model] if model else list(self.members)
        return max(len(self.members[n].prompt_ids(text) if as_prompt else self.members[n].encode(text))
                   for n in names)

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
        single-model requests of this member), so they share the slots, the
        waiting queue and cancellation with ensemble requests.
        """
        if model not in self.members:
            raise SpecEMError(f"{model!r} is not part of this ensemble ({', '.join(self.members)})")
        plist = prompt_list(prompts)
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(plist)
        if len(seeds) != len(plist):
            raise SpecEMError(f"seed lists {len(seeds)} seeds for {len(plist)} prompts; give one per prompt")
        sts = [GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=s)
               for s in seeds]
        t0 = time.perf_counter()
        jobs = [Job(p, self._prompt_ids(p, st, [model]), st, single=model, ignore_eos=ignore_eos, t0=t0)
                for p, st in zip(plist, sts)]  # refused before queueing
        out: list = [None] * len(plist)
        for i, res in self.engine.run(jobs):
            out[i] = res
        return out[0] if isinstance(prompts, str) else out

    # -- preparing and collecting ----------------------------------------------------
    def _jobs(self, items: list, settings: list[GenerationSettings], prof: Profile) -> list[Job]:
        """The prompts tokenized for every member and checked against the cache budget."""
        if len(settings) != len(items):
            raise SpecEMError(f"{len(settings)} settings for {len(items)} prompts; give one per prompt")
        for st in settings:
            prof.book.check(st.init_weights)  # a missing prior is an error before anything is tokenized
            _check_score(self.members, self.verifiers, st.score)
        metadata = {**self._describe(), **prof.describe()}  # what each result says about how it was made
        return [Job(p.text if isinstance(p, Chat) else p, self._prompt_ids(p, st), st, book=prof.book,
                    metadata=metadata) for p, st in zip(items, settings)]

    def _prompt_ids(self, prompt: str | Chat, st: GenerationSettings, names: Sequence[str] | None = None
                    ) -> dict[str, list[int]]:
        """Each member's prompt ids; room for the prompt plus one round's packed candidates
        must exist up front, and a prompt over it is refused before it is fully encoded."""
        need_scratch = room.round_room(st.window, len(self.drafters))
        limit = room.prompt_limit(self.config.cache_tokens, st.window, len(self.drafters))
        ids = {n: self.members[n].prompt_ids(prompt, limit) for n in (names or self.members)}
        for n, p in ids.items():  # a member that does not check its limit itself
            if len(p) > limit:
                raise CacheFullError(
                    f"the prompt is {len(p)} tokens for {n}, too long for the KV-cache budget of "
                    f"{self.config.cache_tokens} tokens per request (a round needs {need_scratch} more); "
                    "shorten the prompt or raise cache_tokens (--cache-tokens)"
                )
        return ids


def _check_score(members: dict[str, Member], verifiers: list[str], score: str) -> None:
    """Every verifier must give the scores a request asks for (a vLLM member gives
    log-probs only): refused before anything is tokenized or queued."""
    for v in verifiers:
        modes = getattr(members[v], "score_modes", None)
        if modes is not None and score not in modes:
            raise SpecEMError(
                f"score={score!r} needs every verifier's {score}s, but verifier {v} "
                f"({members[v].describe().get('kind')}) gives only {', '.join(modes)}; use "
                f"score='logprob', or list {v} among the models but not the verifiers (a drafter only)"
            )


def _settings_for(n: int, settings, overrides: dict, default: GenerationSettings) -> list[GenerationSettings]:
    if settings is None or isinstance(settings, GenerationSettings):
        base = [settings or default] * n
    else:
        base = list(settings)
        if len(base) != n or not all(isinstance(x, GenerationSettings) for x in base):
            raise SpecEMError(f"settings must be one GenerationSettings or a list of one per prompt ({n})")
    if not overrides:
        return base
    return [b.with_overrides(**overrides) for b in base]
