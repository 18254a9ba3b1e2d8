"""Triton segment-scoring kernel vs an fp64 torch reference.

Runs on the GPU when there is one, else through the Triton interpreter (CPU):
shapes are small and blocks large so the interpreter finishes quickly.
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402

from specem_fast.kernels import segment_score, segment_score_grouped, segment_score_reference  # noqa: E402

ss_mod = importlib.import_module("specem_fast.kernels.segment_score")
SegmentScoreConfig = ss_mod.SegmentScoreConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Inputs are rounded to the dtype first and the reference sees the same values,
# so only the kernel's fp32 accumulation order (and tf32/bf16 dot on GPU) differs.
ATOL = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}
RTOL = 1e-4


@pytest.fixture(autouse=True)
def _poison_scratch(monkeypatch):
    monkeypatch.setattr(ss_mod, "POISON_SCRATCH", True)


def make_problem(n, d, v, lengths=None, c=None, dtype=torch.float32, seed=0, scale=0.25):
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        cuts = sorted(torch.randperm(n - 1, generator=g)[: c - 1].add(1).tolist()) if c > 1 else []
        offsets = [0, *cuts, n]
    else:
        assert sum(lengths) == n
        offsets = [0]
        for ln in lengths:
            offsets.append(offsets[-1] + ln)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    return (hidden.to(DEV), weight.to(DEV), targets.to(DEV), torch.tensor(offsets).to(DEV))


def nan_out(n, c):
    return tuple(torch.full((k,), float("nan"), device=DEV) for k in (n, n, c, c))


def check(res, hidden, weight, targets, offsets, softcap, dtype):
    ref = segment_score_reference(hidden.double(), weight.double(), targets, offsets, softcap)
    for name, got, want in zip(ref._fields, res, ref):
        assert got.dtype == torch.float32, name
        assert not torch.isnan(got).any(), f"{name}: unwritten (NaN) elements"
        torch.testing.assert_close(got.double(), want, atol=ATOL[dtype], rtol=RTOL, msg=name)


CASES = [
    # n, d, v, lengths-or-C, softcap, config
    pytest.param(1, 64, 777, [1], None, None, id="N1-C1"),
    pytest.param(37, 96, 1000, 4, None, SegmentScoreConfig(64, 256, 128, num_splits=3), id="V1000-split3"),
    pytest.param(50, 200, 3001, [1, 20, 1, 28], 30.0, None, id="softcap-len1"),
    pytest.param(70, 48, 513, 2, None, SegmentScoreConfig(32, 128, 32, num_splits=2), id="2nblocks-dodd"),
    pytest.param(9, 40, 300, [3, 1, 2, 3], None, SegmentScoreConfig(16, 64, 16), id="K4-smallblocks"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("n,d,v,segs,softcap,config", CASES)
def test_segment_score_matches_reference(n, d, v, segs, softcap, config, dtype):
    lengths, c = (segs, len(segs)) if isinstance(segs, list) else (None, segs)
    h, w, t, o = make_problem(n, d, v, lengths=lengths, c=c, dtype=dtype, seed=n + v)
    out = nan_out(n, o.shape[0] - 1)
    res = segment_score(h, w, t, o, softcap, out=out, config=config)
    assert all(r is x for r, x in zip(res, out)), "out= tensors must be filled in place"
    check(res, h, w, t, o, softcap, dtype)


@pytest.mark.parametrize("v", [49_152, 151_936, 262_144, 128_256])
def test_real_vocab_sizes(v):
    # Real vocabularies with a tiny d; big vocab tiles keep the interpreter fast.
    h, w, t, o = make_problem(3, 16, v, lengths=[2, 1], seed=v, scale=1.0)
    t[0] = v - 1  # last row of the vocabulary (tail tile)
    cfg = SegmentScoreConfig(16, 4096, 16, num_splits=5)
    check(segment_score(h, w, t, o, out=nan_out(3, 2), config=cfg), h, w, t, o, None, torch.float32)


def test_default_config_and_index_dtypes():
    h, w, t, o = make_problem(20, 64, 999, c=3, seed=1)
    res = segment_score(h, w, t.int(), o.int())
    check(res, h, w, t, o, None, torch.float32)
    # non-contiguous rows (a slice of a bigger hidden buffer) are fine
    big = torch.randn(20, 80, device=DEV)
    big[:, :64] = h
    res = segment_score(big[:, :64], w, t, o)
    check(res, h, w, t, o, None, torch.float32)


def test_grouped_matches_single_and_reference():
    probs = [
        make_problem(37, 96, 1000, c=4, seed=1) + (None,),
        make_problem(5, 64, 700, lengths=[1, 4], seed=2) + (10.0,),
        make_problem(20, 128, 1500, c=3, dtype=torch.bfloat16, seed=3) + (None,),  # own dtype group
        make_problem(1, 32, 257, lengths=[1], seed=4) + (None,),
    ]
    res = segment_score_grouped(probs)
    assert len(res) == len(probs)
    for (h, w, t, o, cap), r in zip(probs, res):
        check(r, h, w, t, o, cap, h.dtype)
        single = segment_score(h, w, t, o, cap)
        for a, b in zip(r, single):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grouped_forced_splits():
    probs = [make_problem(30, 48, 900, c=3, seed=5), make_problem(12, 48, 650, c=2, seed=6)]
    res = segment_score_grouped(probs, config=SegmentScoreConfig(16, 128, 64, num_splits=3))
    for (h, w, t, o), r in zip(probs, res):
        check(r, h, w, t, o, None, torch.float32)


def _bad(**over):
    h, w, t, o = make_problem(6, 32, 100, lengths=[2, 4], seed=9)
    args = dict(hidden=h, weight=w, targets=t, offsets=o, softcap=None)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(hidden=torch.randn(6, 32, 1)), "2-D"),
        (dict(weight=torch.randn(100, 31)), "last dims"),
        (dict(hidden=torch.randn(0, 32)), "N=0"),
        (dict(weight=torch.randn(100, 32, dtype=torch.float64)), "dtype"),
        (dict(hidden=torch.randn(6, 32).half()), "differs"),
        (dict(targets=torch.zeros(6)), "int32 or int64"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), r"targets must be \[N=6\]"),
        (dict(targets=torch.tensor([0, 1, 2, 3, 4, 100])), r"\[0, V=100\)"),
        (dict(targets=torch.tensor([0, 1, 2, 3, 4, -1])), r"\[0, V=100\)"),
        (dict(offsets=torch.tensor([0, 2, 5])), "end at N=6"),
        (dict(offsets=torch.tensor([1, 2, 6])), "start at 0"),
        (dict(offsets=torch.tensor([0, 2, 2, 6])), "empty"),
        (dict(offsets=torch.tensor([0])), "C >= 1"),
        (dict(offsets=torch.tensor([0.0, 6.0])), "int32 or int64"),
        (dict(hidden=torch.randn(32, 6).t()), "contiguous last"),
        (dict(softcap=-1.0), "positive"),
        (dict(softcap=float("inf")), "finite"),
        (dict(hidden="x"), "torch.Tensor"),
    ],
)
def test_bad_inputs_raise(over, match):
    args = _bad(**{k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in over.items()})
    with pytest.raises(ValueError, match=match):
        segment_score(**args)


def test_bad_out_and_grouped_inputs():
    h, w, t, o = make_problem(6, 32, 100, lengths=[2, 4], seed=9)
    with pytest.raises(ValueError, match="out"):
        segment_score(h, w, t, o, out=nan_out(5, 2))
    with pytest.raises(ValueError, match="non-empty"):
        segment_score_grouped([])
    with pytest.raises(ValueError, match="problem 1"):
        segment_score_grouped([(h, w, t, o), (h, w, t)])
    with pytest.raises(ValueError, match="problem 0: .*empty"):
        segment_score_grouped([(h, w, t, torch.tensor([0, 0, 6], device=DEV))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a GPU")
def test_device_mismatch_raises():
    h, w, t, o = make_problem(6, 32, 100, lengths=[2, 4], seed=9)
    with pytest.raises(ValueError, match="is on"):
        segment_score(h, w.cpu(), t, o)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v,softcap", [(1, 777, None), (23, 10_000, 30.0), (300, 4097, None)])
def test_cpu_path_matches_the_fp64_reference(wdtype, n, v, softcap):
    """segment_score_torch (the engine's CPU scorer): fp32 hidden states, LM head in the model's
    dtype, vocabulary chunks (V not a multiple of the chunk) merged by online log-sum-exp."""
    from specem_fast.kernels import segment_score_torch

    hidden, weight, targets, offsets = (x.cpu() for x in make_problem(n, 48, v, c=min(n, 5), seed=n, scale=1.0))
    weight = weight.to(wdtype)
    got = segment_score_torch(hidden, weight, targets, offsets, softcap, vocab_chunk=1000)
    ref = segment_score_reference(hidden.double(), weight.double(), targets, offsets, softcap)
    for name, a, b in zip(ref._fields, got, ref):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=1e-5, msg=name)
    assert got.token_logprob.max() < 0 and got.token_logprob.min() < -3  # real spread, not a flat softmax


@pytest.mark.parametrize("grouped", [False, True], ids=["single", "grouped"])
def test_merge_of_more_splits_than_one_merge_chunk(monkeypatch, grouped):
    """More vocab splits than the merge kernel takes per step (the default at small N
    on a 132-SM GPU): the running sum must be rescaled when a later chunk of splits
    raises the running max. The LM-head rows of the last chunk are scaled up, so
    every row's max lies there and a dropped rescale changes the LSE."""
    chunk = ss_mod._MERGE_CHUNK
    splits, block_v = chunk + 8, 16
    v = splits * block_v - 5  # a tail tile in the last split
    h, w, t, o = make_problem(6, 16, v, lengths=[2, 3, 1], seed=12, scale=1.0)
    last_chunk = torch.arange(v, device=DEV) >= chunk * block_v
    w = (w * torch.where(last_chunk, 2.0, 0.5)[:, None]).contiguous()
    t[0], t[1] = 0, v - 1  # targets owned by the first and the last split
    assert ((h @ w.T).argmax(dim=1) >= chunk * block_v).all()  # each row's max is in the last chunk
    shapes = []
    real_scratch = ss_mod._scratch
    monkeypatch.setattr(ss_mod, "_scratch", lambda shape, device: shapes.append(shape) or real_scratch(shape, device))
    cfg = SegmentScoreConfig(16, block_v, 16, num_warps=4, num_stages=1, num_splits=splits)
    if grouped:
        res = segment_score_grouped([(h, w, t, o)], config=cfg)[0]
        assert shapes == [(2, splits * 6)]
    else:
        res = segment_score(h, w, t, o, out=nan_out(6, 3), config=cfg)
        assert shapes == [(splits, 6), (splits, 6)]
    assert splits > chunk
    check(res, h, w, t, o, None, torch.float32)


SENTINEL = 12345.0  # a poison that no written value (finite log-prob or NaN) can equal


def _unchecked_problem():
    h, w, t, o = make_problem(7, 32, 300, lengths=[2, 2, 3], seed=21)
    t = t.clone()
    t[1] = 300  # == V: out of range
    t[4] = -2
    return h, w, t, o


@pytest.mark.parametrize("grouped", [False, True], ids=["single", "grouped"])
def test_unchecked_bad_targets_and_empty_candidates_write_nan(grouped):
    """check_values=False: an out-of-range target gives NaN token_logit/token_logprob
    (and NaN means for its candidate), an empty or reversed candidate NaN means;
    nothing keeps the poison of the output buffers, the rest matches the reference."""
    h, w, t, _ = _unchecked_problem()
    # candidates: [0,2) bad t[1]; [2,2) empty; [2,4); [4,3) reversed; [3,7) bad t[4]; [7,7) empty
    o = torch.tensor([0, 2, 2, 4, 3, 7, 7], device=DEV)
    good_t = t.clamp(0, 299)
    ref = segment_score_reference(h.double(), w.double(), good_t, torch.tensor([0, 7], device=DEV))
    if grouped:
        res = segment_score_grouped([(h, w, t, o), (h, w, good_t, torch.tensor([0, 7], device=DEV))],
                                    config=SegmentScoreConfig(16, 64, 32, num_splits=3), check_values=False)[0]
    else:
        out = tuple(torch.full((k,), SENTINEL, device=DEV) for k in (7, 7, 6, 6))
        res = segment_score(h, w, t, o, out=out, config=SegmentScoreConfig(16, 64, 32, num_splits=3),
                            check_values=False)
        assert all(r is x for r, x in zip(res, out))
        assert not any((x == SENTINEL).any() for x in out), "unwritten output elements"
    bad = torch.tensor([False, True, False, False, True, False, False], device=DEV)
    for got, want in ((res.token_logprob, ref.token_logprob), (res.token_logit, ref.token_logit)):
        assert torch.isnan(got[bad]).all()
        torch.testing.assert_close(got[~bad].double(), want[~bad], atol=2e-4, rtol=1e-4)
    nan_seg = torch.tensor([True, True, False, True, True, True], device=DEV)
    for got, want in ((res.mean_logprob, ref.token_logprob), (res.mean_logit, ref.token_logit)):
        assert torch.isnan(got[nan_seg]).all()
        torch.testing.assert_close(got[2].double(), want[2:4].mean(), atol=2e-4, rtol=1e-4)


def test_unchecked_offsets_out_of_range_still_write_every_token():
    """Offsets that do not start at 0 / end at N, or lie outside [0, N], are clamped
    (no out-of-bounds access) and every token's log-prob is still written."""
    h, w, t, _ = make_problem(7, 32, 300, lengths=[7], seed=22)
    ref = segment_score_reference(h.double(), w.double(), t, torch.tensor([0, 7], device=DEV))
    for offs in ([2, 4, 5], [-3, 4, 100], [0, 3]):
        o = torch.tensor(offs, device=DEV)
        c = len(offs) - 1
        out = tuple(torch.full((k,), SENTINEL, device=DEV) for k in (7, 7, c, c))
        res = segment_score(h, w, t, o, out=out, check_values=False)
        assert not any((x == SENTINEL).any() for x in out), f"unwritten output elements for offsets {offs}"
        torch.testing.assert_close(res.token_logprob.double(), ref.token_logprob, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(res.token_logit.double(), ref.token_logit, atol=2e-4, rtol=1e-4)
        lo, hi = max(0, min(offs[0], 7)), max(0, min(offs[1], 7))
        torch.testing.assert_close(res.mean_logprob[0].double(), ref.token_logprob[lo:hi].mean(), atol=2e-4, rtol=1e-4)
