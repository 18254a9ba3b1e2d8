import math

import pytest

from specem_fast.rounds import scoring


def test_logprob_normalisation_is_softmax_of_means():
    got = scoring.normalise([-1.0, -2.0, -0.5], "logprob")
    e = [math.exp(-1.0), math.exp(-2.0), math.exp(-0.5)]
    assert got == pytest.approx([x / sum(e) for x in e])


def test_logit_normalisation_divides_by_sum():
    assert scoring.normalise([2.0, 6.0], "logit") == pytest.approx([0.25, 0.75])


def test_win_rate_rewards_hand_computed():
    models = ["A", "B", "C"]
    scores = {  # verifier -> score of candidates A, B, C
        "A": [0.5, 0.3, 0.2],
        "B": [0.4, 0.4, 0.2],
        "C": [0.1, 0.6, 0.3],
    }
    r = scoring.win_rate_rewards(scores, models, models)
    # A: by B: 0.4>=0.4, 0.4>=0.2 -> 2; by C: 0.1>=0.6 no, 0.1>=0.3 no -> 0  => 2/4
    # B: by A: 0.3>=0.5 no, 0.3>=0.2 yes -> 1; by C: 0.6>=0.1, 0.6>=0.3 -> 2 => 3/4
    # C: by A: 0.2>=0.5 no, 0.2>=0.3 no; by B: 0.2>=0.4 no, 0.2>=0.4 no => 0
    assert r == {"A": 0.5, "B": 0.75, "C": 0.0}


def test_learner_without_candidate_gets_zero():
    scores = {"A": [0.7, 0.3], "B": [0.2, 0.8], "C": [0.5, 0.5]}
    r = scoring.win_rate_rewards(scores, ["A", "C"], ["A", "B", "C"])
    assert r["B"] == 0.0
    # A: by B 0.2>=0.8 no; by C 0.5>=0.5 yes -> 1 of 2 comparisons made
    # C: by A 0.3>=0.7 no; by B 0.8>=0.2 yes -> 1 of 2 (the reference divides by (K-1)^2 = 4: B's empty
    # draft would cost its rivals half their reward)
    assert r["A"] == 0.5 and r["C"] == 0.5


def test_hedge_update_and_schedule():
    eta = scoring.hedge_learning_rate(1.0, 4, 2)
    assert eta == pytest.approx(0.1 * 0.5 / 2)
    w = scoring.hedge_update({"A": 0.5, "B": 0.5}, {"A": 1.0, "B": 0.0}, 0.7)
    ea = 0.5 * math.exp(0.7)
    assert w["A"] == pytest.approx(ea / (ea + 0.5))
    assert w["A"] + w["B"] == pytest.approx(1.0)


def test_non_drafting_verifier_keeps_its_weight():
    w = scoring.hedge_update({"A": 0.25, "B": 0.25, "V": 0.5}, {"A": 1.0, "B": 0.0}, 1.0)
    assert w["V"] == 0.5 and w["A"] + w["B"] == pytest.approx(0.5) and w["A"] > w["B"]


def test_combine_and_argmax():
    scores = {"A": [0.2, 0.8], "B": [0.9, 0.1]}
    assert scoring.combine(scores, {"A": 0.75, "B": 0.25}) == pytest.approx([0.375, 0.625])
    assert scoring.combine(scores, None) == pytest.approx([1.1, 0.9])
    assert scoring.argmax_first([0.3, 0.5, 0.5]) == 1


def test_rewards_without_self_votes_hand_computed():
    models = ["A", "B", "C"]
    scores = {"A": [0.5, 0.3, 0.2], "B": [0.4, 0.4, 0.2], "C": [0.1, 0.6, 0.3]}
    r = scoring.win_rate_rewards(scores, models, models, self_votes=False)
    # A vs B judged by C only (B may not judge its own): 0.1>=0.6 no; A vs C judged by B: 0.4>=0.2 yes => 1/2
    # B vs A by C: 0.6>=0.1 yes; B vs C by A: 0.3>=0.2 yes => 2/2
    # C vs A by B: 0.2>=0.4 no; C vs B by A: 0.2>=0.3 no => 0/2
    assert r == {"A": 0.5, "B": 1.0, "C": 0.0}


