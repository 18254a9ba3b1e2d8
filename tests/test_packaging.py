"""Packaging for embedding: ranges in pyproject, exact pins only in constraints.txt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dependencies_are_ranges_and_pins_live_in_constraints():
    project = _pyproject()["project"]
    deps = project["dependencies"]
    assert not [d for d in deps if "==" in d], deps  # installable next to another stack's torch
    names = {re.split(r"[<>=!;\[ ]", d, maxsplit=1)[0] for d in deps}
    assert {"torch", "transformers"} <= names
    assert not names & {"gguf", "accelerate", "triton", "matplotlib", "emoji", "syllapy"}
    extras = project["optional-dependencies"]
    assert {"gguf", "accelerate"} <= {re.split(r"[<>=]", d)[0] for d in extras["fetch"]}
    assert {"emoji", "syllapy"} <= {re.split(r"[<>=]", d)[0] for d in extras["eval"]}
    assert "ruff" in {re.split(r"[<>=]", d)[0] for d in extras["dev"]}
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert pins["torch"] == "2.13.0" and pins["transformers"].startswith("5.")
    assert {"fastapi", "uvicorn", "prometheus-client"} <= {
        re.split(r"[<>=]", d)[0] for d in extras["serve"]}
    assert "sse-starlette" not in (ROOT / "pyproject.toml").read_text()  # the server's own SSE response
    for extra in ("fetch", "eval", "dev", "serve"):
        for d in extras[extra]:
            assert re.split(r"[<>=;]", d)[0].strip() in pins, d
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup and "fetch" in setup and "eval" in setup and "serve" in setup
    assert "ruff check" in (ROOT / ".ci" / "run").read_text()


def test_typed_package_and_lint_config():
    cfg = _pyproject()
    assert (ROOT / "specem_fast" / "py.typed").is_file()
    assert "py.typed" in cfg["tool"]["setuptools"]["package-data"]["specem_fast"]
    assert cfg["tool"]["ruff"]["line-length"] == 120
