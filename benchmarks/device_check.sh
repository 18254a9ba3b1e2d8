#!/usr/bin/env bash
# Every GPU check in one run, for a session that is lent a device machine:
#   1. kernels: benchmarks/gpu_check.py --no-timing: every kernel vs fp64 references
#      (writes $OUT/gpu_check.md), Gemma-2-style attention soft-capping included (branch
#      kernel, decode attention, and the cascade where flash-attn imports);
#      GPU_CHECK_ARGS= (empty) adds its timing table
#      (kernel vs eager torch over many shapes, a few more minutes: run that step alone);
#   2. engine: benchmarks/engine_cuda_check.py: the engine on CUDA with two tiny models, and a tiny
#      gemma2 (attention soft-capping, alternating windows; made there, no weights travel) on CUDA
#      vs the CPU torch path;
#   3. real_shapes: benchmarks/real_shapes.py: Qwen2.5-7B and Llama-3.1-8B shapes with
#      random bf16 weights: members alone vs inside the ensemble, the verify pass, tokens/s
#      against 1/(sum of the members' per-token times), the scoring kernel vs eager torch
#      at those shapes, compile on and off (writes $OUT/real_shapes.md and .json).
# STEPS="kernels engine real_shapes" (the default) picks steps. Installs nothing. Carry
# .device, built beforehand (no weights travel: real_shapes builds its models on the GPU):
#   python benchmarks/engine_cuda_check.py --build .device/models
#   python benchmarks/real_shapes.py --build .device/real_shapes
# At most 9 minutes on an H200 (step timeouts 150 + 100 + 290 s; real_shapes keeps to
# REAL_SHAPES_BUDGET=260 s and skips what does not fit); give it timeout_s 600.
# The image has no flash-attn: the cascade path is checked only where it is installed.
set -u
OUT=${OUT:-out}
export OUT
mkdir -p "$OUT"
PY=${PYTHON:-python3}  # the device image's python3 holds torch, triton, transformers
STEPS=" ${STEPS:-kernels engine real_shapes} "
BUDGET=${REAL_SHAPES_BUDGET:-260}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
$PY -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed"
rc=0
if [[ $STEPS == *" kernels "* ]]; then
  # shellcheck disable=SC2086  # GPU_CHECK_ARGS is a word list
  timeout 150 $PY benchmarks/gpu_check.py ${GPU_CHECK_ARGS---no-timing} 2>&1 | tee "$OUT/gpu_check.log"
  rc=$((rc | PIPESTATUS[0]))
fi
if [[ $STEPS == *" engine "* ]]; then
  if ls .device/models/*/config.json >/dev/null 2>&1; then
    timeout 100 $PY benchmarks/engine_cuda_check.py .device/models/* 2>&1 | tee "$OUT/engine_cuda_check.log"
    rc=$((rc | PIPESTATUS[0]))
  else
    echo "no .device/models carried: engine check skipped"
  fi
fi
if [[ $STEPS == *" real_shapes "* ]]; then
  if ls .device/real_shapes/*/config.json >/dev/null 2>&1; then
    timeout $((BUDGET + 30)) $PY benchmarks/real_shapes.py --time-budget "$BUDGET" .device/real_shapes/* 2>&1 \
      | tee "$OUT/real_shapes.log"
    rc=$((rc | PIPESTATUS[0]))
  else
    echo "no .device/real_shapes carried: real-shape check skipped"
  fi
fi
echo "device_check exit status $rc"
exit $rc
