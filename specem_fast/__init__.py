"""specem_fast: fast training-free LLM ensembling (SpecEM / SpecFuse)."""

import importlib

from specem_fast.config import EngineConfig, GenerationSettings
from specem_fast.errors import QueueFullError, RequestCancelled, SpecEMError
from specem_fast.results import Candidate, GenerationResult, RoundRecord, SingleResult

__version__ = "0.2.0"


# Keep `import specem_fast` light (torch loads on first use) and keep the package root
# out of the layering: the faces are imported by name on first access.
_LAZY = {"Ensemble": ".api.ensemble", "Segment": ".api.streaming", "AsyncEnsemble": ".api.aio"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)


__all__ = [
    "AsyncEnsemble",
    "Candidate",
    "EngineConfig",
    "Ensemble",
    "GenerationResult",
    "GenerationSettings",
    "QueueFullError",
    "RequestCancelled",
    "RoundRecord",
    "Segment",
    "SingleResult",
    "SpecEMError",
]
