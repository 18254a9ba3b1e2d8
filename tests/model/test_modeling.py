"""Our runtime against transformers' forward (the independent reference)."""

import pytest
import torch

from specem_fast.model.kv_cache import KVCacheManager
from specem_fast.model.runner import ModelRunner, Run

ARCHS = ["llama", "qwen2", "gemma3_text", "mistral"]


def runner_for(folder, name="m", slots=2, tokens=256):
    r = ModelRunner(name, folder, "cpu", "float32", "torch")
    r.cache = KVCacheManager([r.cache_shape], slots, tokens)[name]
    return r


_HF = {}


def hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    if folder not in _HF:
        _HF[folder] = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return _HF[folder](torch.tensor([ids])).logits[0].float()


def ids_for(r, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(r.model.args.vocab_size, 20000), (n,), generator=g).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_cached_decode_match_transformers(tiny_dirs, arch):
    folder = tiny_dirs[arch]
    r = runner_for(folder)
    ids = ids_for(r, 40)  # longer than the gemma (8) and mistral (12) windows
    ref = hf_logits(folder, ids)
    ours = r.logits(r.forward([Run(1, ids[:25], 0, 0, 0)]))
    r.cache.append(1, 25)
    torch.testing.assert_close(ours, ref[:25], atol=2e-4, rtol=1e-4)
    for i in range(25, 40):  # one token at a time through the KV cache
        step = r.logits(r.forward([Run(1, [ids[i]], i, i, i)]))
        r.cache.append(1, 1)
        torch.testing.assert_close(step[0], ref[i], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_branches_equal_each_candidate_alone(tiny_dirs, arch):
    folder = tiny_dirs[arch]
    r = runner_for(folder)
    prefix = ids_for(r, 20, seed=1)
    cands = [ids_for(r, n, seed=10 + n) for n in (5, 1, 7)]
    r.forward([Run(0, prefix, 0, 0, 0)])
    r.cache.append(0, len(prefix))
    runs, q = [], len(prefix)
    for c in cands:
        runs.append(Run(0, c, q, len(prefix), len(prefix)))
        q += len(c)
    h = r.logits(r.forward(runs))
    pos = 0
    for c in cands:
        ref = hf_logits(folder, prefix + c)[len(prefix):]
        torch.testing.assert_close(h[pos : pos + len(c)], ref, atol=2e-4, rtol=1e-4)
        pos += len(c)


def test_batched_ragged_requests_match_alone(tiny_dirs):
    folder = tiny_dirs["gemma3_text"]
    r = runner_for(folder, slots=3)
    a, b = ids_for(r, 17, 3), ids_for(r, 9, 4)
    h = r.logits(r.forward([Run(2, a, 0, 0, 0), Run(0, b, 0, 0, 0)]))
    torch.testing.assert_close(h[:17], hf_logits(folder, a), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(h[17:], hf_logits(folder, b), atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_default_models_match_transformers(default_model_dirs):
    for name, folder in default_model_dirs.items():
        r = runner_for(folder, name)
        ids = r.codec.prompt_ids("The capital of France is Paris. What is the capital of Italy?")
        ours = r.logits(r.forward([Run(0, ids, 0, 0, 0)]))
        ref = hf_logits(folder, ids)
        torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)
        assert ours[-1].argmax() == ref[-1].argmax()
        _HF.pop(folder)


def test_unsupported_architecture_is_refused(tmp_path):
    from specem_fast.errors import SpecEMError
    from specem_fast.model.modeling.args import ModelArgs

    with pytest.raises(SpecEMError, match="unsupported architecture 'gpt2'.*llama"):
        ModelArgs.from_hf_config({"model_type": "gpt2"})


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ],
)
def test_llama_rope_scaling_matches_transformers(tmp_path, default_model_dirs, rope):
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_parameters=rope,
                      max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path / rope["rope_type"]
    model.save_pretrained(folder)
    src = default_model_dirs["smollm2-135m-instruct"]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, folder / f)
    r = runner_for(folder)
    ids = ids_for(r, 60, seed=5)
    ours = r.logits(r.forward([Run(0, ids, 0, 0, 0)]))
    torch.testing.assert_close(ours, hf_logits(folder, ids), atol=2e-4, rtol=1e-4)
