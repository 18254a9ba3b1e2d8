"""User-facing errors.

Anything a user can cause (bad settings, a missing model, an unreadable file)
raises :class:`SpecEMError` with a message naming the problem and the fix. The
CLI prints such messages without a traceback and exits non-zero; anything else
is a bug and keeps its traceback.
"""


class SpecEMError(Exception):
    """A problem with the user's input or environment, with a fix in the message."""


class CacheFullError(SpecEMError):
    """The KV-cache budget cannot hold what a request needs."""


class QueueFullError(SpecEMError):
    """The engine's waiting queue is full (``max_waiting`` requests wait); retry later (HTTP 429)."""


class RequestCancelled(SpecEMError):
    """The request was cancelled before it finished."""
