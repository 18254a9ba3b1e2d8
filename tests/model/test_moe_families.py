"""The MoE families (qwen3_moe, qwen2_moe, mixtral) on the native runtime against transformers.

Tiny random checkpoints built and saved by transformers at test time (per-expert
tensors on disk, stacked at load), made discriminating: more experts than the
top-k (8 experts, 2 or 3 chosen), weights randn * 0.2 so routing differs between
tokens, a dense layer among routed ones (qwen2_moe ``mlp_only_layers``), a
shared expert (qwen2_moe), sliding windows shorter than the prompt. float32:
prefill logits, cached decode one token at a time across the window, packed
multi-branch verification, greedy tokens; bfloat16 within a tolerance.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from family_tools import check_packed_branches, hf_logits, ids, save_with_tokenizer
from family_tools import runner_for as _runner_for

from specem_fast.model.modeling import moe as moe_mod
from specem_fast.model.modeling.args import ModelArgs
from specem_fast.model.runner import Run

ATOL, RTOL = 1e-4, 1e-4
BF16_TOL = 0.15

_COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=4096)
MOE = {
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                    intermediate_size=96, norm_topk_prob=True, head_dim=16,
                                    use_sliding_window=True, sliding_window=8)),
    "qwen3_moe_no_renorm": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48,
                                              intermediate_size=96, norm_topk_prob=False, decoder_sparse_step=2)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                    intermediate_size=96, shared_expert_intermediate_size=80, mlp_only_layers=[1],
                                    use_sliding_window=True, sliding_window=8, max_window_layers=3)),
    "mixtral": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, sliding_window=12)),
}


@pytest.fixture(scope="module")
def tokenizer_dir(default_model_dirs):
    return default_model_dirs["smollm2-135m-instruct"]


_BUILT: dict[str, tuple] = {}


def build(name: str, root, tokenizer_dir):
    if name in _BUILT:
        return _BUILT[name]
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, over = MOE[name]
    cfg = AutoConfig.for_model(model_type, vocab_size=49152, **{**_COMMON, **over})
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    folder = save_with_tokenizer(model, root / name, tokenizer_dir)
    _BUILT[name] = (folder, model)
    return _BUILT[name]


@pytest.fixture
def family(request, tmp_path_factory, tokenizer_dir):
    return build(request.param, tmp_path_factory.getbasetemp(), tokenizer_dir)


def runner_for(folder, dtype="float32"):
    return _runner_for(folder, dtype, slots=2)


@pytest.mark.parametrize("family", list(MOE), indirect=True)
def test_prefill_decode_and_greedy_match_transformers(family):
    folder, hf = family
    r = runner_for(folder)
    x = ids(40, 0)
    ref = hf_logits(hf, x)
    ours = r.logits(r.forward([Run(1, x[:25], 0, 0, 0)]))
    r.cache.append(1, 25)
    torch.testing.assert_close(ours, ref[:25], atol=ATOL, rtol=RTOL)
    for i in range(25, 40):  # one token at a time through the KV cache, across the window
        step = r.logits(r.forward([Run(1, [x[i]], i, i, i)]))
        r.cache.append(1, 1)
        torch.testing.assert_close(step[0], ref[i], atol=ATOL, rtol=RTOL)
    seq = list(x[:30])
    theirs = list(seq)
    for _ in range(6):
        theirs.append(int(hf_logits(hf, theirs)[-1].argmax()))
    r2 = runner_for(folder)
    h = r2.logits(r2.forward([Run(0, seq, 0, 0, 0)]))[-1]
    r2.cache.append(0, len(seq))
    for _ in range(6):
        seq.append(int(h.argmax()))
        n = len(seq) - 1
        h = r2.logits(r2.forward([Run(0, [seq[-1]], n, n, n)]))[0]
        r2.cache.append(0, 1)
    assert seq == theirs


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"], indirect=True)
def test_packed_branches_score_as_separate_forwards(family):
    folder, hf = family
    r = runner_for(folder)
    check_packed_branches(r, hf, 0, lambda ours, ref: torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL))


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"], indirect=True)
def test_bfloat16_within_tolerance(family):
    folder, hf = family
    r = runner_for(folder, "bfloat16")
    x = ids(24, 2)
    ours = r.logits(r.forward([Run(0, x, 0, 0, 0)]))
    ref = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), x)  # a copy: the fp32 model serves other tests
    assert (ours - ref).abs().max().item() < BF16_TOL * max(1.0, ref.abs().max().item() / 10)


def test_the_description_is_read_from_config_json(tmp_path_factory, tokenizer_dir):
    def args(name):
        folder, _ = build(name, tmp_path_factory.getbasetemp(), tokenizer_dir)
        return ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text()))

    q3 = args("qwen3_moe")
    assert q3.moe.num_experts == 8 and q3.moe.top_k == 2 and q3.moe.norm_topk and q3.qk_norm == "head"
    assert q3.moe.layers == (True, True, True) and q3.windows == (8, 8, 8)
    assert args("qwen3_moe_no_renorm").moe.layers == (False, True, False)
    q2 = args("qwen2_moe")
    assert q2.moe.shared_intermediate_size == 80 and not q2.moe.norm_topk and q2.moe.layers == (True, False, True)
    assert q2.qkv_bias and not q2.o_bias and q2.windows == (8, 0, 8)
    mx = args("mixtral")
    assert mx.moe.norm_topk and mx.moe.weights_fp32 and mx.moe.intermediate_size == 48 and mx.windows == (12,) * 3


@pytest.mark.parametrize("family", ["qwen2_moe"], indirect=True)
def test_gathered_expert_path_in_the_model(family, monkeypatch):
    """The sync-free path (GPU, torch.compile) gives the same decode logits inside the whole model."""
    monkeypatch.setattr(moe_mod, "GATHER_ON_CPU", True)
    assert moe_mod.GATHER_MAX_PAIRS >= 8 * 8  # batch 8 at top-8 (Qwen3-MoE) stays sync-free
    folder, hf = family
    r = runner_for(folder)
    x = ids(12, 3)
    ref = hf_logits(hf, x)
    r.forward([Run(0, x[:10], 0, 0, 0)])
    r.cache.append(0, 10)
    for i in (10, 11):
        torch.testing.assert_close(r.logits(r.forward([Run(0, [x[i]], i, i, i)]))[0], ref[i], atol=ATOL, rtol=RTOL)
        r.cache.append(0, 1)
