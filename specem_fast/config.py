"""Typed settings, validated once at the edge (API and CLI share these)."""

from __future__ import annotations

import math
import os
import struct
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from specem_fast.errors import SpecEMError

# logprob: mean log-prob of a candidate's tokens (default); logit: mean raw logit (the reference
# code); logprob_sum: summed log-prob (the candidate's probability: favours shorter candidates)
SCORE_MODES = ("logprob", "logit", "logprob_sum")
RUN_MODES = ("cached", "recompute")
KERNEL_CHOICES = ("auto", "triton", "torch")
HEDGE_SCHEDULES = ("reference", "constant", "sqrt")
INIT_WEIGHTS = ("uniform", "prior", "learned")
# Per-member sampler seeds: seed * SEED_STRIDE + the member's index (the round executor), or +
# the sequence length (a vLLM member's per-round seed); for seeds below MAX_SEED that fits 64 bits.
SEED_STRIDE = 1_000_003
MAX_SEED = 2**40
FLASH_ATTN_CHOICES = ("auto", "on", "off")
PARALLEL_CHOICES = ("auto", "on", "off")
# Named settings. "reference": the paper's method exactly (the dataclass defaults).
# "recommended": the best measured setting for members of very unequal strength
# (benchmarks/RESULTS.md): a calibrated prior, model exit and the agreement fast path.
PRESETS: dict[str, dict] = {
    "reference": {},
    "recommended": {"init_weights": "prior", "exit_threshold": 0.2, "exit_patience": 2, "skip_agreed": True},
}
# "auto": recommended when the ensemble has prior weights (shipped for the default members, or
# --weights), else reference (no option measured better than it for uncalibrated members)
PRESET_CHOICES = ("auto", *PRESETS)
# Sampling temperatures below this are refused: logits / T overflows float32 for
# T around 1e-38 (NaN probabilities), and long before that the softmax is one-hot,
# i.e. greedy. 0 is the way to ask for greedy decoding.
MIN_TEMPERATURE = 1e-5
# The sampler works in float32 whatever the model's dtype (it upcasts the logits), so a
# sampling setting is checked as float32 will hold it. A temperature float32 cannot hold
# (above about 3.4e38) is refused. top_p is clamped where the draws stay the same:
# one below TOP_P_FLOOR would round to 0 and drop every token, while any top_p up to the
# top token's probability (at least 1/vocab, far above the floor) keeps the top token
# alone, so the floor keeps exactly what it would; one that rounds to 1.0 in float32
# (above 1 - 2**-25) becomes 1.0: every token stays, as the sampler would compute it.
TOP_P_FLOOR = 2.0**-126  # the smallest normal float32 (and bfloat16)


