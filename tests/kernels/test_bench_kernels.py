"""Benchmarks (pytest-benchmark): the torch paths of the verification kernels at real shapes.

CI runs them once as plain tests (addopts has --benchmark-disable); numbers come from
`pytest tests/kernels/test_bench_kernels.py tests/rounds/test_bench_round.py --benchmark-enable`.
Shapes are a round of three candidates x window 10 (N=30 rows) against the default
models' real LM heads and attention layouts.
"""

from __future__ import annotations

import pytest
import torch

from specem_fast.kernels import reference as ref

# (name, hidden size, vocabulary) of the default models' LM heads
HEADS = [("smollm2", 576, 49152), ("gemma3", 640, 262144)]
# (name, q heads, kv heads, head dim, sliding window) of their attention
ATTN = [("smollm2", 9, 3, 64, 0), ("qwen2.5", 14, 2, 64, 0), ("gemma3", 4, 1, 256, 512)]


def _problem(d: int, v: int, n: int = 30, cands: int = 3):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.05
    targets = torch.randint(0, v, (n,), generator=g)
    offsets = torch.linspace(0, n, cands + 1).long()
    return hidden, weight, targets, offsets


@pytest.mark.parametrize("name, d, v", HEADS, ids=[h[0] for h in HEADS])
def test_bench_segment_score_torch(benchmark, name, d, v):
    h, w, t, o = _problem(d, v)
    out = benchmark(ref.segment_score_torch, h, w, t, o)
    want = torch.log_softmax(h.double() @ w.double().T, -1).gather(1, t[:, None])[:, 0]
    assert torch.allclose(out.token_logprob.double(), want, atol=1e-3)


def test_bench_segment_score_reference(benchmark):
    h, w, t, o = _problem(576, 49152)
    out = benchmark(ref.segment_score_reference, h, w, t, o)
    assert out.mean_logprob.shape == (3,)


@pytest.mark.parametrize("name, hq, hkv, dh, window", ATTN, ids=[a[0] for a in ATTN])
def test_bench_branch_attention_reference(benchmark, name, hq, hkv, dh, window):
    """Verify pass of one request: 30 packed branch tokens over a 512-token prefix."""
    g = torch.Generator().manual_seed(0)
    prefix, n, lmax = 512, 30, 1024
    k = torch.randn(1, hkv, lmax, dh, generator=g)
    v = torch.randn(1, hkv, lmax, dh, generator=g)
    q = torch.randn(n, hq, dh, generator=g)
    starts = [prefix + 10 * (i // 10) for i in range(n)]  # three branches of 10 tokens
    qpos = torch.arange(prefix, prefix + n)
    args = (q, k, v, torch.zeros(n, dtype=torch.long), qpos, torch.full((n,), prefix), torch.tensor(starts),
            dh**-0.5, window)
    out = benchmark(ref.branch_attention_reference, *args)
    assert out.shape == (n, hq, dh) and torch.isfinite(out).all()
