"""Issue 11 item 3: the compiled draft step writes the same text as the eager one.

torch.compile runs on the CPU through inductor's C++ backend (a C++ compiler
must be on the PATH). The CUDA-graph padding (batch and key-range buckets, sink
writes) cannot be graph-captured here, but its logic runs on the CPU with
FORCE_BUCKETS and is checked against the eager step too.
"""

import pytest

from specem_fast import Ensemble

from specem_fast.model import decode_step
from specem_fast.errors import SpecEMError

from known_outputs import PROMPTS

KW = dict(max_new_tokens=16, window=5)


def _texts(results):
    return [r.text for r in results]


@pytest.mark.skipif(decode_step.compile_problem(__import__("torch").device("cpu")) is not None,
                    reason="torch.compile on the CPU needs a C++ compiler (g++ or clang++); none is on the PATH")
def test_compiled_step_writes_the_same_greedy_text(tiny_dirs, tmp_path):
    """Two tiny members with different head counts (grouped-query 4/2 and plain 4/4 heads): they share
    the compiled step's code, so the second one recompiles it with symbolic head dims. About 20 s with
    inductor's cache warm, 2-3 min cold on 2 busy cores."""
    from tiny_models import make_tiny_model_dir

    mha = make_tiny_model_dir(tmp_path, "qwen2", "qwen2.5-coder-0.5b-instruct", num_key_value_heads=4)
    name = [str(tiny_dirs["llama"]), str(mha)]
    eager = Ensemble.from_pretrained(name, cache_tokens=256, max_batch=2, kernels="torch")
    comp = Ensemble.from_pretrained(name, cache_tokens=256, max_batch=2, kernels="torch", compile=True)
    assert comp.metadata["compile"] is True and eager.metadata["compile"] is False
    assert _texts(comp.generate(PROMPTS[:2], **KW)) == _texts(eager.generate(PROMPTS[:2], **KW))
    assert comp.generate(PROMPTS[2], **KW).text == eager.generate(PROMPTS[2], **KW).text  # one row, same graph


@pytest.fixture
def uncompiled(monkeypatch):
    """The compiled step's code with the compiler swapped for the identity (fast)."""
    monkeypatch.setattr(decode_step, "COMPILER", lambda fn, **kw: fn)


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    """The same three tiny members, eager and with compile=True (loaded once)."""
    names = [str(tiny_dirs[a]) for a in ("llama", "qwen2", "gemma3_text")]
    eager = Ensemble.from_pretrained(names, cache_tokens=200, max_batch=4, kernels="torch")
    dense = Ensemble.from_pretrained(names, cache_tokens=200, max_batch=4, kernels="torch", compile=True)
    return eager, dense


@pytest.mark.parametrize("buckets", [False, True])
def test_padded_dense_step_writes_the_same_text(pair, uncompiled, monkeypatch, buckets):
    eager, dense = pair
    monkeypatch.setattr(decode_step, "FORCE_BUCKETS", buckets)
    for r in dense.runners.values():
        r.build_compiled_step()  # a new compiled step, made under this test's settings
    runner = dense.runners[dense.model_names[2]]
    assert runner.cache.k.shape[3] == 201 and runner.cache.capacity == 200  # the sink position
    assert runner.compiled.buckets is buckets
    assert _texts(dense.generate(PROMPTS, **KW)) == _texts(eager.generate(PROMPTS, **KW))
    sampled = dict(KW, temperature=0.8, top_p=0.9, seed=5)
    assert _texts(dense.generate(PROMPTS, **sampled)) == _texts(eager.generate(PROMPTS, **sampled))
    assert dense.generate(PROMPTS[1], **KW).text == eager.generate(PROMPTS[1], **KW).text


def test_buckets_pad_to_powers_of_two(tiny_dirs, uncompiled, monkeypatch):
    monkeypatch.setattr(decode_step, "FORCE_BUCKETS", True)
    ens = Ensemble.from_pretrained([str(tiny_dirs["llama"])], cache_tokens=300, max_batch=6, kernels="torch",
                                   compile=True)
    c = ens.runners[ens.model_names[0]].compiled
    assert [c._rows_bucket(n) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]
    assert [c._keys_bucket(n) for n in (1, 64, 65, 200, 299)] == [64, 64, 128, 256, 301]
    monkeypatch.setattr(decode_step, "FORCE_BUCKETS", False)
    flat = Ensemble.from_pretrained([str(tiny_dirs["llama"])], cache_tokens=300, max_batch=6, kernels="torch",
                                    compile=True).runners[ens.model_names[0]].compiled
    assert [flat._rows_bucket(n) for n in (1, 2, 5)] == [2, 2, 5] and flat._keys_bucket(77) == 77


def test_compile_is_a_bool():
    with pytest.raises(SpecEMError, match="compile must be True or False"):
        Ensemble.from_pretrained(["x"], compile="yes")
