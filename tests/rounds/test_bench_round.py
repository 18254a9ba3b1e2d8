"""Benchmarks (pytest-benchmark): the round's arithmetic and one engine round on tiny models."""

from __future__ import annotations

import math
import random

import pytest

from specem_fast.rounds import scoring

MODELS = ["m0", "m1", "m2"]


def test_bench_round_arithmetic(benchmark):
    """The round executor's own decision (:func:`scoring.pick_winner`: normalise, reward,
    Hedge update, combine, select) for three models over 100 rounds."""
    rng = random.Random(0)
    rounds = [{j: [rng.uniform(-3, 0) for _ in MODELS] for j in MODELS} for _ in range(100)]

    def run():
        w = {m: 1 / 3 for m in MODELS}
        picks = []
        for t, raw in enumerate(rounds, start=1):
            _, w, combined, best = scoring.pick_winner(raw=raw, score="logprob", candidate_models=MODELS,
                                                       learners=MODELS, weights=w, hedge_lr=1.0, t=t)
            picks.append((best, combined))
        return w, picks

    w, picks = benchmark(run)
    assert math.isclose(sum(w.values()), 1.0) and len(picks) == 100
    assert w != {m: 1 / 3 for m in MODELS}  # the weights learned
    assert all(c[best] == max(c) for best, c in picks)


@pytest.fixture(scope="module")
def tiny_ensemble(tiny_dirs):
    from specem_fast import Ensemble

    return Ensemble.from_pretrained([str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])], cache_tokens=256, max_batch=1)


def test_bench_engine_round(benchmark, tiny_ensemble):
    """One greedy ensemble generation of one window on tiny models (prefill, draft, verify, commit)."""
    res = benchmark(tiny_ensemble.generate, "Count to ten.", window=10, max_new_tokens=10, temperature=0.0)
    assert res.new_tokens >= 1 and res.rounds
