"""Issue 11 item 2: a draft step reads nothing back from the device.

The guard (host_sync) is tested first: it must catch every kind of
host read, or the draft-loop test below would prove nothing. The draft loop
then runs under it, greedy and sampled, with mixed settings in one batch and
with stop tokens in the middle of drafts.
"""

import operator

import numpy as np
import pytest
import torch
from known_outputs import PROMPTS

from specem_fast import Ensemble, GenerationSettings, kernels
from host_sync import HostSyncError, no_host_sync
from specem_fast.model.sampling import sample_tokens

X = torch.arange(6.0).reshape(2, 3)
MASK = X > 2
IDX = torch.tensor([1, 0])

FORBIDDEN = {
    "item": lambda: X[0, 0].item(),
    "tolist": lambda: X.tolist(),
    "cpu": lambda: X.cpu(),
    "to_cpu": lambda: X.to("cpu"),
    "numpy": lambda: X.numpy(),
    "np_asarray": lambda: np.asarray(X),
    "bool": lambda: bool(X[0, 0]),
    "if": lambda: 1 if X[0, 0] else 0,
    "int": lambda: int(X[0, 0]),
    "int_of_max": lambda: int(X.max()),
    "float": lambda: float(X[0, 0]),
    "operator_index": lambda: operator.index(IDX[0]),
    "range": lambda: range(IDX[0]),
    "list_index": lambda: [1, 2, 3][IDX[0]],
    "in": lambda: 3 in X,
    "nonzero": lambda: X.nonzero(),
    "torch_nonzero": lambda: torch.nonzero(X),
    "where_one_arg": lambda: torch.where(MASK),
    "bool_mask_index": lambda: X[MASK],
    "bool_mask_assign": lambda: X.clone().__setitem__(MASK, 0.0),
    "masked_select": lambda: X.masked_select(MASK),
    "unique": lambda: torch.unique(IDX),
    "repeat_interleave": lambda: torch.repeat_interleave(IDX, IDX),
    "equal": lambda: torch.equal(X, X),
    "multinomial": lambda: torch.multinomial(torch.ones(3), 1),
    "repr": lambda: repr(X),
    "format": lambda: f"{X[0, 0]:.2f}",
}

ALLOWED = {
    "arithmetic": lambda: (X * 2 + 1).argmax(-1),
    "gather": lambda: X[IDX],
    "scatter": lambda: X.clone().__setitem__((IDX, IDX), 1.0),
    "dtype_cast": lambda: X.to(torch.float64),
    "sort_cumsum": lambda: X.sort()[0].cumsum(0),
    "isin": lambda: torch.isin(IDX, IDX[:1]),
    "exponential": lambda: torch.empty(5).exponential_(1, generator=torch.Generator().manual_seed(0)),
    "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
        torch.randn(1, 2, 1, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4),
        attn_mask=torch.ones(1, 1, 1, 3, dtype=torch.bool)),
}


@pytest.mark.parametrize("name", list(FORBIDDEN))
def test_guard_catches_every_kind_of_host_read(name):
    with pytest.raises(HostSyncError, match="no-sync region"):
        with no_host_sync():
            FORBIDDEN[name]()
    FORBIDDEN[name]()  # and is gone after the block


@pytest.mark.parametrize("name", list(ALLOWED))
def test_guard_lets_device_work_through(name):
    with no_host_sync(host_to_device=True):
        ALLOWED[name]()


def test_guard_can_refuse_host_data_copies_too():
    with no_host_sync():
        torch.tensor([1, 2])
    with pytest.raises(HostSyncError, match="torch.tensor"):
        with no_host_sync(host_to_device=True):
            torch.tensor([1, 2])


