"""specem_fast: fast training-free LLM ensembling (SpecEM / SpecFuse)."""

from .config import EngineConfig, GenerationSettings
from .errors import QueueFullError, RequestCancelled, SpecEMError
from .results import Candidate, GenerationResult, RoundRecord, SingleResult

__version__ = "0.1.0"


def __getattr__(name):  # keep `import specem_fast` light: torch loads on first use
    if name in ("Ensemble", "Segment"):
        from . import ensemble

        return getattr(ensemble, name)
    if name == "AsyncEnsemble":
        from .aio import AsyncEnsemble

        return AsyncEnsemble
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
