import pytest
import torch

from specem_fast.errors import CacheFullError
from specem_fast.model.kv_cache import CacheShape, KVCacheManager


def manager(slots=2, tokens=32):
    shapes = [
        CacheShape("a", 2, 3, 4, torch.float32, torch.device("cpu")),
        CacheShape("b", 3, 1, 8, torch.bfloat16, torch.device("cpu")),
    ]
    return KVCacheManager(shapes, slots, tokens)


def fill(cache, slot, start, n, base):
    vals = torch.arange(base, base + n, dtype=torch.float32)
    cache.k[:, slot, :, start : start + n] = vals.view(1, 1, n, 1).to(cache.k.dtype)
    cache.v[:, slot, :, start : start + n] = -vals.view(1, 1, n, 1).to(cache.v.dtype)


def positions(cache, slot, n):
    return cache.k[0, slot, 0, :n, 0].float().tolist()


def test_models_keep_their_own_shapes_and_dtypes():
    m = manager()
    assert m["a"].k.shape == (2, 2, 3, 32, 4) and m["a"].k.dtype == torch.float32
    assert m["b"].k.shape == (3, 2, 1, 32, 8) and m["b"].k.dtype == torch.bfloat16
    assert m.bytes == 2 * (2 * 2 * 3 * 32 * 4 * 4) + 2 * (3 * 2 * 1 * 32 * 8 * 2)


def test_append_then_commit_second_branch_moves_it_after_prefix():
    m = manager()
    s = m.allocate()
    c = m["a"]
    assert c.append(s, 5) == 0
    fill(c, s, 0, 5, 100)
    fill(c, s, 5, 3, 200)  # candidate 0 in scratch
    fill(c, s, 8, 4, 300)  # candidate 1 in scratch
    c.commit(s, 8, 4)  # keep the second branch
    assert c.length[s] == 9
    assert positions(c, s, 9) == [100, 101, 102, 103, 104, 300, 301, 302, 303]
    assert c.v[1, s, 2, 5:9, 3].tolist() == [-300, -301, -302, -303]


def test_commit_of_first_branch_is_in_place_and_overlapping_moves_are_safe():
    m = manager()
    s = m.allocate()
    c = m["a"]
    c.append(s, 2)
    fill(c, s, 0, 2, 10)
    fill(c, s, 2, 6, 20)
    c.commit(s, 2, 3)  # first branch: already in place
    assert positions(c, s, 5) == [10, 11, 20, 21, 22]
    fill(c, s, 7, 6, 50)  # overlapping source/destination: dst 5, src 7, n 6
    c.commit(s, 7, 6)
    assert positions(c, s, 11) == [10, 11, 20, 21, 22, 50, 51, 52, 53, 54, 55]


def test_crop_after_partial_draft_and_slots_are_independent():
    m = manager()
    s0, s1 = m.allocate(), m.allocate()
    c = m["b"]
    c.append(s0, 6)
    c.append(s1, 3)
    fill(c, s0, 0, 6, 1)
    fill(c, s1, 0, 3, 40)
    c.crop(s0, 4)  # keep 4 of 6 tokens
    assert c.length[s0] == 4 and c.length[s1] == 3
    assert positions(c, s1, 3) == [40, 41, 42]
    with pytest.raises(ValueError):
        c.crop(s0, 5)  # cannot grow by cropping


def test_running_out_is_a_clear_error_and_leaves_state_intact():
    m = manager(tokens=8)
    s = m.allocate()
    c = m["a"]
    c.append(s, 6)
    with pytest.raises(CacheFullError, match="cache_tokens"):
        c.append(s, 3)
    assert c.length[s] == 6
    with pytest.raises(CacheFullError):
        c.commit(s, 7, 2)
    assert c.length[s] == 6


def test_slot_allocation_and_free():
    m = manager(slots=2)
    a, b = m.allocate(), m.allocate()
    assert {a, b} == {0, 1} and m.free_slots == 0
    with pytest.raises(CacheFullError, match="max_batch"):
        m.allocate()
    m["a"].append(a, 4)
    m.free(a)
    assert m["a"].length[a] == 0 and m.free_slots == 1
    with pytest.raises(ValueError):
        m.free(a)
    assert m.allocate() == a