def _multinomial_reference(logits, temperature, top_p, generators):
    """The sampling code before issue 11: probabilities to the host, torch.multinomial per row."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return [int(torch.multinomial(row, 1, generator=g)) for row, g in zip(probs.cpu(), generators)]


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (1e-3, 1.0)])
def test_sampling_on_the_device_draws_what_multinomial_drew(temperature, top_p):
    torch.manual_seed(0)
    for trial in range(20):
        logits = torch.randn(3, [50, 4096, 49152][trial % 3]) * 4
        gens_a = [torch.Generator().manual_seed(trial * 10 + i) for i in range(3)]
        gens_b = [torch.Generator().manual_seed(trial * 10 + i) for i in range(3)]
        for _ in range(3):  # the generators advance alike too
            with no_host_sync(host_to_device=True):
                got = sample_tokens(logits, temperature, top_p, gens_a)
            assert got.tolist() == _multinomial_reference(logits, temperature, top_p, gens_b)
    assert sample_tokens(logits, 0.0, 1.0, [None] * 3).tolist() == logits.argmax(-1).tolist()


def test_attention_plans_from_host_values_equal_the_device_built_ones():
    g = torch.Generator().manual_seed(0)
    slot = torch.tensor([2, 0, 2, 2, 1, 0])
    qpos = torch.tensor([40, 12, 41, 42, 7, 13])
    plen = torch.tensor([40, 12, 40, 40, 7, 12])
    bstart = torch.tensor([40, 12, 40, 40, 7, 12])
    q = torch.randn(6, 4, 16, generator=g)
    kc, vc = torch.randn(2, 3, 2, 64, 16, generator=g)
    host = [t.tolist() for t in (slot, qpos, plen, bstart)]
    plan = kernels.plan_branch_attention_reference(host[0], host[1])
    for window in (0, 3):
        want = kernels.branch_attention_reference(q, kc, vc, slot, qpos, plen, bstart, 0.25, window)
        with no_host_sync():
            got = kernels.branch_attention_reference(q, kc, vc, slot, qpos, plen, bstart, 0.25, window, plan=plan)
        assert torch.equal(got, want)
    dev = kernels.plan_branch_attention(q, kc, slot, qpos, plen, bstart)
    on_host = kernels.plan_branch_attention_host(*host, num_heads=4, k_shape=tuple(kc.shape), dtype=q.dtype,
                                                 device="cpu")
    for field in ("order", "blk_start", "blk_count"):
        assert torch.equal(getattr(dev, field), getattr(on_host, field))
    for field in ("blk_min_qlog", "blk_max_pl", "blk_min_bs", "blk_max_qp"):
        assert np.array_equal(getattr(dev, field), getattr(on_host, field))
    casc = kernels.plan_cascade_attention(q, kc, slot, qpos, plen, bstart)
    casc_host = kernels.plan_cascade_attention_host(*host, num_heads=4, k_shape=tuple(kc.shape), dtype=q.dtype,
                                                    device="cpu")
    for field in ("gather", "scatter", "seqlens", "batch_idx", "zero_prefix"):
        assert torch.equal(getattr(casc, field).long(), getattr(casc_host, field).long())
    assert (casc.num_rows, casc.q_max, casc.max_prefix) == (casc_host.num_rows, casc_host.q_max, casc_host.max_prefix)


def test_decode_attention_equals_the_reference():
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(2, 4, 2, 64, 16, generator=g)
    kc[:, :, 50:] = float("nan")  # never written: must not leak into the output
    vc[:, :, 50:] = float("nan")
    slot, pos = torch.tensor([3, 0, 1]), torch.tensor([20, 5, 33])
    q = torch.randn(3, 4, 16, generator=g)
    for window in (0, 8):
        want = kernels.branch_attention_reference(q, kc, vc, slot, pos, pos, pos, 0.3, window)
        got = kernels.decode_attention(q, kc, vc, slot, pos, torch.arange(48), 0.3, window)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    return Ensemble.from_pretrained(names, cache_tokens=1024, max_batch=4, kernels="torch")


def test_the_draft_loop_reads_nothing_back(tiny, monkeypatch):
    loops = {"n": 0}

    def guard(real):
        def guarded(*a, **k):
            loops["n"] += 1
            with no_host_sync(host_to_device=True):
                return real(*a, **k)
        return guarded

    kw = dict(max_new_tokens=16, window=5)
    want = [r.text for r in tiny.generate(PROMPTS, **kw)]
    sampled = GenerationSettings(temperature=0.8, top_p=0.9, seed=3, **kw)
    mixed = [GenerationSettings(**kw), sampled, GenerationSettings(temperature=1.0, seed=1, **kw)]
    want_mixed = [r.text for r in tiny.generate(PROMPTS, settings=mixed)]
    # a stop token in the middle of the second drafter's first draft
    runner = tiny.runners[tiny.drafters[1]]
    first = tiny.generate(PROMPTS[0], **kw).rounds[0]
    cand = next(c for c in first.candidates if c.model == runner.name)
    stop = runner.codec.encode_segment(cand.text)[2]
    monkeypatch.setattr(runner.codec, "stop_ids", runner.codec.stop_ids | {stop})
    want_stop = [r.text for r in tiny.generate(PROMPTS, **kw)]

    for m in tiny.drafters:
        monkeypatch.setattr(tiny.members[m].drafter, "loop", guard(tiny.members[m].drafter.loop))
    assert [r.text for r in tiny.generate(PROMPTS, **kw)] == want_stop
    monkeypatch.setattr(runner.codec, "stop_ids", runner.codec.stop_ids - {stop})
    assert [r.text for r in tiny.generate(PROMPTS, **kw)] == want
    assert [r.text for r in tiny.generate(PROMPTS, settings=mixed)] == want_mixed
    assert loops["n"] >= 3 * 3 * 2  # every drafter, several rounds, each call

    # the guard is really on: a host read inside a step fails the generation
    real_logits = runner.logits
    monkeypatch.setattr(runner, "logits", lambda h: real_logits(h) + 0 * h.sum().item())
    with pytest.raises(HostSyncError):
        tiny.generate(PROMPTS[0], **kw)
