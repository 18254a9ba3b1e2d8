"""The round's arithmetic: normalising scores, Hedge weights, picking the winner.

Pure functions on small lists (one number per candidate and verifier), kept out
of the round executor so they can be checked against hand-computed values.
"""

from __future__ import annotations

import math


def normalise(raw: list[float], mode: str) -> list[float]:
    """Make one verifier's candidate scores comparable across verifiers.

    ``logprob``: softmax of the mean log-probs (normalised geometric-mean
    probability); ``logprob_sum``: softmax of the summed log-probs (normalised
    probability of each candidate). ``logit``: divide by the sum, as the reference code does.
    """
    if mode in ("logprob", "logprob_sum"):
        m = max(raw)
        e = [math.exp(x - m) for x in raw]
        s = sum(e)
        return [x / s for x in e]
    s = sum(raw)
    if s == 0:
        return [1.0 / len(raw)] * len(raw)
    return [x / s for x in raw]


def win_rate_rewards(
    scores: dict[str, list[float]],
    candidate_models: list[str],
    learners: list[str],
    self_votes: bool = True,
) -> dict[str, float]:
    """Reward of each learner = the share of comparisons its own candidate won.

    A comparison is one verifier j != i rating i's candidate against one rival
    candidate k: a win when ``score_j(i) >= score_j(k)``. With
    ``self_votes=False`` verifier j is also left out when it drafted k (it
    would be judging its own draft). The reward is wins / comparisons made, in
    [0, 1]. When every learner drafted a candidate and verifies (the usual
    setup) that is (K-1)^2 comparisons, the reference's divisor; verifiers that
    do not draft add comparisons, and a round with fewer candidates has fewer,
    instead of a reward above 1 or a penalty for a rival's empty draft. A
    learner with no candidate this round gets 0.
    """
    rewards = {m: 0.0 for m in learners}
    if len(learners) < 2:
        return rewards
    for i in learners:
        if i not in candidate_models:
            continue
        ci = candidate_models.index(i)
        wins = made = 0
        for j, s in scores.items():
            if j == i:
                continue
            for ck, k in enumerate(candidate_models):
                if ck == ci or (not self_votes and j == k):
                    continue
                made += 1
                wins += s[ci] >= s[ck]
        rewards[i] = wins / made if made else 0.0
    return rewards


def hedge_learning_rate(lr: float, num_learners: int, t: int, schedule: str = "reference") -> float:
    """Learning rate of round t (1-based).

    - ``reference``: (lr / 10) * sqrt(1/K) / t, the authors' schedule. It
      decays so fast that weights move a few percent over a whole answer.
    - ``constant``: lr every round, so weights keep moving within an answer.
    - ``sqrt``: lr * sqrt(ln(K) / t), the textbook anytime Hedge rate.

    At most :data:`MAX_RATE`: a huge ``lr`` (up to float's largest) could overflow to inf
    here, and inf * a reward of 0 is NaN in every weight. The weights are the same below
    the cap: long before it, only the best reward keeps any weight.
    """
    k = max(num_learners, 1)
    if schedule == "reference":
        rate = lr / 10.0 * math.sqrt(1.0 / k) / t
    elif schedule == "constant":
        rate = lr
    elif schedule == "sqrt":
        rate = lr * math.sqrt(math.log(max(k, 2)) / t)
    else:
        raise ValueError(f"unknown hedge schedule {schedule!r}")
    return min(rate, MAX_RATE)


MAX_RATE = 1e300  # a Hedge learning rate whose products with rewards in [0, 1] stay finite


def hedge_update(weights: dict[str, float], rewards: dict[str, float], eta: float) -> dict[str, float]:
    """w_i <- w_i * exp(eta * reward_i) for learners, renormalised to their total mass.

    Computed in log space (a softmax), so a huge learning rate cannot
    overflow. Verifiers that do not draft earn no reward; their weights stay
    as they are.
    """
    new = dict(weights)
    if not rewards:
        return new
    mass = sum(weights[m] for m in rewards)
    logs = {m: (math.log(weights[m]) if weights[m] > 0 else -math.inf) + eta * r for m, r in rewards.items()}
    top = max(logs.values())
    if top == -math.inf:
        return new
    raised = {m: math.exp(v - top) for m, v in logs.items()}
    total = sum(raised.values())
    for m, w in raised.items():
        new[m] = w / total * mass
    return new


def combine(
    scores: dict[str, list[float]],
    weights: dict[str, float] | None,
    candidate_models: list[str] | None = None,
) -> list[float]:
    """Per-candidate sum over verifiers of w_j * score_j(c) (unweighted when off).

    With ``candidate_models`` (no self-votes), candidate c's drafter is left
    out of c's sum and the other verifiers' weights are renormalised to 1, so
    every candidate is judged on the same scale; a candidate whose drafter is
    the only verifier keeps its vote.
    """
    n = len(next(iter(scores.values())))
    out = [0.0] * n
    for c in range(n):
        judges = [j for j in scores if candidate_models is None or j != candidate_models[c]] or list(scores)
        ws = {j: 1.0 if weights is None else weights[j] for j in judges}
        norm = sum(ws.values()) if candidate_models is not None else 1.0
        for j in judges:
            out[c] += ws[j] * scores[j][c] / (norm if norm > 0 else 1.0)
    return out


def pick_winner(
    raw: dict[str, list[float]],
    *,
    score: str,
    candidate_models: list[str],
    learners: list[str],
    weights: dict[str, float],
    hedge_lr: float | None,
    t: int,
    schedule: str = "reference",
    self_votes: bool = True,
) -> tuple[dict[str, list[float]], dict[str, float] | None, list[float], int]:
    """One verified round's decision, as the reference orders it: normalise each verifier's
    raw scores, update the weights from this round's rewards (round ``t``; skipped with
    ``hedge_lr=None``), combine, pick. Returns (normalised scores, updated weights or None,
    combined scores, winner index)."""
    norm = {v: normalise(r, score) for v, r in raw.items()}
    new = None
    if hedge_lr is not None:
        rewards = win_rate_rewards(norm, candidate_models, learners, self_votes)
        eta = hedge_learning_rate(hedge_lr, len(learners), t, schedule)
        new = hedge_update(weights, rewards, eta)
    combined = combine(norm, new, None if self_votes else candidate_models)
    return norm, new, combined, argmax_first(combined)


def argmax_first(values: list[float]) -> int:
    """Index of the largest value; ties go to the earliest (drafter order)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best
