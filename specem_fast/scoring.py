"""The round's arithmetic: normalising scores, Hedge weights, picking the winner.

Pure functions on small lists (one number per candidate and verifier), kept out
of the scheduler so they can be checked against hand-computed values.
"""

from __future__ import annotations

import math


def normalise(raw: list[float], mode: str) -> list[float]:
    """Make one verifier's candidate scores comparable across verifiers.

    ``logprob``: softmax of the mean log-probs (normalised geometric-mean
    probability). ``logit``: divide by the sum, as the reference code does.
    """
    if mode == "logprob":
        m = max(raw)
        e = [math.exp(x - m) for x in raw]
        s = sum(e)
        return [x / s for x in e]
    s = sum(raw)
    if s == 0:
        return [1.0 / len(raw)] * len(raw)
    return [x / s for x in raw]


def win_rate_rewards(
    scores: dict[str, list[float]], candidate_models: list[str], learners: list[str]
) -> dict[str, float]:
    """Reward of each learner = how often its own candidate beat its rivals.

    Over verifiers j != i and rival candidates k != i, count
    ``score_j(i) >= score_j(k)`` and divide by (K-1)^2, K = number of learners
    (models that both draft and verify). A learner with no candidate this
    round (empty draft) gets 0.
    """
    k = len(learners)
    rewards = {m: 0.0 for m in learners}
    if k < 2:
        return rewards
    for i in learners:
        if i not in candidate_models:
            continue
        ci = candidate_models.index(i)
        wins = 0
        for j, s in scores.items():
            if j == i:
                continue
            wins += sum(1 for ck in range(len(candidate_models)) if ck != ci and s[ci] >= s[ck])
        rewards[i] = wins / (k - 1) ** 2
    return rewards


def hedge_learning_rate(lr: float, num_learners: int, t: int) -> float:
    """eta_t = (lr / 10) * sqrt(1/K) / t (the reference's schedule)."""
    return lr / 10.0 * math.sqrt(1.0 / max(num_learners, 1)) / t


def hedge_update(weights: dict[str, float], rewards: dict[str, float], eta: float) -> dict[str, float]:
    """w_i <- w_i * exp(eta * reward_i) for learners, renormalised to their total mass.

    Verifiers that do not draft earn no reward; their weights stay as they are.
    """
    new = dict(weights)
    if not rewards:
        return new
    mass = sum(weights[m] for m in rewards)
    raised = {m: weights[m] * math.exp(eta * r) for m, r in rewards.items()}
    total = sum(raised.values())
    for m, w in raised.items():
        new[m] = w / total * mass
    return new


def combine(scores: dict[str, list[float]], weights: dict[str, float] | None) -> list[float]:
    """Per-candidate sum over verifiers of w_j * score_j(c) (unweighted when off)."""
    n = len(next(iter(scores.values())))
    out = [0.0] * n
    for j, s in scores.items():
        w = 1.0 if weights is None else weights[j]
        for c in range(n):
            out[c] += w * s[c]
    return out


def argmax_first(values: list[float]) -> int:
    """Index of the largest value; ties go to the earliest (drafter order)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best
