"""specem_fast: fast training-free LLM ensembling (SpecEM / SpecFuse)."""

import importlib

from .config import EngineConfig, GenerationSettings
from .errors import QueueFullError, RequestCancelled, SpecEMError
from .results import Candidate, GenerationResult, RoundRecord, SingleResult

__version__ = "0.1.0"


# Keep `import specem_fast` light (torch loads on first use) and keep the package root
# out of the layering: the faces are imported by name on first access.
_LAZY = {"Ensemble": ".ensemble", "Segment": ".release", "AsyncEnsemble": ".aio"}


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
