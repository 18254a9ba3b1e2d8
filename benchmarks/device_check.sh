#!/usr/bin/env bash
# Every GPU check in one run, for a session that is lent a device machine:
#   1. benchmarks/gpu_check.py: kernels vs fp64 references, then the timing table
#      (kernel vs eager torch, time and peak memory) -- writes $OUT/gpu_check.md;
#   2. benchmarks/engine_cuda_check.py: the engine on CUDA with two tiny models.
# Installs nothing. Carry .device/models, built beforehand with
#   python benchmarks/engine_cuda_check.py --build .device/models
# About 6 minutes on an H200 including Triton compiles; give it timeout_s >= 480.
# The image has no flash-attn: the cascade path is checked only where it is installed.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}  # the device image's python3 holds torch, triton, transformers
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
$PY -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed"
rc=0
timeout 330 $PY benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
rc=$((rc | PIPESTATUS[0]))
if ls .device/models/*/config.json >/dev/null 2>&1; then
  timeout 150 $PY benchmarks/engine_cuda_check.py .device/models/* 2>&1 | tee "$OUT/engine_cuda_check.log"
  rc=$((rc | PIPESTATUS[0]))
else
  echo "no .device/models carried: engine check skipped"
fi
echo "device_check exit status $rc"
exit $rc
