"""The engine with the Triton kernels forced on (interpreter on CPU) vs the torch path."""

import pytest

from specem_fast import Ensemble


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
