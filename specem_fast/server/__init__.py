"""OpenAI-compatible HTTP server over the engine loop (needs the ``serve`` extra:
fastapi, uvicorn, prometheus-client).

``create_app(ensemble)`` builds the FastAPI app; ``specem-fast serve`` runs it
with uvicorn.
"""

from .app import create_app
from .background import BackgroundServer
from .errors import APIError
from .middleware import DEFAULT_MAX_BODY_BYTES

__all__ = ["APIError", "BackgroundServer", "DEFAULT_MAX_BODY_BYTES", "create_app"]
