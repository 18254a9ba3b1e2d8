"""benchmarks/real_shapes.py must work when a GPU is lent: its CPU smoke mode, and the
runner hook it builds on (a ModelRunner around an already-built random model)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specem_fast.errors import SpecEMError
from specem_fast.model.modeling.args import ModelArgs
from specem_fast.model.modeling.loader import random_transformer, read_config
from specem_fast.model.runner import ModelRunner

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "real_shapes.py"


def _folder(root: Path, src: Path, **cfg) -> Path:
    """config.json (no weights) plus src's tokenizer."""
    root.mkdir()
    base = dict(model_type="qwen2", vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, eos_token_id=2)
    (root / "config.json").write_text(json.dumps({**base, **cfg}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, root / f)
    return root


def test_runner_takes_a_built_random_model(tmp_path, default_model_dirs):
    folder = _folder(tmp_path / "m", default_model_dirs["smollm2-135m-instruct"])
    args = ModelArgs.from_hf_config(read_config(folder))
    model = random_transformer(args, "cpu", torch.bfloat16, seed=3)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert bool((model.model.norm.weight == 1).all()) and bool((model.model.layers[0].self_attn.q_proj.bias == 0).all())
    std = model.lm_head.weight.float().std().item()
    assert 0.015 < std < 0.025
    again = random_transformer(args, "cpu", torch.bfloat16, seed=3)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)  # seeded

    runner = ModelRunner("m", folder, "cpu", "bfloat16", "torch", "off", model=model)
    assert runner.model is model and runner.codec.encode_segment("hello world")
    with pytest.raises(SpecEMError, match="not float32"):
        ModelRunner("m", folder, "cpu", "float32", "torch", "off", model=model)
    other = random_transformer(ModelArgs.from_hf_config({**read_config(folder), "num_hidden_layers": 3}), "cpu",
                               torch.bfloat16)
    with pytest.raises(SpecEMError, match="shapes differ"):
        ModelRunner("m", folder, "cpu", "bfloat16", "torch", "off", model=other)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.skipif(sys.platform != "linux", reason="Triton interpreter needs Linux")
def test_real_shapes_cpu_smoke(tmp_path, default_model_dirs):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", OUT=str(tmp_path / "out"))
    built = tmp_path / "real"
    subprocess.run([sys.executable, str(SCRIPT), "--build", str(built)], env=env, check=True, capture_output=True,
                   timeout=120)
    qwen = json.loads((built / "qwen2.5-7b" / "config.json").read_text())
    llama = json.loads((built / "llama3.1-8b" / "config.json").read_text())
    assert (qwen["hidden_size"], qwen["num_hidden_layers"], qwen["vocab_size"]) == (3584, 28, 152064)
    assert (llama["hidden_size"], llama["num_hidden_layers"], llama["vocab_size"]) == (4096, 32, 128256)
    assert not list(built.glob("*/*.safetensors"))  # no weights travel

    folders = [str(built / "qwen2.5-7b"), str(built / "llama3.1-8b")]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--time-budget", "300", *folders], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "out" / "real_shapes.md").read_text()
    for head in ("## members alone", "## ensemble of 2", "## segment scoring", "## compile=True", "## summary"):
        assert head in report
    assert "FAILED" not in report and "skipped, " not in report and "real_shapes: OK" in report
    data = json.loads((tmp_path / "out" / "real_shapes.json").read_text())
    assert data["failures"] == []
    names = ["qwen2.5-7b", "llama3.1-8b"]
    for n in names:
        a = data["alone"][n]
        assert all(_positive(a[k]) for k in ("prefill_ms", "decode_ms", "draft_loop_ms")), a
        assert a["new_tokens"] == data["new_tokens"]  # word-only heads: no stop token, the full length
    ens = data["sections"]["ensemble"]
    assert ens["stop_reason"] == "length" and ens["new_tokens"] == data["new_tokens"] and ens["text"].strip()
    for k in ("tokens_per_s", "target_tokens_per_s", "ratio", "ratio_draft_loop", "draft_ms_round", "verify_ms_round"):
        assert _positive(ens[k]), (k, ens[k])
    assert all(_positive(ens["draft_ms_step"][n]) for n in names)
    rows = data["sections"]["scoring"]
    assert len(rows) == 6
    for r in rows:
        assert all(_positive(r[k]) for k in ("kernel_us", "torch_chunked_us", "torch_full_us"))
        assert r.get("max_err", 0) < 1e-4  # float32 in the smoke run
    comp = data["sections"]["compile"]
    if "skipped" not in comp:  # no C++ compiler: compile=True refuses the CPU
        assert _positive(comp["tokens_per_s"]) and _positive(comp["ratio"])
        assert comp["text_same_as_compile_off"] is True and comp["warmup_text_same"] is True
        assert set(comp["alone"]) == set(names)
