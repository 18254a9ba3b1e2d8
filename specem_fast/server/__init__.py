"""OpenAI-compatible HTTP server over the engine loop (needs the ``serve`` extra:
fastapi, uvicorn, prometheus-client).

``create_app(ensemble)`` builds the FastAPI app; ``specem-fast serve`` runs it
with uvicorn.
"""

from specem_fast.server.app import create_app
from specem_fast.server.background import BackgroundServer
from specem_fast.server.errors import APIError
from specem_fast.server.middleware import DEFAULT_MAX_BODY_BYTES

__all__ = ["APIError", "BackgroundServer", "DEFAULT_MAX_BODY_BYTES", "create_app"]
