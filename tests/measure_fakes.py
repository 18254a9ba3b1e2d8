"""A tiny stand-in for ``specem_fast.Ensemble`` used by the measure tests.

It follows the engine contract (generate / generate_single / model_names and the
result types) with deterministic text and timings, so the harness logic (resume,
statistics, tables, plots) is tested exactly and fast. The end-to-end tests in
test_measure_e2e.py run the real engine.
"""

from __future__ import annotations

from specem_fast.config import GenerationSettings
from specem_fast.errors import CacheFullError
from specem_fast.results import Candidate, GenerationResult, RoundRecord, SingleResult

MODELS = ["m-alpha", "m-beta", "m-gamma"]


class Killed(BaseException):
    """Simulates the process dying mid-run (not an Exception, like KeyboardInterrupt)."""


class FakeEnsemble:
    """Answers from ``answer_fn(system, prompt, seed) -> text``.

    ``die_after``: raise Killed on that call (1-based), before answering.
    ``timings``: seconds reported by the ensemble per mode, and per model alone.
    ``max_prompt_chars``: prompts longer than this raise CacheFullError.
    """

    def __init__(self, answer_fn=None, die_after=None, max_prompt_chars=None, models=MODELS):
        self.model_names = list(models)
        self.answer_fn = answer_fn or (lambda system, prompt, seed: f"{system} says 42.")
        self.die_after = die_after
        self.max_prompt_chars = max_prompt_chars
        self.calls: list[tuple[str, str, dict]] = []
        self.mode_seconds = {"cached": 1.0, "recompute": 3.0}
        self.single_seconds = 0.2

    def _tick(self, system, prompt, kw):
        self.calls.append((system, prompt, kw))
        if self.die_after is not None and len(self.calls) >= self.die_after:
            raise Killed()
        if self.max_prompt_chars is not None and len(prompt) > self.max_prompt_chars:
            raise CacheFullError(f"prompt of {len(prompt)} chars does not fit")

    def generate(self, prompt, settings=None, **overrides):
        if isinstance(prompt, list):
            per = settings if isinstance(settings, list) else [settings] * len(prompt)
            return [self.generate(p, st, **overrides) for p, st in zip(prompt, per)]
        s = (settings or GenerationSettings()).with_overrides(**overrides)
        settings = s.to_dict()
        self._tick("ensemble", prompt, settings)
        text = self.answer_fn("ensemble", prompt, s.seed)
        k = len(self.model_names)
        rounds = []
        weights = {m: 1.0 / k for m in self.model_names}
        for t in range(1, 4):
            winner = (t - 1) % k if t < 3 else 0
            weights = {m: (weights[m] * (1.5 if i == winner else 1.0)) for i, m in enumerate(self.model_names)}
            z = sum(weights.values())
            weights = {m: w / z for m, w in weights.items()}
            cands = [Candidate(model=m, text=f" seg{t}{m[-1]}", ended_with_stop=False, draft_tokens=s.window) for m in self.model_names]
            scores = {m: [1.0 / k] * k for m in self.model_names}
            rounds.append(
                RoundRecord(
                    index=t,
                    candidates=cands,
                    raw_scores={m: [-1.0] * k for m in self.model_names},
                    scores=scores,
                    weights=dict(weights),
                    combined=[1.0 / k] * k,
                    winner=winner,
                    winner_model=self.model_names[winner],
                    seconds={"draft": 0.1, "verify": 0.05, "commit": 0.01},
                )
            )
        total = self.mode_seconds[s.mode]
        return GenerationResult(
            prompt=prompt,
            text=text,
            stop_reason="stop",
            new_tokens=12,
            tokens_per_model={m: 10 + i for i, m in enumerate(self.model_names)},
            rounds=rounds,
            timings={"draft_s": 0.3 * total, "verify_s": 0.15 * total, "commit_s": 0.03 * total, "total_s": total, "first_segment_s": 0.25 * total},
            settings=s.to_dict(),
            metadata={"device": "cpu", "mode": s.mode},
        )

    def generate_single(self, model_name, prompt, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0, ignore_eos=False):
        if isinstance(prompt, list):
            seeds = seed if isinstance(seed, list) else [seed] * len(prompt)
            return [self.generate_single(model_name, p, max_new_tokens, temperature, top_p, sd, ignore_eos)
                    for p, sd in zip(prompt, seeds)]
        assert model_name in self.model_names
        self._tick(model_name, prompt, {"max_new_tokens": max_new_tokens, "seed": seed, "ignore_eos": ignore_eos})
        text = self.answer_fn(model_name, prompt, seed)
        n = max_new_tokens if ignore_eos else min(max_new_tokens, len(text.split()))
        return SingleResult(model=model_name, prompt=prompt, text=text, new_tokens=n, stop_reason="length" if ignore_eos else "stop", seconds=self.single_seconds, first_token_s=0.01)
