"""Benchmarks (pytest-benchmark): the round's arithmetic and one engine round on tiny models."""

from __future__ import annotations

import math
import random

import pytest

from specem_fast.rounds import scoring

MODELS = ["m0", "m1", "m2"]


def _one_round(raw: dict[str, list[float]], weights: dict[str, float], t: int):
    norm = {j: scoring.normalise(s, "logprob") for j, s in raw.items()}
    rewards = scoring.win_rate_rewards(norm, MODELS, MODELS)
    eta = scoring.hedge_learning_rate(1.0, len(MODELS), t)
    weights = scoring.hedge_update(weights, rewards, eta)
    combined = [sum(weights[j] * norm[j][c] for j in norm) for c in range(len(MODELS))]
    return weights, scoring.argmax_first(combined)


def test_bench_round_arithmetic(benchmark):
    """Normalise, reward, Hedge update and select for three models over 100 rounds."""
    rng = random.Random(0)
    rounds = [{j: [rng.uniform(-3, 0) for _ in MODELS] for j in MODELS} for _ in range(100)]

    def run():
        w = {m: 1 / 3 for m in MODELS}
        winners = []
        for t, raw in enumerate(rounds, start=1):
            w, best = _one_round(raw, w, t)
            winners.append(best)
        return w, winners

    w, winners = benchmark(run)
    assert math.isclose(sum(w.values()), 1.0) and len(winners) == 100


@pytest.fixture(scope="module")
def tiny_ensemble(tiny_dirs):
    from specem_fast import Ensemble

    return Ensemble.from_pretrained([str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])], cache_tokens=256, max_batch=1)


def test_bench_engine_round(benchmark, tiny_ensemble):
    """One greedy ensemble generation of one window on tiny models (prefill, draft, verify, commit)."""
    res = benchmark(tiny_ensemble.generate, "Count to ten.", window=10, max_new_tokens=10, temperature=0.0)
    assert res.new_tokens >= 1 and res.rounds
