"""Attention logit soft-capping (Gemma-2: ``cap * tanh(scale * q.k / cap)`` before
masking and softmax) in every attention path, against an fp64 oracle.

The oracle here is written out densely (einsum, tanh, mask, softmax) so the torch
reference's capped path is itself checked; the Triton branch kernel and the
cascade (branch kernel + fp64 flash-attn double with its ``softcap`` + merge) run
through the interpreter on CPU.
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402
from flash_double import flash_attn_with_kvcache_double  # noqa: E402
from test_kernels_branch_attention import ATOL, RTOL, make_batch  # noqa: E402

from specem_fast.kernels import (  # noqa: E402
    branch_attention,
    branch_attention_lse_reference,
    branch_attention_reference,
    cascade_attention,
    decode_attention,
    visibility_mask,
)

ba_mod = importlib.import_module("specem_fast.kernels.branch_attention")
cascade_mod = importlib.import_module("specem_fast.kernels.cascade")
Config = ba_mod.BranchAttentionConfig
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _poison_and_double(monkeypatch):
    monkeypatch.setattr(ba_mod, "POISON_SCRATCH", True)
    monkeypatch.setattr(cascade_mod, "_backend",
                        cascade_mod.PrefixBackend("fp64 double", flash_attn_with_kvcache_double, ALL_DTYPES))


def dense_oracle(q, kc, vc, slot, qpos, plen, bstart, scale, window, cap):
    """(out, lse) in fp64, one query at a time, written from the definition."""
    q, kc, vc = q.double().cpu(), kc.double().cpu(), vc.double().cpu()
    slot, qpos, plen, bstart = (x.long().cpu() for x in (slot, qpos, plen, bstart))
    hq, hkv = q.shape[1], kc.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float64)
    for t in range(q.shape[0]):
        nk = int(qpos[t]) + 1
        vis = visibility_mask(qpos[t : t + 1], plen[t : t + 1], bstart[t : t + 1], nk, window)[0]
        k = kc[slot[t], :, :nk].repeat_interleave(hq // hkv, dim=0)  # [Hq, nk, D]
        v = vc[slot[t], :, :nk].repeat_interleave(hq // hkv, dim=0)
        s = torch.einsum("hd,hkd->hk", q[t], k) * scale
        if cap:
            s = cap * torch.tanh(s / cap)
        s = s.masked_fill(~vis[None, :], float("-inf"))
        lse[t] = torch.logsumexp(s, dim=-1)
        out[t] = torch.einsum("hk,hkd->hd", torch.softmax(s, dim=-1), v)
    return out, lse


def test_reference_softcap_matches_the_definition_and_changes_the_result():
    batch = make_batch([30, 12], 3, 4, 4, 2, 64, lmax=64, dtype=torch.float64, seed=1)
    q, kc, vc, slot, qpos, plen, bstart = batch
    q = q * 3  # scores well past the cap
    for window in (0, 9):
        want, want_lse = dense_oracle(q, kc, vc, slot, qpos, plen, bstart, 0.125, window, 2.0)
        got = branch_attention_reference(q, kc, vc, slot, qpos, plen, bstart, 0.125, window, softcap=2.0)
        torch.testing.assert_close(got.cpu(), want, atol=1e-12, rtol=1e-12)
        lse = branch_attention_lse_reference(q, kc, slot, qpos, plen, bstart, 0.125, window, softcap=2.0)
        torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-12, rtol=1e-12)
        plain = branch_attention_reference(q, kc, vc, slot, qpos, plen, bstart, 0.125, window)
        assert (plain - got).abs().max() > 0.05  # the cap matters at these scores
        for off in (None, 0, 0.0):  # off means SDPA, bit for bit
            same = branch_attention_reference(q, kc, vc, slot, qpos, plen, bstart, 0.125, window, softcap=off)
            torch.testing.assert_close(same, plain, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_reference_softcap_low_precision_computes_in_fp32(dtype):
    batch = make_batch([20], 2, 3, 4, 1, 64, lmax=32, dtype=dtype, seed=2)
    q, kc, vc, slot, qpos, plen, bstart = batch
    got = branch_attention_reference(q, kc, vc, slot, qpos, plen, bstart, 0.2, softcap=3.0)
    assert got.dtype == dtype
    want, _ = dense_oracle(q, kc, vc, slot, qpos, plen, bstart, 0.2, 0, 3.0)
    torch.testing.assert_close(got.double().cpu(), want, atol=ATOL[dtype], rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize(
    "prefixes,k,w,hq,hkv,d,window,config,cap",
    [
        pytest.param([40, 7], 3, 4, 4, 2, 64, 0, None, 1.5, id="gqa2-cap1.5"),
        pytest.param([90], 2, 3, 4, 2, 128, 0, Config(64, 32, num_splits=3), 5.0, id="d128-split3-cap5"),
        pytest.param([60, 3], 2, 4, 2, 1, 256, 24, Config(32, 32, num_splits=2), 2.0,
                     id="gemma2-d256-window-split2"),
    ],
)
def test_branch_attention_softcap_matches_reference(prefixes, k, w, hq, hkv, d, window, config, cap, dtype):
    q, kc, vc, slot, qpos, plen, bstart = make_batch(prefixes, k, w, hq, hkv, d, lmax=128, dtype=dtype,
                                                     seed=sum(prefixes) + d, shuffle=True)
    q = (q.float() * 2).to(dtype)  # push scores past the cap
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    got, lse = branch_attention(q, kc, vc, slot, qpos, plen, bstart, scale, window, out=out, return_lse=True,
                                config=config, softcap=cap)
    assert got is out and not torch.isnan(got).any() and not torch.isnan(lse).any()
    ref = branch_attention_reference(q.double(), kc.double(), vc.double(), slot, qpos, plen, bstart, scale, window,
                                     softcap=cap)
    torch.testing.assert_close(got.double(), ref, atol=ATOL[dtype], rtol=RTOL[dtype])
    ref_lse = branch_attention_lse_reference(q, kc, slot, qpos, plen, bstart, scale, window, softcap=cap)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4 if dtype == torch.float32 else 2e-3, rtol=1e-5)
    if dtype == torch.float32:
        plain = branch_attention_reference(q.double(), kc.double(), vc.double(), slot, qpos, plen, bstart, scale,
                                           window)
        assert (plain - ref).abs().max() > 0.05  # a kernel ignoring the cap would fail above


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t).split(".")[-1])
def test_cascade_softcap_matches_reference(dtype):
    q, kc, vc, slot, qpos, plen, bstart = make_batch([37, 0, 21], 3, 3, 4, 2, 64, lmax=64, dtype=dtype, seed=4,
                                                     shuffle=True)
    q = (q.float() * 2).to(dtype)
    got, lse = cascade_attention(q, kc, vc, slot, qpos, plen, bstart, 0.125, return_lse=True, softcap=1.5)
    ref = branch_attention_reference(q.double(), kc.double(), vc.double(), slot, qpos, plen, bstart, 0.125,
                                     softcap=1.5)
    torch.testing.assert_close(got.double(), ref, atol=ATOL[dtype], rtol=RTOL[dtype])
    ref_lse = branch_attention_lse_reference(q, kc, slot, qpos, plen, bstart, 0.125, softcap=1.5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4 if dtype == torch.float32 else 2e-3, rtol=1e-4)


def test_cascade_passes_softcap_to_flash_attn_only_when_on(monkeypatch):
    seen = []

    def spy(*a, **kw):
        seen.append(kw.get("softcap"))
        return flash_attn_with_kvcache_double(*a, **kw)

    monkeypatch.setattr(cascade_mod, "_backend", cascade_mod.PrefixBackend("spy", spy, ALL_DTYPES))
    q, kc, vc, slot, qpos, plen, bstart = make_batch([20], 2, 2, 2, 1, 64, lmax=32, seed=5)
    cascade_attention(q, kc, vc, slot, qpos, plen, bstart, 0.125)
    cascade_attention(q, kc, vc, slot, qpos, plen, bstart, 0.125, softcap=None)
    cascade_attention(q, kc, vc, slot, qpos, plen, bstart, 0.125, softcap=4.0)
    assert seen == [None, None, 4.0]  # no softcap keyword for flash-attn builds older than 2.6


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t).split(".")[-1])
def test_decode_attention_softcap_matches_reference(window, dtype):
    g = torch.Generator().manual_seed(6)
    s_, hkv, hq, lmax, d = 3, 2, 4, 24, 64
    kc = torch.randn(s_, hkv, lmax, d, generator=g).to(dtype)
    vc = torch.randn(s_, hkv, lmax, d, generator=g).to(dtype)
    slot = torch.tensor([2, 0, 1])
    pos = torch.tensor([11, 3, 17])
    for s, p in zip(slot.tolist(), pos.tolist()):
        kc[s, :, p + 1 :] = float("nan")
        vc[s, :, p + 1 :] = float("nan")
    q = (torch.randn(3, hq, d, generator=g) * 3).to(dtype)
    got = decode_attention(q, kc, vc, slot, pos, torch.arange(20), 0.125, window, softcap=2.0)
    assert got.dtype == dtype and not torch.isnan(got).any()
    ref = branch_attention_reference(q.double(), kc.double(), vc.double(), slot, pos, pos, pos, 0.125, window,
                                     softcap=2.0)
    torch.testing.assert_close(got.double(), ref, atol=ATOL[dtype], rtol=RTOL[dtype])
    plain = decode_attention(q, kc, vc, slot, pos, torch.arange(20), 0.125, window)
    assert (plain.double() - ref).abs().max() > 0.05


@pytest.mark.parametrize("cap", [-1.0, float("inf"), float("nan"), True, "10"])
def test_bad_softcap_is_refused(cap):
    q, kc, vc, slot, qpos, plen, bstart = make_batch([10], 1, 2, 2, 1, 64, lmax=16, seed=7)
    with pytest.raises(ValueError, match="softcap"):
        branch_attention(q, kc, vc, slot, qpos, plen, bstart, 0.1, softcap=cap)
    with pytest.raises(ValueError, match="softcap"):
        cascade_attention(q, kc, vc, slot, qpos, plen, bstart, 0.1, softcap=cap)
