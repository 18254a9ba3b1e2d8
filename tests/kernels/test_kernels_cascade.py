"""Cascade attention (prefix via flash-attn, branches via our kernel, LSE merge)
vs the fp64 reference of the whole packed-branch attention.

flash-attn needs CUDA, so on CPU its place is taken by an fp64 double that
keeps its contract (tests/flash_double.py); the branch kernel and the merge
kernel run for real through the Triton interpreter. On a GPU with flash-attn
installed, benchmarks/gpu_check.py runs the same comparison with the real
library.
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402

import pytest  # noqa: E402
from flash_double import flash_attn_with_kvcache_double  # noqa: E402
from test_kernels_branch_attention import ATOL, DEV, DTYPES, RTOL, make_batch  # noqa: E402

from specem_fast.kernels import (  # noqa: E402
    branch_attention_lse_reference,
    branch_attention_reference,
    cascade_attention,
    plan_cascade_attention,
)

cascade_mod = importlib.import_module("specem_fast.kernels.cascade")
ba_mod = importlib.import_module("specem_fast.kernels.branch_attention")
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _double_backend(monkeypatch):
    monkeypatch.setattr(ba_mod, "POISON_SCRATCH", True)
    monkeypatch.setattr(cascade_mod, "_backend",
                        cascade_mod.PrefixBackend("fp64 double", flash_attn_with_kvcache_double, ALL_DTYPES))


def check(batch, scale, dtype, plan=None):
    q, kc, vc, slot, qpos, plen, bstart = batch
    out = torch.full_like(q, float("nan"))
    got, lse = cascade_attention(q, kc, vc, slot, qpos, plen, bstart, scale, out=out, return_lse=True, plan=plan)
    assert got is out
    assert not torch.isnan(got).any() and not torch.isnan(lse).any(), "unwritten (NaN) elements"
    ref = branch_attention_reference(q.double(), kc.double(), vc.double(), slot, qpos, plen, bstart, scale)
    torch.testing.assert_close(got.double(), ref, atol=ATOL[dtype], rtol=RTOL[dtype])
    ref_lse = branch_attention_lse_reference(q, kc, slot, qpos, plen, bstart, scale)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4 if dtype == torch.float32 else 2e-3, rtol=1e-4)
    plain = cascade_attention(q, kc, vc, slot, qpos, plen, bstart, scale)
    torch.testing.assert_close(plain, got, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "prefixes,k,w,hq,hkv,d",
    [
        ([37], 4, 5, 4, 2, 64),  # GQA 2
        ([5, 90, 0, 61], 3, 4, 6, 2, 64),  # ragged prefixes, one request without a prefix
        ([70], 1, 1, 2, 2, 128),  # K=1, one candidate of one token
        ([20, 45], 2, 3, 2, 1, 256),  # MQA, head_dim 256
    ],
)
def test_cascade_matches_reference(dtype, prefixes, k, w, hq, hkv, d):
    lmax = max(prefixes) + k * w + 8
    batch = make_batch(prefixes, k, w, hq, hkv, d, lmax, dtype=dtype, seed=len(prefixes) + d, shuffle=True)
    check(batch, d**-0.5, dtype)


def test_stale_cache_between_prefix_and_branches_and_reused_plan():
    # scratch branches sit above a gap of stale (random) entries; NaN past the last query
    batch = make_batch([33, 50], 3, 4, 4, 2, 64, 110, gap=9, seed=3)
    q, kc, _, slot, qpos, plen, bstart = batch
    plan = plan_cascade_attention(q, kc, slot, qpos, plen, bstart)
    assert plan.num_rows == 2 and plan.max_prefix == 50
    check(batch, 0.125, torch.float32, plan=plan)
    check(batch, 0.3, torch.float32, plan=plan)  # the same plan serves every layer


def test_one_slot_with_two_prefix_lengths_gets_two_rows():
    q, kc, vc, slot, qpos, plen, bstart = make_batch([40], 2, 3, 2, 1, 64, 64, lengths=[3, 2], seed=5)
    plen = plen.clone()
    plen[:3] = 25  # the first candidate sees a shorter prefix
    plan = plan_cascade_attention(q, kc, slot, qpos, plen, bstart)
    assert plan.num_rows == 2 and sorted(plan.seqlens.tolist()) == [25, 40]
    check((q, kc, vc, slot, qpos, plen, bstart), 0.2, torch.float32, plan=plan)


def test_all_prefixes_empty_is_the_branch_kernel():
    q, kc, vc, slot, qpos, plen, bstart = make_batch([0, 0], 2, 4, 2, 2, 64, 16, seed=7)
    check((q, kc, vc, slot, qpos, plen, bstart), 0.125, torch.float32)


def test_bad_inputs_are_refused(monkeypatch):
    q, kc, vc, slot, qpos, plen, bstart = make_batch([30], 2, 3, 2, 1, 64, 48, seed=1)
    with pytest.raises(ValueError, match="sliding window"):
        cascade_attention(q, kc, vc, slot, qpos, plen, bstart, 0.1, 16)
    other = plan_cascade_attention(q[:2], kc, slot[:2], qpos[:2], plen[:2], bstart[:2])
    with pytest.raises(ValueError, match="plan does not match"):
        cascade_attention(q, kc, vc, slot, qpos, plen, bstart, 0.1, plan=other)
    with pytest.raises(ValueError, match="prefix_len must lie"):
        plan_cascade_attention(q, kc, slot, qpos, plen + 100, bstart)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        cascade_attention(q[..., :32].contiguous(), kc, vc, slot, qpos, plen, bstart, 0.1)
    monkeypatch.setattr(cascade_mod, "_backend",
                        cascade_mod.PrefixBackend("flash-attn", flash_attn_with_kvcache_double,
                                                  (torch.float16, torch.bfloat16)))
    with pytest.raises(ValueError, match="flash-attn takes float16, bfloat16"):
        cascade_attention(q, kc, vc, slot, qpos, plen, bstart, 0.1)
    monkeypatch.setattr(cascade_mod, "_backend", None)
    with pytest.raises(RuntimeError, match="flash-attn is not installed"):
        cascade_attention(q, kc, vc, slot, qpos, plen, bstart, 0.1)


@pytest.mark.skipif(DEV != "cpu", reason="checks the import guard on a machine without flash-attn")
def test_backend_is_none_without_flash_attn(monkeypatch):
    monkeypatch.setattr(cascade_mod, "_backend", cascade_mod._UNSET)
    found = [m for m in ("flash_attn_interface", "flash_attn") if importlib.util.find_spec(m)]
    backend = cascade_mod.prefix_backend()
    if not found:
        assert backend is None
    else:
        assert backend.name == {"flash_attn_interface": "flash-attn-3", "flash_attn": "flash-attn"}[found[0]]


def test_branch_starting_inside_its_prefix_is_refused():
    """Same refusal, same message as branch_attention: the branch pass runs with
    prefix_len 0, so keys in [branch_start, prefix_len) would count twice."""
    from test_kernels_branch_attention import BRANCH_BEFORE_PREFIX

    batch = make_batch([30, 12], 2, 3, 2, 1, 64, 48, seed=11)
    q, kc, vc, slot, qpos, plen, bstart = batch
    bad = bstart.clone()
    bad[0] = plen[0] - 5
    with pytest.raises(ValueError, match=BRANCH_BEFORE_PREFIX):
        cascade_attention(q, kc, vc, slot, qpos, plen, bad, 0.1)
    with pytest.raises(ValueError, match=BRANCH_BEFORE_PREFIX):
        plan_cascade_attention(q, kc, slot, qpos, plen, bad)
    check(batch, 0.1, torch.float32)  # valid inputs still match the reference
