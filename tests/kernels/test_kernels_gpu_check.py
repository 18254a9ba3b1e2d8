"""The GPU check scripts must work when a GPU is finally lent: run their CPU smoke modes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(sys.platform != "linux", reason="Triton interpreter needs Linux")
def test_gpu_check_cpu_smoke_passes(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "correctness: OK" in report and "FAIL" not in report
    assert "ok   cascade bfloat16" in report  # the cascade section ran (fp64 flash-attn double)
    assert "ok   softcap attn bfloat16" in report and "ok   softcap decode bfloat16" in report
    assert "ok   softcap cascade bfloat16" in report  # gemma2-style soft-capping, every attention path
    assert "| branch_attention" in report and "| segment_score" in report


@pytest.mark.skipif(sys.platform != "linux", reason="Triton interpreter needs Linux")
def test_engine_cuda_check_cpu_smoke_passes(tmp_path, default_model_dirs):
    script = str(ROOT / "benchmarks" / "engine_cuda_check.py")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, script, "--build", str(tmp_path)], env=env, check=True, capture_output=True,
                   timeout=300)
    models = sorted(str(p) for p in tmp_path.iterdir())
    assert len(models) == 2
    proc = subprocess.run([sys.executable, script, "--cpu-smoke", *models], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "engine_cuda_check: OK" in proc.stdout and "ok   fp32 CUDA triton text == CPU torch text" in proc.stdout
    assert "ok   gemma2 soft-capping (cap 10.0" in proc.stdout and "ok   gemma2 soft-capping: fp32 greedy" in proc.stdout
