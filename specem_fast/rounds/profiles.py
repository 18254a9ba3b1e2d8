"""Profiles: named ways to run one ensemble's members, each with its own weights
(prior and learned) and default settings, e.g. one calibration per task.

Every ensemble has its default profile; more share its members and caches
(``Ensemble.add_profile``, ``serve --profile NAME=WEIGHTS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specem_fast.config import PRESET_CHOICES, GenerationSettings
from specem_fast.errors import SpecEMError
from specem_fast.rounds.weights import WeightBook


@dataclass(eq=False)
class Profile:
    name: str
    book: WeightBook
    preset: str = "reference"
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    weights_source: str | None = None  # where the prior came from (metadata)

    def load(self, path, source: str | None = None) -> None:
        """Prior and learned weights from a JSON file (``calibrate``, ``save_weights``)."""
        self.book.load(path)
        self.weights_source = source or str(path)

    def use_preset(self, preset: str) -> None:
        """Default settings for requests that give none (overrides apply on top):
        "reference", "recommended" (needs prior weights), or "auto" (recommended with
        prior weights, reference without)."""
        if preset not in PRESET_CHOICES:
            raise SpecEMError(f"preset must be one of {', '.join(PRESET_CHOICES)} (got {preset!r})")
        has_prior = self.book.prior is not None
        if preset == "auto":
            preset = "recommended" if has_prior else "reference"
        if preset == "recommended" and not has_prior:
            raise SpecEMError("preset 'recommended' starts from prior weights, and these members have none: give "
                              "weights=FILE (--weights) from `specem-fast calibrate`, or use preset 'reference'")
        self.preset, self.defaults = preset, GenerationSettings.preset(preset)

    def describe(self) -> dict:
        return {"profile": self.name, "preset": self.preset, "weights": self.weights_source}


class Profiles:
    """An ensemble's profiles by name: its default one and any added."""

    def __init__(self, default: Profile):
        self.default = default
        self.named: dict[str, Profile] = {}

    def add(self, name: str, book: WeightBook, weights=None, preset: str = "auto") -> Profile:
        if not isinstance(name, str) or not name.strip() or name == self.default.name or name in self.named:
            raise SpecEMError(f"profile name {name!r} is empty or taken; give each profile its own name")
        prof = Profile(name, book)
        if weights is not None:
            prof.load(weights)
        prof.use_preset(preset)
        self.named[name] = prof
        return prof

    def get(self, name: str | None) -> Profile:
        if name is None or name == self.default.name:
            return self.default
        if name not in self.named:
            known = ", ".join([self.default.name, *self.named])
            raise SpecEMError(f"no profile {name!r} in this ensemble ({known}); add it with add_profile")
        return self.named[name]