@dataclass(frozen=True)
class GenerationSettings:
    """Per-request settings of an ensemble generation.

    ``hedge_lr=None`` switches the online weights off (candidates' scores are
    summed unweighted). ``hedge_schedule`` sets the Hedge learning rate of
    round t (see :func:`specem_fast.rounds.scoring.hedge_learning_rate`); "reference"
    is ``hedge_lr / 10 * sqrt(1/K) / t`` as in the reference implementation.

    Quality options (all off by default, which is the reference method):
    ``init_weights`` starts a request from uniform weights, the ensemble's
    prior weights, or the weights it learned on earlier requests;
    ``exit_threshold``/``exit_patience`` stop a drafter whose weight was below
    the threshold at the start of ``exit_patience`` consecutive rounds (model
    exit; it keeps verifying); ``skip_agreed`` accepts identical candidates
    without a verify pass; ``self_votes=False`` leaves a candidate's own
    drafter out of its combined score and out of the win-rate rewards;
    ``prefer_finished`` lets only the candidates that ended the answer (sampled a
    stop token such as EOS) compete when any did, which is meant for whole-response
    candidates (``window`` = ``max_new_tokens``), where the others were cut by the
    token budget.
    """

    window: int = 10
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    score: str = "logprob"
    hedge_lr: float | None = 1.0
    fast_eos: bool = False
    mode: str = "cached"
    stop: tuple[str, ...] = ()
    hedge_schedule: str = "reference"
    init_weights: str = "uniform"
    exit_threshold: float | None = None
    exit_patience: int = 3
    skip_agreed: bool = False
    self_votes: bool = True
    prefer_finished: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise SpecEMError(f"window must be an integer >= 1 (got {self.window!r}); the paper uses 5-15, default 10")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise SpecEMError(f"max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})")
        if not _is_finite(self.temperature):
            raise SpecEMError(f"temperature must be a finite number (got {self.temperature!r}); use 0 for greedy "
                              "decoding")
        if self.temperature < 0:
            raise SpecEMError(f"temperature must be >= 0 (got {self.temperature!r}); use 0 for greedy decoding")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise SpecEMError(
                f"temperature {self.temperature!r} is too small to sample with (the minimum is {MIN_TEMPERATURE:g}; "
                "below it sampling is greedy anyway and the scaled logits overflow); use 0 for greedy decoding"
            )
        if _float32(self.temperature) is None:
            raise SpecEMError(f"temperature {self.temperature!r} overflows float32, which sampling runs in (the "
                              f"maximum is {_FLOAT32_MAX:g}; far below it the distribution is uniform)")
        if not _is_finite(self.top_p):
            raise SpecEMError(f"top_p must be a finite number in (0, 1] (got {self.top_p!r}); use 1 to disable "
                              "nucleus sampling")
        if not 0 < self.top_p <= 1:
            raise SpecEMError(f"top_p must be in (0, 1] (got {self.top_p!r}); use 1 to disable nucleus sampling")
        if _float32(self.top_p) == 1.0 or self.top_p < TOP_P_FLOOR:  # the same draws, see TOP_P_FLOOR
            object.__setattr__(self, "top_p", 1.0 if self.top_p > 0.5 else TOP_P_FLOOR)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < MAX_SEED:
            raise SpecEMError(f"seed must be an integer in [0, 2**40) (got {self.seed!r})")
        if self.score not in SCORE_MODES:
            raise SpecEMError(f"score must be one of {', '.join(SCORE_MODES)} (got {self.score!r})")
        if self.hedge_lr is not None and (not _is_finite(self.hedge_lr) or self.hedge_lr < 0):
            raise SpecEMError(f"hedge_lr must be a finite number >= 0 or None/'off' (got {self.hedge_lr!r})")
        if self.mode not in RUN_MODES:
            raise SpecEMError(f"mode must be one of {', '.join(RUN_MODES)} (got {self.mode!r})")
        if self.hedge_schedule not in HEDGE_SCHEDULES:
            raise SpecEMError(
                f"hedge_schedule must be one of {', '.join(HEDGE_SCHEDULES)} (got {self.hedge_schedule!r})"
            )
        if self.init_weights not in INIT_WEIGHTS:
            raise SpecEMError(f"init_weights must be one of {', '.join(INIT_WEIGHTS)} (got {self.init_weights!r})")
        if self.exit_threshold is not None and (
            not _is_finite(self.exit_threshold) or not 0 < self.exit_threshold < 1
        ):
            raise SpecEMError(
                f"exit_threshold must be a finite number in (0, 1) (a weight) or None to keep every drafter "
                f"(got {self.exit_threshold!r})"
            )
        if not isinstance(self.exit_patience, int) or isinstance(self.exit_patience, bool) or self.exit_patience < 1:
            raise SpecEMError(f"exit_patience must be an integer >= 1 (rounds; got {self.exit_patience!r})")
        for name in ("fast_eos", "skip_agreed", "self_votes", "prefer_finished"):
            if not isinstance(getattr(self, name), bool):
                raise SpecEMError(f"{name} must be True or False (got {getattr(self, name)!r})")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise SpecEMError("stop strings must be non-empty strings")
        for s in stop:
            check_text(s, "a stop string")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GenerationSettings":
        """The named settings (``reference`` or ``recommended``), with overrides on top."""
        if name not in PRESETS:
            raise SpecEMError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
        return cls().with_overrides(**{**PRESETS[name], **overrides})

    def with_overrides(self, **overrides: Any) -> "GenerationSettings":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise SpecEMError(f"unknown generation setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if overrides.get("hedge_lr") == "off":
            overrides["hedge_lr"] = None
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


def check_text(text: str, what: str) -> None:
    """Refuse a str that is not valid Unicode (a lone surrogate: what invalid UTF-8 bytes
    in argv or a file read with errors='surrogateescape' become)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SpecEMError(
            f"{what} is not valid Unicode text: it has a lone surrogate U+{ord(text[exc.start]):04X} at character "
            f"{exc.start} (invalid UTF-8 or a broken escape); remove it, or decode the input with errors='replace'"
        ) from None


def env_choice(var: str, setting: str, choices: tuple[str, ...]) -> str:
    """``setting``, unless the environment variable ``var`` overrides it; a value of
    ``var`` that is not one of ``choices`` is an error (never silently 'auto')."""
    raw = os.environ.get(var, "")
    env = raw.strip().lower()
    if env and env not in choices:
        options = ", ".join(choices[:-1]) + f" or {choices[-1]}"
        raise SpecEMError(f"environment variable {var} must be {options} (got {raw!r}); fix it or unset it")
    return env or setting


def _is_whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x: Any) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


_FLOAT32_MAX = 3.4028234663852886e38


def _float32(x: float) -> float | None:
    """``x`` rounded to float32 as the sampler will hold it, or None when float32 overflows."""
    try:
        y = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return None
    return y if math.isfinite(y) else None


@dataclass(frozen=True)
class EngineConfig:
    """Engine-wide settings fixed when the ensemble is built.

    ``cache_tokens`` is the KV-cache budget per request slot and model (prompt,
    answer and the packed candidates of one verify pass must fit);
    ``max_batch`` is how many requests run together.
    """

    device: str = "cpu"
    dtype: str | None = None  # None: bfloat16 on CUDA and CPUs with native bf16, else float32
    cache_tokens: int = 4096
    max_batch: int = 8
    kernels: str = "auto"  # auto: Triton on CUDA, torch references on CPU
    # auto: flash-attn for long prefixes when it is installed (CUDA, Triton path, fp16/bf16); on: always; off: never
    flash_attn: str = "auto"
    devices: tuple[str, ...] = field(default=())  # optional per-model device override
    dtypes: tuple[str | None, ...] = field(default=())  # optional per-model dtype override
    # draft decode step through torch.compile (plus CUDA graphs on CUDA); same greedy text
    compile: bool = False
    # members' drafting and verify forwards on one host thread per device, or per member on a CPU
    # with >= 2 threads ("auto"), per member always ("on"), or one after another ("off")
    parallel: str = "auto"
    # every local (and Ray) member runs each request's draft steps and verify pass as a batch of its
    # own, so a request's greedy answer does not depend on what it was batched with (in any dtype)
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if not _is_whole(self.cache_tokens) or self.cache_tokens < 16:
            raise SpecEMError(f"cache_tokens must be a whole number of tokens >= 16 (got {self.cache_tokens!r}); "
                              "default 4096")
        if not _is_whole(self.max_batch) or self.max_batch < 1:
            raise SpecEMError(f"max_batch must be a whole number >= 1 (got {self.max_batch!r}); default 8")
        if self.kernels not in KERNEL_CHOICES:
            raise SpecEMError(f"kernels must be one of {', '.join(KERNEL_CHOICES)} (got {self.kernels!r})")
        if self.flash_attn not in FLASH_ATTN_CHOICES:
            raise SpecEMError(f"flash_attn must be one of {', '.join(FLASH_ATTN_CHOICES)} (got {self.flash_attn!r})")
        if self.parallel not in PARALLEL_CHOICES:
            raise SpecEMError(f"parallel must be one of {', '.join(PARALLEL_CHOICES)} (got {self.parallel!r})")
        if not isinstance(self.batch_invariant, bool):
            raise SpecEMError(f"batch_invariant must be True or False (got {self.batch_invariant!r})")
        if not isinstance(self.compile, bool):
            raise SpecEMError(f"compile must be True or False (got {self.compile!r})")
        for dt in (self.dtype, *self.dtypes):
            if dt not in (None, "float32", "bfloat16", "float16"):
                raise SpecEMError(f"dtype must be float32, bfloat16 or float16 (got {dt!r})")
        for dev in (self.device, *self.devices):
            if not isinstance(dev, str) or not dev.strip():
                raise SpecEMError(f"device must be a name such as cpu, cuda or cuda:N (got {dev!r})")
        env_choice("SPECEM_FLASH_ATTN", self.flash_attn, FLASH_ATTN_CHOICES)
        env_choice("SPECEM_KERNELS", self.kernels, KERNEL_CHOICES)


