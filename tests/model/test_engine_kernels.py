"""The engine with the Triton kernels forced on (interpreter on CPU) vs the torch path."""

import pytest
import torch

from specem_fast import Ensemble
from specem_fast.errors import SpecEMError


@pytest.mark.parametrize("score", ["logprob"])
def test_triton_path_gives_the_same_greedy_text(tiny_dirs, score):
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    kw = dict(max_new_tokens=10, window=5, score=score)
    torch_ens = Ensemble.from_pretrained(names, cache_tokens=256, max_batch=2, kernels="torch")
    ref = torch_ens.generate("Name a fruit.", **kw)
    del torch_ens
    tri = Ensemble.from_pretrained(names, cache_tokens=256, max_batch=2, kernels="triton")
    got = tri.generate("Name a fruit.", **kw)
    assert set(got.metadata["kernels"].values()) == {"triton"}
    assert set(ref.metadata["kernels"].values()) == {"torch"}
    assert got.text == ref.text and got.text
    for a, b in zip(got.rounds, ref.rounds):
        for v in a.raw_scores:
            assert a.raw_scores[v] == pytest.approx(b.raw_scores[v], abs=1e-3)


def test_flash_attn_cascade_path_gives_the_same_greedy_text(tiny_dirs, monkeypatch):
    """flash_attn='on' with flash-attn's fp64 double (CPU): the cascade runs on every
    non-window layer once a prefix exists, and the text matches the torch path."""
    from flash_double import flash_attn_with_kvcache_double

    from specem_fast.kernels import cascade

    calls = []

    def counted(*args, **kw):
        calls.append(int(kw["cache_seqlens"].max()))
        return flash_attn_with_kvcache_double(*args, **kw)

    names = [str(tiny_dirs[a]) for a in ("llama", "gemma3_text")]  # gemma3 mixes window and global layers
    kw = dict(max_new_tokens=10, window=4)
    ref = Ensemble.from_pretrained(names, cache_tokens=256, max_batch=1, kernels="torch").generate("Name a fruit.", **kw)
    monkeypatch.setattr(cascade, "_backend", cascade.PrefixBackend("fp64 double", counted, (torch.float32,)))
    ens = Ensemble.from_pretrained(names, cache_tokens=256, max_batch=1, kernels="triton", flash_attn="on")
    got = ens.generate("Name a fruit.", **kw)
    assert set(got.metadata["kernels"].values()) == {"triton+fp64 double(prefix>=1)"}
    assert got.text == ref.text and got.text
    assert calls and max(calls) > 0
    for a, b in zip(got.rounds, ref.rounds):
        for v in a.raw_scores:
            assert a.raw_scores[v] == pytest.approx(b.raw_scores[v], abs=1e-3)


def test_a_flash_attn_that_disagrees_is_turned_off(tiny_dirs, monkeypatch):
    """A flash-attn build with another LSE convention (here: off by a constant) must not
    change the answer: the first cascade call is compared with the branch kernel."""
    from flash_double import flash_attn_with_kvcache_double

    from specem_fast.kernels import cascade

    def wrong(*args, **kw):
        out, lse = flash_attn_with_kvcache_double(*args, **kw)
        return out, lse + 2.0

    names = [str(tiny_dirs["llama"])]
    kw = dict(max_new_tokens=8, window=4)
    ref = Ensemble.from_pretrained(names, cache_tokens=256, max_batch=1, kernels="torch").generate("Hello.", **kw)
    monkeypatch.setattr(cascade, "_backend", cascade.PrefixBackend("wrong double", wrong, (torch.float32,)))
    ens = Ensemble.from_pretrained(names, cache_tokens=256, max_batch=1, kernels="triton", flash_attn="on")
    with pytest.warns(RuntimeWarning, match="disagrees with the branch kernel"):
        got = ens.generate("Hello.", **kw)
    assert got.text == ref.text
    assert set(got.metadata["kernels"].values()) == {"triton"}

    def broken(*args, **kw):
        raise TypeError("flash_attn_with_kvcache() got an unexpected keyword argument 'return_softmax_lse'")

    monkeypatch.setattr(cascade, "_backend", cascade.PrefixBackend("broken", broken, (torch.float32,)))
    ens = Ensemble.from_pretrained(names, cache_tokens=256, max_batch=1, kernels="triton", flash_attn="on")
    with pytest.warns(RuntimeWarning, match="fails .TypeError"):
        assert ens.generate("Hello.", **kw).text == ref.text


def test_flash_attn_settings_are_checked(tiny_dirs, monkeypatch):
    from specem_fast.kernels import cascade

    name = str(tiny_dirs["llama"])
    monkeypatch.setattr(cascade, "_backend", None)
    with pytest.raises(SpecEMError, match="flash-attn is not installed"):
        Ensemble.from_pretrained([name], kernels="triton", flash_attn="on")
    with pytest.raises(SpecEMError, match="needs the Triton kernel path"):
        Ensemble.from_pretrained([name], kernels="torch", flash_attn="on")
    with pytest.raises(SpecEMError, match="flash_attn must be one of"):
        Ensemble.from_pretrained([name], flash_attn="yes")
    monkeypatch.setenv("SPECEM_FLASH_ATTN", "always")
    with pytest.raises(SpecEMError, match="SPECEM_FLASH_ATTN must be auto, on or off"):
        Ensemble.from_pretrained([name])
    monkeypatch.setenv("SPECEM_FLASH_ATTN", "off")
    ens = Ensemble.from_pretrained([name], kernels="triton", flash_attn="on")  # the variable wins
    assert ens.metadata["kernels"] == {name: "triton"}
    monkeypatch.delenv("SPECEM_FLASH_ATTN")
    monkeypatch.setattr(cascade, "_backend", cascade.PrefixBackend("flash-attn", None, (torch.bfloat16,)))
    with pytest.raises(SpecEMError, match="takes float16/bfloat16 but model .* runs in float32"):
        Ensemble.from_pretrained([name], kernels="triton", flash_attn="on")
    # auto: never on the CPU
    assert Ensemble.from_pretrained([name], kernels="triton").metadata["kernels"] == {name: "triton"}