def test_reward_never_exceeds_one_with_extra_verifiers():
    # drafters {A, B}, verifiers {A, B, C}: B's candidate wins every comparison it is in
    scores = {"A": [0.1, 0.9], "B": [0.2, 0.8], "C": [0.3, 0.7]}
    r = scoring.win_rate_rewards(scores, ["A", "B"], ["A", "B"])
    assert r == {"A": 0.0, "B": 1.0}  # the reference's (K-1)^2 divisor would give B 2.0


def test_learning_rate_schedules():
    assert scoring.hedge_learning_rate(2.0, 3, 4, "constant") == 2.0
    assert scoring.hedge_learning_rate(2.0, 3, 4, "sqrt") == pytest.approx(2.0 * math.sqrt(math.log(3) / 4))
    assert scoring.hedge_learning_rate(2.0, 3, 4) == pytest.approx(0.2 * math.sqrt(1 / 3) / 4)
    with pytest.raises(ValueError):
        scoring.hedge_learning_rate(1.0, 3, 1, "fast")


def test_hedge_update_cannot_overflow():
    w = scoring.hedge_update({"A": 0.5, "B": 0.5}, {"A": 1.0, "B": 0.0}, 1e6)
    assert w == {"A": 1.0, "B": 0.0}
    w = scoring.hedge_update({"A": 0.5, "B": 0.5}, {"A": 1.0, "B": 1.0}, 1e308)
    assert w == pytest.approx({"A": 0.5, "B": 0.5})


def test_combine_without_self_votes_renormalises_the_other_judges():
    scores = {"A": [0.9, 0.1], "B": [0.3, 0.7], "C": [0.6, 0.4]}
    w = {"A": 0.5, "B": 0.25, "C": 0.25}
    got = scoring.combine(scores, w, ["A", "B"])
    # candidate of A judged by B and C (weights 0.25, 0.25 -> 0.5, 0.5); of B by A and C (0.5, 0.25 -> 2/3, 1/3)
    assert got == pytest.approx([0.5 * 0.3 + 0.5 * 0.6, 2 / 3 * 0.1 + 1 / 3 * 0.4])
    assert scoring.combine({"A": [0.2, 0.8]}, None, ["A", "A"]) == pytest.approx([0.2, 0.8])  # sole judge keeps its vote


@pytest.mark.parametrize("schedule", ["reference", "constant", "sqrt"])
@pytest.mark.parametrize("lr", [1e-300, 5e-324, 1.0, 1e300, 1.79e308, 1.7976931348623157e308])
def test_hedge_weights_stay_finite_for_any_learning_rate_the_settings_take(lr, schedule):
    """A huge hedge_lr made the sqrt schedule's rate inf and inf * a reward of 0 NaN in every
    weight (issue 28 part 2): the rate is capped where the weights are already a hard max."""
    from specem_fast.config import GenerationSettings

    st = GenerationSettings(hedge_lr=lr, hedge_schedule=schedule)  # accepted: finite and >= 0
    eta = scoring.hedge_learning_rate(st.hedge_lr, 3, 1, schedule)
    assert math.isfinite(eta) and eta <= scoring.MAX_RATE
    w = scoring.hedge_update({"a": 0.5, "b": 0.25, "c": 0.25}, {"a": 0.0, "b": 1.0, "c": 0.5}, eta)
    assert all(math.isfinite(x) for x in w.values()) and sum(w.values()) == pytest.approx(1.0)
    if lr >= 1e300:
        assert w == {"a": 0.0, "b": 1.0, "c": 0.0}  # only the best reward keeps weight
    if lr <= 5e-324:
        assert w == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25})
