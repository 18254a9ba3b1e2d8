import math

import pytest

from specem_fast.measure.stats import accuracy, mean, median, wilson_interval


def test_wilson_7_of_10_hand_computed():
    # p = 0.7, z = 1.959964, z^2 = 3.841459:
    # centre = (0.7 + z^2/20) / (1 + z^2/10) = 0.8920729 / 1.3841459 = 0.644492
    # half = z * sqrt(0.021 + z^2/400) / (1 + z^2/10) = 0.342878 / 1.3841459 = 0.24772
    lo, hi = wilson_interval(7, 10)
    assert lo == pytest.approx(0.39678, abs=1e-5)
    assert hi == pytest.approx(0.89221, abs=1e-5)


def test_wilson_edges():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(3.8414588 / 13.8414588, abs=1e-7)  # z^2 / (n + z^2)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / 13.8414588, abs=1e-7)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(50, 100)
    assert (lo + hi) / 2 == pytest.approx(0.5)
    assert hi - lo == pytest.approx(2 * 1.959964 * math.sqrt(0.25 / 100 + 1.959964**2 / 40000) / (1 + 1.959964**2 / 100), abs=1e-6)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_accuracy_skips_ungraded():
    acc = accuracy([True, False, None, True, True, None, False, True, True, True, False])
    assert (acc.correct, acc.n) == (6, 9)
    assert acc.value == pytest.approx(6 / 9)
    lo, hi = wilson_interval(6, 9)
    assert (acc.ci_low, acc.ci_high) == (lo, hi)
    assert str(acc).startswith("66.7%")
    empty = accuracy([None])
    assert empty.value is None and empty.n == 0 and str(empty) == "n/a"


def test_mean_median():
    assert mean([1, 2, 3, None]) == 2.0
    assert mean([]) is None
    assert median([5, 1, 3, 2]) == 2.5
    assert median([None]) is None
