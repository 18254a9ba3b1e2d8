"""Summary statistics: accuracy with a Wilson interval, means and medians."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import median as _median
from typing import Iterable

__all__ = ["Accuracy", "accuracy", "wilson_interval", "mean", "median", "Z95"]

# two-sided 95% normal quantile
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at
    0/n and n/n and for small n. With n = 0 the interval is the whole [0, 1].
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n (got {successes}/{n})")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # exact bounds at the edges (floating point may leave 1e-17 residue)
    if successes == 0:
        lo = 0.0
    if successes == n:
        hi = 1.0
    return lo, hi


@dataclass(frozen=True)
class Accuracy:
    correct: int
    n: int
    value: float | None  # None when n == 0
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if self.value is None:
            return "n/a"
        return f"{100 * self.value:.1f}% [{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}]"


def accuracy(outcomes: Iterable[bool | None]) -> Accuracy:
    """Accuracy over graded outcomes; ``None`` (ungradable) entries are left out."""
    graded = [bool(o) for o in outcomes if o is not None]
    k, n = sum(graded), len(graded)
    lo, hi = wilson_interval(k, n)
    return Accuracy(correct=k, n=n, value=(k / n if n else None), ci_low=lo, ci_high=hi)


def mean(values: Iterable[float]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def median(values: Iterable[float]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(_median(vals)) if vals else None
