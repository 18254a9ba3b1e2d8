"""OpenAI-compatible HTTP server over the engine loop (needs the ``serve`` extra:
fastapi, uvicorn, sse-starlette, prometheus-client).

``create_app(ensemble)`` builds the FastAPI app; ``specem-fast serve`` runs it
with uvicorn.
"""

from .app import APIError, create_app
from .background import BackgroundServer

__all__ = ["APIError", "BackgroundServer", "create_app"]
