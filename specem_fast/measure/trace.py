"""Round traces: every round of every request as one JSON line.

``write_trace(path, results)`` is what ``generate --trace``, ``eval --trace`` and
``bench --trace`` call; ``read_trace(path)`` reads it back (for ``plot``), also
gzip-compressed (how finished traces are kept in the repository). One line per
round::

    {"type": "round", "request": "gsm8k-0", "round": 1, "winner_model": "...",
     "winner": 0, "weights": {...}, "scores": {...}, "raw_scores": {...},
     "combined": [...], "candidates": [{"model", "text", "ended_with_stop",
     "draft_tokens"}], "seconds": {"draft", "verify", "commit"},
     "drafters": [...], "verified": true}
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

from specem_fast.errors import SpecEMError

__all__ = ["write_trace", "trace_lines", "read_trace", "iter_requests", "repair_jsonl_tail", "check_appendable"]


def repair_jsonl_tail(path: str | os.PathLike) -> str:
    """Make an append-only JSONL file end on a line boundary again.

    A process killed mid-write can leave a last line without its newline. When
    that tail is a whole JSON value only the newline is missing and it is added;
    otherwise the incomplete tail (and nothing before it) is truncated. Returns
    ``"ok"``, ``"newline-added"`` or ``"truncated N bytes"``.
    """
    p = Path(path)
    if not p.exists():
        return "ok"
    size = p.stat().st_size
    if size == 0:
        return "ok"
    with open(p, "rb") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return "ok"
        # find the last newline, reading backwards in blocks
        pos, block, cut = size, 1 << 16, 0
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                cut = start + idx + 1
                break
            pos = start
        fh.seek(cut)
        tail = fh.read()
    try:
        json.loads(tail.decode("utf-8"))
        whole = True
    except (UnicodeDecodeError, json.JSONDecodeError):
        whole = False
    if whole:
        with open(p, "ab") as fh:
            fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        return "newline-added"
    with open(p, "r+b") as fh:
        fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())
    return f"truncated {size - cut} bytes"


def _as_dict(result: Any) -> dict[str, Any]:
    if isinstance(result, dict):
        return result
    if hasattr(result, "to_dict"):
        return result.to_dict()
    raise TypeError(f"expected a GenerationResult or its dict, got {type(result).__name__}")


def trace_lines(results: Any, labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The trace records (dicts) of one result or a list of results."""
    if not isinstance(results, (list, tuple)):
        results = [results]
    if labels is not None and len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    out = []
    for i, res in enumerate(results):
        d = _as_dict(res)
        request = str(labels[i]) if labels is not None else str(i)
        for r in d.get("rounds", []):
            out.append(
                {
                    "type": "round",
                    "request": request,
                    "round": r["index"],
                    "winner_model": r["winner_model"],
                    "winner": r["winner"],
                    "weights": r["weights"],
                    "scores": r["scores"],
                    "raw_scores": r["raw_scores"],
                    "combined": r["combined"],
                    "candidates": r["candidates"],
                    "accepted": r.get("accepted", ""),
                    "seconds": r["seconds"],
                    "drafters": r.get("drafters", [c["model"] for c in r["candidates"]]),
                    "verified": r.get("verified", True),
                    "verify_tokens": r.get("verify_tokens", {}),
                }
            )
    return out


def write_trace(
    path: str | os.PathLike,
    results: Any,
    *,
    labels: Sequence[str] | None = None,
    append: bool = False,
) -> int:
    """Write the rounds of ``results`` (one GenerationResult or a list) as JSONL.

    ``labels`` name each result's request in the trace (default: its index).
    ``append=True`` adds to an existing file (eval/bench stream their traces).
    Returns the number of lines written.
    """
    lines = trace_lines(results, labels)
    p = Path(path)
    if p.parent and not p.parent.exists():
        raise SpecEMError(f"cannot write trace {str(p)!r}: folder {str(p.parent)!r} does not exist")
    data = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in lines).encode("utf-8")
    if append:
        check_appendable(p)
    try:
        if append:
            repair_jsonl_tail(p)
        with open(p, "ab" if append else "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise SpecEMError(f"cannot write trace {str(p)!r}: {exc.strerror}") from None
    return len(lines)


_GZIP_MAGIC = b"\x1f\x8b"


def check_appendable(path: str | os.PathLike) -> None:
    """Refuse a gzip-compressed trace before a run would append plain lines to it."""
    try:
        with open(path, "rb") as fh:
            packed = fh.read(2) == _GZIP_MAGIC
    except OSError:
        return  # missing (created on first write) or unreadable (reported by the write)
    if packed:
        raise SpecEMError(f"cannot append to trace {str(path)!r}: it is gzip-compressed; "
                          "decompress it first (gzip -d FILE) or choose another --trace file")


def read_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Round records of a trace file, plain or gzip-compressed (a torn last line is ignored)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SpecEMError(f"cannot read trace {str(p)!r}: {exc.strerror}") from None
    if raw[:2] == _GZIP_MAGIC:  # decided by content, not by the file name
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            raise SpecEMError(
                f"cannot read trace {str(p)!r}: a damaged or incomplete gzip file; "
                "compress the plain trace again (gzip -k FILE)") from None
    records = []
    lines = raw.split(b"\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if lineno == len(lines):  # torn tail of a killed run
                break
            raise SpecEMError(f"{p}:{lineno}: not a trace record (invalid JSON)") from None
        if isinstance(rec, dict) and rec.get("type") == "round":
            records.append(rec)
    return records


def iter_requests(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Round records grouped by request, in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(str(rec.get("request", "0")), []).append(rec)
    return groups
