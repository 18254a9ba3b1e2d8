"""Model weights that outlive a request: priors, a running estimate, JSON files.

Hedge starts every request from uniform weights in the reference method, so
what one answer learned about the members is lost before the next. A
:class:`WeightBook` keeps, per ensemble, optional prior weights (set by hand or
measured by ``specem-fast calibrate``) and a running estimate of the weights
requests ended with; a request can start from either. A floor keeps every
member audible, so no model is silenced for good by a bad streak.
"""

from __future__ import annotations

import json
import math
import functools
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from specem_fast.errors import SpecEMError

FORMAT = "specem-fast-weights/1"


def _normalised(weights: Mapping[str, float], names: Sequence[str], what: str) -> dict[str, float]:
    """Check that ``weights`` names exactly ``names`` with finite positive numbers; scale to sum 1."""
    if not isinstance(weights, Mapping):
        raise SpecEMError(f"{what} must map model names to numbers (got {type(weights).__name__})")
    extra = sorted(set(weights) - set(names))
    missing = [n for n in names if n not in weights]
    if extra or missing:
        detail = "; ".join(p for p in (
            f"not in this ensemble's verifiers: {', '.join(extra)}" if extra else "",
            f"missing: {', '.join(missing)}" if missing else "",
        ) if p)
        raise SpecEMError(f"{what} must give one weight per verifier ({', '.join(names)}); {detail}")
    vals = {}
    for n in names:
        v = weights[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SpecEMError(f"{what}: the weight of {n} must be a finite number > 0 (got {v!r})")
        vals[n] = float(v)
    total = sum(vals.values())
    return {n: v / total for n, v in vals.items()}


def apply_floor(weights: Mapping[str, float], floor: float) -> dict[str, float]:
    """Weights summing to 1 with none below ``floor / K`` (a share of uniform).

    Weights under the floor are raised to it and the others scaled down
    together to make room, so weights already above the floor keep their
    ratios, and flooring twice changes nothing.
    """
    total = sum(weights.values())
    w = {n: v / total for n, v in weights.items()}
    low = floor / len(w)
    pinned: set[str] = set()
    while True:
        free = [n for n in w if n not in pinned]
        scale = (1.0 - low * len(pinned)) / sum(w[n] for n in free)
        under = {n for n in free if w[n] * scale < low}
        if not under:
            return {n: low if n in pinned else w[n] * scale for n in w}
        pinned |= under


def weights_from_accuracy(correct: Mapping[str, int], graded: Mapping[str, int], power: float = 2.0,
                          floor: float = 0.1) -> dict[str, float]:
    """Prior weights from members' accuracy on a development split.

    w_i proportional to a_i ** power, where a_i = (correct + 1) / (graded + 2)
    (Laplace smoothing, so a member with no correct answer keeps a little
    weight), then the floor. ``power`` sharpens the gap between members.
    """
    if not correct:
        raise SpecEMError("no members to weigh")
    raw = {}
    for m in correct:
        n = graded.get(m, 0)
        if n < 1:
            raise SpecEMError(f"{m} has no graded answers; calibrate on a split it answered")
        raw[m] = ((correct[m] + 1) / (n + 2)) ** power
    total = sum(raw.values())
    return apply_floor({m: v / total for m, v in raw.items()}, floor)


def read_weights_file(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON of a weights file, checked for its format marker."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecEMError(f"weights file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecEMError(f"cannot read weights file {str(p)!r}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SpecEMError(f"{str(p)!r} is not a weights file of specem-fast (no {FORMAT!r} format field)")
    return data


def _locked(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return run


def shipped_weights(verifiers: Sequence[str]) -> Path | None:
    """The calibration shipped in the package (specem_fast/data/weights-default.json, made
    for the default members), when it is for exactly these verifiers."""
    path = Path(__file__).resolve().parents[1] / "data" / "weights-default.json"
    try:
        names = read_weights_file(path).get("verifiers")
    except (SpecEMError, OSError):
        return None
    return path if isinstance(names, list) and sorted(names) == sorted(verifiers) else None


class WeightBook:
    """Per-ensemble weights across requests; safe to share between threads (the engine
    loop observes finished requests while callers load or save)."""

    def __init__(self, names: Sequence[str], floor: float = 0.1, horizon: int = 50):
        if not 0 <= floor < 1:
            raise SpecEMError(f"weight floor must be in [0, 1) (got {floor!r})")
        if horizon < 1:
            raise SpecEMError(f"weight horizon must be >= 1 request (got {horizon!r})")
        self.names = list(names)
        self.floor = floor
        self.horizon = horizon
        self.prior: dict[str, float] | None = None
        self.learned: dict[str, float] = self.uniform()
        self.requests = 0  # requests folded into the running estimate
        self.calibration: dict[str, Any] | None = None
        self._lock = threading.RLock()

    def uniform(self) -> dict[str, float]:
        return {n: 1.0 / len(self.names) for n in self.names}

    @_locked
    def set_prior(self, weights: Mapping[str, float] | None, calibration: dict[str, Any] | None = None) -> None:
        """Set (or clear, with None) the prior; the running estimate restarts from it."""
        self.prior = None if weights is None else _normalised(weights, self.names, "prior weights")
        self.calibration = calibration
        self.learned = dict(self.prior) if self.prior else self.uniform()
        self.requests = 0

    @_locked
    def check(self, kind: str) -> None:
        """Refuse an ``init_weights`` this book cannot start a request from (an unknown
        kind, or ``prior`` without a prior): the front asks before it queues a request."""
        if kind not in ("uniform", "prior", "learned"):
            raise SpecEMError(f"unknown init_weights {kind!r}")
        if kind == "prior" and self.prior is None:
            raise SpecEMError(
                "init_weights='prior' but this ensemble has no prior weights; set them with "
                "Ensemble.set_prior_weights / --weights FILE, or measure them with `specem-fast calibrate`"
            )

    @_locked
    def initial(self, kind: str) -> dict[str, float]:
        """A request's starting weights: ``uniform``, ``prior`` or ``learned`` (taken
        once per request, when the round executor opens it)."""
        self.check(kind)
        if kind == "uniform":
            return self.uniform()
        return dict(self.prior) if kind == "prior" else dict(self.learned)

    @_locked
    def observe(self, final: Mapping[str, float]) -> None:
        """Fold the weights one request ended with into the running estimate.

        A running mean over the first ``horizon`` requests, then an
        exponential average with that horizon; the floor applies after each step.
        """
        self.requests += 1
        alpha = 1.0 / min(self.requests, self.horizon)
        mixed = {n: (1 - alpha) * self.learned[n] + alpha * final[n] for n in self.names}
        total = sum(mixed.values())
        self.learned = apply_floor({n: v / total for n, v in mixed.items()}, self.floor)

    def learn(self, settings, final: Mapping[str, float], verified: bool) -> bool:
        """A finished request's say in the running estimate: its final weights are
        folded in (:meth:`observe`) when it started from the learned weights
        (``init_weights="learned"``) with Hedge on and a verify pass moved them
        (``verified``). ``settings``: its GenerationSettings. Returns whether it was."""
        if settings.init_weights != "learned" or settings.hedge_lr is None or not verified:
            return False
        self.observe(final)
        return True

    # -- persistence -----------------------------------------------------------------
    @_locked
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "verifiers": self.names,
            "prior": self.prior,
            "learned": self.learned,
            "requests": self.requests,
            "floor": self.floor,
            "calibration": self.calibration,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the book as JSON (atomically: a crash leaves the old file)."""
        p = Path(path)
        if not p.parent.is_dir():
            raise SpecEMError(f"cannot write weights to {str(p)!r}: folder {str(p.parent)!r} does not exist")
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, p)
        return p

    @_locked
    def load(self, path: str | os.PathLike) -> None:
        """Read a book written by :meth:`save` (or by ``specem-fast calibrate``)."""
        p = Path(path)
        data = read_weights_file(p)
        names = data.get("verifiers")
        if not isinstance(names, list) or sorted(names) != sorted(self.names):
            raise SpecEMError(
                f"{str(p)!r} holds weights for {names!r}, but this ensemble's verifiers are {self.names}; "
                "use the same models, or calibrate this ensemble"
            )
        self.set_prior(data.get("prior"), data.get("calibration"))
        self.restore(data, f"{p}: learned weights")

    @_locked
    def restore(self, state: Mapping[str, Any], what: str = "learned weights") -> None:
        """Take the running estimate (``learned``, ``requests``) from a :meth:`to_dict`."""
        learned = state.get("learned")
        if learned is not None:
            fixed = apply_floor(_normalised(learned, self.names, what), self.floor)
            # a state this book wrote is already normalised and floored: keep it bit for bit,
            # so a resumed run continues exactly (renormalising moves the last digits)
            same = all(abs(fixed[n] - learned[n]) <= 1e-12 for n in self.names)
            self.learned = {n: float(learned[n]) for n in self.names} if same else fixed
        requests = state.get("requests", 0)
        self.requests = requests if isinstance(requests, int) and requests >= 0 else 0
