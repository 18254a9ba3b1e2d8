import json

import pytest

from specem_fast.errors import SpecEMError
from specem_fast.rounds.weights import WeightBook, apply_floor, weights_from_accuracy


def test_floor_keeps_every_member_audible():
    w = apply_floor({"a": 0.98, "b": 0.02, "c": 0.0}, 0.3)  # floor 0.1 each
    assert w == pytest.approx({"a": 0.8, "b": 0.1, "c": 0.1})
    assert apply_floor(w, 0.3) == pytest.approx(w)  # idempotent
    w = apply_floor({"a": 0.6, "b": 0.35, "c": 0.05}, 0.3)  # c raised, a and b keep their ratio
    assert w == pytest.approx({"a": 0.6 * 0.9 / 0.95, "b": 0.35 * 0.9 / 0.95, "c": 0.1})
    assert apply_floor({"a": 0.5, "b": 0.5}, 0.2) == {"a": 0.5, "b": 0.5}


def test_running_estimate_is_a_mean_then_an_exponential_average():
    book = WeightBook(["a", "b"], floor=0.0, horizon=2)
    book.observe({"a": 0.9, "b": 0.1})
    assert book.learned == pytest.approx({"a": 0.9, "b": 0.1})
    book.observe({"a": 0.5, "b": 0.5})
    assert book.learned == pytest.approx({"a": 0.7, "b": 0.3})
    book.observe({"a": 0.1, "b": 0.9})  # horizon 2: alpha stays 1/2
    assert book.learned == pytest.approx({"a": 0.4, "b": 0.6})


def test_prior_resets_the_estimate_and_roundtrips(tmp_path):
    book = WeightBook(["a", "b", "c"])
    book.observe({"a": 0.6, "b": 0.3, "c": 0.1})
    book.set_prior({"a": 3, "b": 1, "c": 1}, {"note": "by hand"})
    assert book.prior == pytest.approx({"a": 0.6, "b": 0.2, "c": 0.2})
    assert book.learned == book.prior and book.requests == 0
    book.observe({"a": 0.2, "b": 0.2, "c": 0.6})
    p = book.save(tmp_path / "w.json")
    other = WeightBook(["c", "b", "a"])
    other.load(p)
    assert other.prior == pytest.approx(book.prior) and other.learned == pytest.approx(book.learned)
    assert other.requests == 1 and other.calibration == {"note": "by hand"}
    assert json.loads(p.read_text())["format"] == "specem-fast-weights/1"
    with pytest.raises(SpecEMError, match="does not exist"):
        book.save(tmp_path / "missing" / "w.json")
    with pytest.raises(SpecEMError, match="does not exist"):
        other.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(SpecEMError, match="not a weights file"):
        other.load(tmp_path / "x.json")


def test_weights_from_accuracy_hand_computed():
    w = weights_from_accuracy({"q": 23, "s": 8, "g": 3}, {"q": 98, "s": 98, "g": 98}, power=2.0, floor=0.0)
    raw = {"q": 0.24 ** 2, "s": 0.09 ** 2, "g": 0.04 ** 2}
    z = sum(raw.values())
    assert w == pytest.approx({m: v / z for m, v in raw.items()})
    with pytest.raises(SpecEMError, match="no graded answers"):
        weights_from_accuracy({"q": 0}, {"q": 0})
