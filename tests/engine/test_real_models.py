"""End to end on the real default models (fetched by `specem-fast models fetch`)."""

import pytest

pytestmark = pytest.mark.slow

PROMPT = "Explain in two sentences why the sky is blue."


@pytest.fixture(scope="module")
def greedy(real_ensemble):
    return real_ensemble.generate(PROMPT, max_new_tokens=60, window=10)


def test_real_ensemble_writes_an_answer_with_every_model_taking_part(real_ensemble, greedy):
    assert len(greedy.text.split()) >= 5
    assert greedy.stop_reason in ("stop", "length")
    assert len(greedy.rounds) >= 2
    first = greedy.rounds[0]
    assert len(first.candidates) >= 2
    assert set(first.raw_scores) == set(real_ensemble.model_names)
    for v, scores in first.raw_scores.items():
        assert all(-30 < s < 0 for s in scores)  # mean log-probs of real text
        assert sum(first.scores[v]) == pytest.approx(1.0)
    assert sum(greedy.rounds[-1].weights.values()) == pytest.approx(1.0)
    assert all(r.tokens_refed == 0 for r in real_ensemble.runners.values())


def test_text_handoff_round_trips_for_every_default_model(real_ensemble, greedy):
    for name, runner in real_ensemble.runners.items():
        seq = []
        for rd in greedy.rounds:
            seq += runner.codec.encode_segment(rd.accepted)
        assert runner.codec.decode(seq) == greedy.text, name
        assert len(seq) == greedy.tokens_per_model[name]


def test_recompute_mode_gives_the_same_text(real_ensemble, greedy):
    rec = real_ensemble.generate(PROMPT, max_new_tokens=60, window=10, mode="recompute")
    assert rec.text == greedy.text
    assert [r.winner_model for r in rec.rounds] == [r.winner_model for r in greedy.rounds]
