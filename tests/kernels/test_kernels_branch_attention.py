"""Triton packed-branch attention vs an fp64 torch reference.

Runs on the GPU when there is one, else through the Triton interpreter (CPU).
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402

from specem_fast.kernels import (  # noqa: E402
    branch_attention,
    branch_attention_lse_reference,
    branch_attention_reference,
    plan_branch_attention,
)

ba_mod = importlib.import_module("specem_fast.kernels.branch_attention")
Config = ba_mod.BranchAttentionConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The interpreter truncates fp32->bf16 on store (one bf16 ulp, ~0.8% relative).
ATOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison_scratch(monkeypatch):
    monkeypatch.setattr(ba_mod, "POISON_SCRATCH", True)


def make_batch(prefixes, k, w, hq, hkv, d, lmax, dtype=torch.float32, seed=0, gap=0, shuffle=False,
               lengths=None):
    """Slots with ragged prefixes, each followed by k packed candidates of 1..w tokens.

    ``gap`` leaves stale cache entries between the prefix and the first branch.
    Every cache entry (used or stale) is random, never zero; entries past each
    slot's last query are NaN, like the engine's unwritten ``torch.empty`` cache.
    """
    g = torch.Generator().manual_seed(seed)
    s = len(prefixes)
    kc = torch.randn(s, hkv, lmax, d, generator=g).to(dtype)
    vc = torch.randn(s, hkv, lmax, d, generator=g).to(dtype)
    slot, qpos, plen, bstart = [], [], [], []
    for si, p in enumerate(prefixes):
        pos = p + gap
        for c in range(k):
            ln = lengths[c] if lengths else int(torch.randint(1, w + 1, (), generator=g))
            for i in range(ln):
                slot.append(si)
                qpos.append(pos + i)
                plen.append(p)
                bstart.append(pos)
            pos += ln
        assert pos <= lmax
        kc[si, :, pos:] = float("nan")
        vc[si, :, pos:] = float("nan")
    idx = torch.arange(len(slot))
    if shuffle:
        idx = torch.randperm(len(slot), generator=g)
    t = lambda x: torch.tensor(x)[idx].to(DEV)  # noqa: E731
    q = torch.randn(len(slot), hq, d, generator=g).to(dtype)
    return q.to(DEV), kc.to(DEV), vc.to(DEV), t(slot), t(qpos), t(plen), t(bstart)


def run_and_check(batch, scale, window, dtype, config=None, plan=None):
    q, kc, vc, slot, qpos, plen, bstart = batch
    out = torch.full_like(q, float("nan"))
    got, lse = branch_attention(q, kc, vc, slot, qpos, plen, bstart, scale, window,
                                out=out, return_lse=True, config=config, plan=plan)
    assert got is out
    assert not torch.isnan(got).any(), "unwritten (NaN) output elements"
    assert not torch.isnan(lse).any(), "unwritten (NaN) lse elements"
    ref = branch_attention_reference(q.double(), kc.double(), vc.double(), slot, qpos, plen, bstart, scale, window)
    torch.testing.assert_close(got.double(), ref, atol=ATOL[dtype], rtol=RTOL[dtype])
    ref_lse = branch_attention_lse_reference(q, kc, slot, qpos, plen, bstart, scale, window)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4 if dtype == torch.float32 else 2e-3, rtol=1e-5)
    return got


CASES = [
    # prefixes, K, W, Hq, Hkv, D, window, config, extra
    pytest.param([40, 70], 3, 5, 4, 2, 64, 0, None, {}, id="gqa2-ragged"),
    pytest.param([100], 2, 4, 6, 2, 128, 0, Config(64, 64, num_splits=3), {}, id="d128-split3"),
    pytest.param([90, 5, 33], 4, 3, 3, 3, 64, 30, Config(64, 32, num_splits=2), {"shuffle": True},
                 id="mha-window-shuffled-split2"),
    pytest.param([200], 2, 3, 2, 1, 256, 64, None, {}, id="d256-window"),
    pytest.param([17, 0], 1, 1, 4, 1, 64, 0, Config(16, 16), {"lengths": [1]}, id="K1-len1-empty-prefix"),
    pytest.param([30], 4, 4, 14, 2, 64, 0, None, {"gap": 9}, id="group7-multiblock-gap"),
    pytest.param([0], 1, 1, 2, 2, 64, 0, None, {"lengths": [37]}, id="causal-prefill"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("prefixes,k,w,hq,hkv,d,window,config,extra", CASES)
def test_branch_attention_matches_reference(prefixes, k, w, hq, hkv, d, window, config, extra, dtype):
    batch = make_batch(prefixes, k, w, hq, hkv, d, lmax=256, dtype=dtype, seed=sum(prefixes) + d, **extra)
    run_and_check(batch, d**-0.5, window, dtype, config=config)


def test_plan_reused_across_layers_and_windows():
    batch = make_batch([50, 20], 3, 4, 4, 2, 64, lmax=128, seed=3)
    q, kc, vc, slot, qpos, plen, bstart = batch
    plan = plan_branch_attention(q, kc, slot, qpos, plen, bstart)
    for window in (0, 16, 1):
        a = run_and_check(batch, 0.125, window, torch.float32, plan=plan)
        b = branch_attention(q, kc, vc, slot, qpos, plen, bstart, 0.125, window)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_window_cuts_long_prefix_with_splits():
    # window far smaller than the prefix: only the last tiles are visited.
    batch = make_batch([230], 2, 3, 2, 1, 64, lmax=256, seed=4)
    run_and_check(batch, 0.125, 20, torch.float32, config=Config(32, 32, num_splits=4))


def test_strided_views_and_int32_indices():
    q, kc, vc, slot, qpos, plen, bstart = make_batch([40, 10], 2, 3, 4, 2, 64, lmax=64, seed=5)
    big_q = torch.randn(q.shape[0], q.shape[1] + 2, 64, device=DEV)
    big_q[:, :4] = q
    out = branch_attention(big_q[:, :4], kc, vc, slot.int(), qpos.int(), plen.int(), bstart.int(), 0.125)
    ref = branch_attention_reference(q.double(), kc.double(), vc.double(), slot, qpos, plen, bstart, 0.125)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_empty_query_set():
    q, kc, vc, slot, qpos, plen, bstart = make_batch([4], 1, 1, 2, 1, 64, lmax=16, seed=6)
    e = slice(0, 0)
    out, lse = branch_attention(q[e], kc, vc, slot[e], qpos[e], plen[e], bstart[e], 0.1, return_lse=True)
    assert out.shape == (0, 2, 64) and lse.shape == (0, 2)


def _args(**over):
    q, kc, vc, slot, qpos, plen, bstart = make_batch([10, 6], 2, 2, 4, 2, 64, lmax=32, seed=7)
    a = dict(q=q, k_cache=kc, v_cache=vc, slot=slot, qpos=qpos, prefix_len=plen, branch_start=bstart,
             scale=0.125, window=0)
    for k, v in over.items():
        a[k] = v(a) if callable(v) else v
    return a


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(q=lambda a: a["q"][0]), r"\[T, Hq, D\]"),
        (dict(k_cache=lambda a: a["k_cache"][0]), r"\[S, Hkv, Lmax, D\]"),
        (dict(v_cache=lambda a: a["v_cache"][:, :, :8]), "differs"),
        (dict(q=lambda a: a["q"][:, :3]), "multiple of kv heads"),
        (dict(q=lambda a: a["q"][..., :32]), "head_dim mismatch"),
        (dict(q=lambda a: a["q"].half()), "dtypes"),
        (dict(q=lambda a: a["q"].double(), k_cache=lambda a: a["k_cache"].double(),
              v_cache=lambda a: a["v_cache"].double()), "unsupported"),
        (dict(slot=lambda a: a["slot"].float()), "int32 or int64"),
        (dict(qpos=lambda a: a["qpos"][1:]), r"qpos must be \[T="),
        (dict(slot=lambda a: a["slot"] + 5), "slot values"),
        (dict(qpos=lambda a: a["qpos"] + 32), "qpos must be < Lmax"),
        (dict(prefix_len=lambda a: a["prefix_len"] + 40), "prefix_len"),
        (dict(branch_start=lambda a: a["qpos"] + 1), "branch_start <= qpos"),
        (dict(scale=0.0), "scale"),
        (dict(scale=float("nan")), "scale"),
        (dict(window=-1), "window"),
        (dict(window=2.5), "window"),
        (dict(q=lambda a: a["q"].transpose(1, 2).contiguous().transpose(1, 2)), "contiguous last"),
        (dict(k_cache="nope"), "torch.Tensor"),
    ],
)
def test_bad_inputs_raise(over, match):
    with pytest.raises(ValueError, match=match):
        branch_attention(**_args(**over))


def test_bad_plan_and_out():
    a = _args()
    other = make_batch([10], 1, 1, 4, 2, 64, lmax=32, seed=8)
    plan = plan_branch_attention(other[0], other[1], *other[3:])
    with pytest.raises(ValueError, match="plan does not match"):
        branch_attention(**a, plan=plan)
    with pytest.raises(ValueError, match="out must be"):
        branch_attention(**a, out=torch.empty_like(a["q"])[:-1])


def test_plan_rejects_bad_inputs():
    q, kc, vc, slot, qpos, plen, bstart = make_batch([10], 1, 2, 4, 2, 64, lmax=32, seed=9)
    with pytest.raises(ValueError, match="shape"):
        plan_branch_attention(q, kc, slot[:-1], qpos, plen, bstart)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        plan_branch_attention(q[:, :3], kc, slot, qpos, plen, bstart)
    with pytest.raises(ValueError, match=r"\[T, Hq, D\]"):
        plan_branch_attention(q[0], kc, slot, qpos, plen, bstart)


BRANCH_BEFORE_PREFIX = r"need prefix_len <= branch_start .* token \d+ has prefix_len=\d+ branch_start=\d+"


def test_branch_starting_inside_its_prefix_is_refused():
    """branch_start < prefix_len would make keys both prefix and branch (the cascade,
    which computes them apart, would count them twice): refused on the host, as by
    cascade_attention, with the same message."""
    q, kc, vc, slot, qpos, plen, bstart = make_batch([10, 6], 2, 2, 4, 2, 64, lmax=32, seed=7)
    bad = bstart.clone()
    bad[3] = plen[3] - 1
    with pytest.raises(ValueError, match=BRANCH_BEFORE_PREFIX):
        branch_attention(q, kc, vc, slot, qpos, plen, bad, 0.125)
    with pytest.raises(ValueError, match=BRANCH_BEFORE_PREFIX):
        plan_branch_attention(q, kc, slot, qpos, plen, bad)
    # a branch starting right at its prefix's end (a causal chunk) is fine
    run_and_check((q, kc, vc, slot, qpos, plen, bstart), 0.125, 0, torch.float32)
    assert (bstart == plen).any()
