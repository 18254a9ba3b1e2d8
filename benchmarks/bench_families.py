"""A MoE decode step against the dense model of the same active size (CPU, random weights).

For each MoE family (qwen3_moe, qwen2_moe, mixtral) a small config and a dense
twin (qwen3, qwen2, mistral) whose MLP has the MoE layer's *active* width
(top-k x expert width, plus the shared expert): same attention, same hidden
size, same layers, so the two differ only in the MLP's routing. Both run on
the native runtime (ModelRunner, torch kernels) with random weights; timed:

* decode step, batch 1 and batch 4 (one token per request: the gathered,
  sync-free expert path);
* verify forward: 3 candidates x 10 tokens packed after a 64-token prefix
  (30 tokens: the grouped path, each hit expert once over its tokens).

Prints ms per step (median of interleaved repeats) and the ratio MoE / dense.

    .venv/bin/python benchmarks/bench_families.py [--repeats 9] [--threads 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specem_fast.hub.fetch import model_dir  # noqa: E402
from specem_fast.model.kv_cache import KVCacheManager  # noqa: E402
from specem_fast.model.modeling.args import ModelArgs  # noqa: E402
from specem_fast.model.modeling.loader import random_transformer  # noqa: E402
from specem_fast.model.runner import ModelRunner, Run  # noqa: E402

VOCAB = 49152  # SmolLM2's tokenizer (the runner needs one; the LM head is not timed)
BASE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            max_position_embeddings=4096, vocab_size=VOCAB, rms_norm_eps=1e-6, tie_word_embeddings=True,
            hidden_act="silu")

# name -> (MoE config, dense twin config); dense intermediate = active MoE width
PAIRS = {
    "qwen3_moe E=32 k=4 (I=128)": (
        dict(model_type="qwen3_moe", num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128,
             intermediate_size=512, norm_topk_prob=True, head_dim=64),
        dict(model_type="qwen3", intermediate_size=4 * 128, head_dim=64)),
    "qwen3_moe E=64 k=8 (I=64)": (
        dict(model_type="qwen3_moe", num_experts=64, num_experts_per_tok=8, moe_intermediate_size=64,
             intermediate_size=512, norm_topk_prob=True, head_dim=64),
        dict(model_type="qwen3", intermediate_size=8 * 64, head_dim=64)),
    "qwen2_moe E=16 k=2 +shared": (
        dict(model_type="qwen2_moe", num_experts=16, num_experts_per_tok=2, moe_intermediate_size=256,
             shared_expert_intermediate_size=512, intermediate_size=1024),
        dict(model_type="qwen2", intermediate_size=2 * 256 + 512)),
    "mixtral E=8 k=2 (I=512)": (
        dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2, intermediate_size=512),
        dict(model_type="mistral", intermediate_size=2 * 512)),
}


def params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, active per token) without embeddings and LM head."""
    a = model.args
    total = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    if a.moe is None:
        return total, total
    per_expert = 3 * a.hidden_size * a.moe.intermediate_size
    routed = sum(a.moe.layers)
    return total, total - routed * (a.moe.num_experts - a.moe.top_k) * per_expert


def make_runner(cfg: dict, tok_dir: Path, root: Path, name: str, threads: int) -> ModelRunner:
    folder = root / name.replace(" ", "_").replace("=", "").replace("(", "").replace(")", "").replace("+", "")
    folder.mkdir(parents=True, exist_ok=True)
    full = {**BASE, **cfg}
    (folder / "config.json").write_text(json.dumps(full))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, folder / f)
    args = ModelArgs.from_hf_config(full)
    t0 = time.time()
    model = random_transformer(args, "cpu", torch.float32, seed=0, std=0.05)
    r = ModelRunner(name, folder, "cpu", "float32", "torch", model=model)
    r.cache = KVCacheManager([r.cache_shape], 4, 256)[name]
    prompt = list(range(1000, 1064))
    r.forward([Run(s, prompt, 0, 0, 0) for s in range(4)])
    for s in range(4):
        r.cache.append(s, len(prompt))
    print(f"  built {name} in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    return r


def steps(r: ModelRunner) -> dict:
    """The timed calls: each re-runs the same step (same cache positions), so repeats are alike."""
    n = 64
    return {
        "decode B=1": lambda: r.forward([Run(0, [2000], n, n, n)]),
        "decode B=4": lambda: r.forward([Run(s, [2000 + s], n, n, n) for s in range(4)]),
        "verify 3x10": lambda: r.forward([Run(1, list(range(3000 + 10 * c, 3010 + 10 * c)), n + 10 * c, n, n)
                                          for c in range(3)]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tok_dir = model_dir("smollm2-135m-instruct")
    t_start = time.time()
    rows = []
    hdr = f"{'MoE (vs dense twin of the same active size)':34s} {'step':12s} {'MoE ms':>8s} {'dense ms':>9s} " \
          f"{'ratio':>6s} {'MoE params':>11s} {'active':>8s} {'dense':>8s}"
    print(f"torch {torch.__version__}, CPU, {a.threads} threads, float32, {a.repeats} repeats (median)")
    print(hdr)
    print("-" * len(hdr), flush=True)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        root = Path(tmp)
        for pair, (moe_cfg, dense_cfg) in PAIRS.items():
            moe = make_runner(moe_cfg, tok_dir, root, pair + " moe", a.threads)
            dense = make_runner(dense_cfg, tok_dir, root, pair + " dense", a.threads)
            (mt, ma), (dt, _) = params(moe.model), params(dense.model)
            sm, sd = steps(moe), steps(dense)
            for what in sm:
                for _ in range(2):  # warm-up
                    sm[what]()
                    sd[what]()
                tm, td = [], []
                for _ in range(a.repeats):  # interleaved, so load on the machine hits both alike
                    t0 = time.perf_counter()
                    sm[what]()
                    tm.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    sd[what]()
                    td.append(time.perf_counter() - t0)
                m_ms, d_ms = statistics.median(tm) * 1e3, statistics.median(td) * 1e3
                r = dict(pair=pair, step=what, moe_ms=m_ms, dense_ms=d_ms, ratio=m_ms / d_ms,
                         moe_params=mt, moe_active=ma, dense_params=dt)
                rows.append(r)
                print(f"{r['pair']:34s} {r['step']:12s} {r['moe_ms']:8.2f} {r['dense_ms']:9.2f} {r['ratio']:6.2f} "
                      f"{r['moe_params'] / 1e6:10.1f}M {r['moe_active'] / 1e6:7.1f}M {r['dense_params'] / 1e6:7.1f}M",
                      flush=True)
    print("ratio = MoE ms / dense ms; params without embeddings and LM head; "
          f"{time.time() - t_start:.0f}s in all")
    if a.out:
        a.out.write_text(json.dumps(dict(threads=a.threads, repeats=a.repeats, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
