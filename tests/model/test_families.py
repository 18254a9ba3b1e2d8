"""Every native family against transformers' own forward, on tiny random checkpoints
that transformers builds and saves at test time.

Each checkpoint is made discriminating (NOTES 8): weights randn * 0.2, sliding
windows shorter than the prompts, soft-capping small enough to change tokens,
multipliers and logit scales set, embeddings scaled down where the family scales
them up. Checked in float32: prefill logits, cached decode one token at a time
across the window, packed multi-branch verification (each branch's log-probs
equal a separate transformers forward of prefix + branch), greedy tokens.
"""

from __future__ import annotations


import pytest
import torch
from family_tools import check_packed_branches, hf_logits, ids, runner_for, save_with_tokenizer

from specem_fast.model.modeling.args import ModelArgs
from specem_fast.model.modeling.families import FAMILIES as FAMILY_TABLE
from specem_fast.model.kv_cache import KVCacheManager
from specem_fast.model.runner import ModelRunner, Run

ATOL, RTOL = 1e-4, 1e-4  # float32 logits
# bfloat16: our error against transformers' float32 logits is at most BF16_MAX times
# transformers' own bfloat16 error at worst and BF16_MEAN times on average (measured:
# 0.7-1.5x and 0.8-1.05x), and the greedy token is float32's wherever its top-2 margin
# exceeds twice our largest error (where no rounding can flip it)
BF16_MAX, BF16_MEAN = 2.0, 1.25

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=4096)
_SHORT = [0.5 + 0.1 * i for i in range(4)]  # longrope factors for rotary_dim 8

# name -> (model_type, config overrides, embedding scale-down)
FAMILIES = {
    "qwen3": ("qwen3", dict(head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=1), 1.0),
    "llama_mlp_bias": ("llama", dict(head_dim=16, mlp_bias=True, attention_bias=True), 1.0),
    "llama_yarn": ("llama", dict(head_dim=16, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=16)), 1.0),
    "llama_dynamic": ("llama", dict(head_dim=16, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0,
                                                                      factor=2.0)), 1.0),
    "gemma": ("gemma", dict(head_dim=16), 0.35),
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=10.0,
                              final_logit_softcapping=5.0), 0.35),
    "olmo2": ("olmo2", dict(attention_bias=True), 1.0),
    "granite": ("granite", dict(embedding_multiplier=12.0, residual_multiplier=0.5, attention_multiplier=0.1,
                                logits_scaling=4.0, attention_bias=True, mlp_bias=True), 1 / 12),
    "phi3": ("phi3", dict(sliding_window=12, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                   partial_rotary_factor=0.5)), 1.0),
    "phi3_longrope": ("phi3", dict(max_position_embeddings=8192, original_max_position_embeddings=4096,
                                   rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                        partial_rotary_factor=0.5, short_factor=_SHORT,
                                                        long_factor=[2 * f for f in _SHORT])), 1.0),
    "glm": ("glm", dict(head_dim=16), 1.0),
    "glm4": ("glm4", dict(head_dim=16), 1.0),
    "cohere": ("cohere", dict(use_qk_norm=True, logit_scale=0.25, attention_bias=True), 1.0),
    "starcoder2": ("starcoder2", dict(sliding_window=12), 1.0),
    "exaone4": ("exaone4", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]), 1.0),
    "olmo3": ("olmo3", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]), 1.0),
    "cohere2": ("cohere2", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                logit_scale=0.25), 1.0),
    "smollm3": ("smollm3", dict(head_dim=16, use_sliding_window=True, sliding_window=8, no_rope_layers=[1, 0]), 1.0),
    "ministral": ("ministral", dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
                  1.0),
    "helium": ("helium", dict(head_dim=16, attention_bias=True, mlp_bias=True), 1.0),
    "ernie4_5": ("ernie4_5", dict(head_dim=16, use_bias=True), 1.0),
    "seed_oss": ("seed_oss", dict(head_dim=16, attention_bias=True, attention_out_bias=False, mlp_bias=True), 1.0),
    "arcee": ("arcee", dict(head_dim=16, mlp_bias=True), 1.0),
    "nemotron": ("nemotron", dict(head_dim=16, attention_bias=True, mlp_bias=True), 1.0),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes: one thread is as fast alone and many times faster on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer_dir(default_model_dirs):
    return default_model_dirs["smollm2-135m-instruct"]


_BUILT: dict[str, tuple] = {}


def build(name: str, root, tokenizer_dir):
    """(folder, transformers model) of a tiny random ``name`` checkpoint, made once per session."""
    if name in _BUILT:
        return _BUILT[name]
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, over, embed_scale = FAMILIES[name]
    cfg = AutoConfig.for_model(model_type, vocab_size=49152, **{**_COMMON, **over})
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    offset = FAMILY_TABLE[model_type].norm_offset  # Gemma stores norm weights as w - 1
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
            if pname.endswith("norm.weight") and not offset:
                p.add_(1.0)  # norms that scale by about 1, so the logits are not flat
        model.get_input_embeddings().weight.mul_(embed_scale)
    folder = save_with_tokenizer(model, root / name, tokenizer_dir)
    _BUILT[name] = (folder, model)
    return _BUILT[name]


@pytest.fixture
def family(request, tmp_path_factory, tokenizer_dir):
    return build(request.param, tmp_path_factory.getbasetemp(), tokenizer_dir)


def check_prefill_and_decode(r, hf, slot, tol):
    x = ids(40, 0)  # longer than every window (8, 12)
    ref = hf_logits(hf, x)
    ours = r.logits(r.forward([Run(slot, x[:25], 0, 0, 0)]))
    r.cache.append(slot, 25)
    tol(ours, ref[:25])
    for i in range(25, 40):  # one token at a time through the KV cache, across the window
        step = r.logits(r.forward([Run(slot, [x[i]], i, i, i)]))
        r.cache.append(slot, 1)
        tol(step[0], ref[i])


def check_greedy(r, hf, slot, steps=6):
    """Our greedy continuation is transformers' (each chosen token is its argmax there too)."""
    seq = ids(30, 2)
    h = r.logits(r.forward([Run(slot, seq, 0, 0, 0)]))[-1]
    r.cache.append(slot, len(seq))
    for _ in range(steps):
        seq.append(int(h.argmax()))
        n = len(seq) - 1
        h = r.logits(r.forward([Run(slot, [seq[-1]], n, n, n)]))[0]
        r.cache.append(slot, 1)
    ref = hf_logits(hf, seq)
    assert ref[-steps - 1 : -1].argmax(-1).tolist() == seq[-steps:]


def _fp32(ours, ref):
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_family_matches_transformers(family):
    """Prefill, cached decode across the window, greedy tokens and packed verification, float32."""
    folder, hf = family
    r = runner_for(folder)
    check_prefill_and_decode(r, hf, 0, _fp32)
    check_greedy(r, hf, 1)
    check_packed_branches(r, hf, 2, _fp32)


@pytest.mark.parametrize("family", ["gemma2"], indirect=True)
def test_soft_capping_through_the_triton_kernels(family):
    """Gemma-2's attention soft-capping and alternating windows through the Triton branch
    kernel (the interpreter on a CPU): prefill, decode and packed verification (~12 s)."""
    from specem_fast import kernels

    if kernels.triton_problem("cpu") is not None:
        pytest.skip(kernels.triton_problem("cpu"))
    folder, hf = family
    r = ModelRunner("m", folder, "cpu", "float32", "triton")
    r.cache = KVCacheManager([r.cache_shape], 3, 128)["m"]
    check_prefill_and_decode(r, hf, 0, _fp32)
    check_packed_branches(r, hf, 2, _fp32)


@pytest.mark.parametrize("family", ["gemma2", "phi3", "cohere"], indirect=True)
def test_the_compiled_draft_steps_logic(family, monkeypatch):
    """The compiled draft step's code (decode_step.py, compiler swapped for the identity):
    its in-place K/V writes and decode attention, soft-capping and windows included."""
    import dataclasses

    from specem_fast.model import decode_step

    monkeypatch.setattr(decode_step, "COMPILER", lambda fn, **kw: fn)
    folder, hf = family
    r = runner_for(folder)
    shape = dataclasses.replace(r.cache_shape, sink=True)
    r.cache = KVCacheManager([shape], 2, 128)["m"]
    step = decode_step.CompiledDecode(r.model, r.cache)
    x = ids(40, 0)
    ref = hf_logits(hf, x)
    r.forward([Run(1, x[:25], 0, 0, 0)])
    r.cache.append(1, 25)
    for i in range(25, 40):
        (dense,) = step.plan([([0], None, [1], [i], 0)])
        h = step(torch.tensor([x[i]]), dense)
        r.cache.append(1, 1)
        _fp32(r.logits(h)[0], ref[i])


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_family_in_bfloat16_within_the_documented_tolerance(family):
    import copy

    folder, hf = family
    x = ids(40, 0)
    ref = hf_logits(hf, x)
    theirs = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), x)
    r = runner_for(folder, "bfloat16")
    ours = r.logits(r.forward([Run(0, x, 0, 0, 0)])).float()
    err, their_err = (ours - ref).abs(), (theirs - ref).abs()
    assert err.max() <= BF16_MAX * their_err.max()
    assert err.mean() <= BF16_MEAN * their_err.mean()
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err.max()
    assert torch.equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_every_family_is_in_the_table():
    from specem_fast.model.modeling import SUPPORTED_ARCHITECTURES

    assert {FAMILIES[n][0] for n in FAMILIES} | {"llama", "mistral", "qwen2", "gemma3_text"} <= SUPPORTED_ARCHITECTURES


def test_the_description_is_read_from_config_json(tmp_path_factory, tokenizer_dir):
    """What each family needed, as the decoder sees it."""
    def args(name):
        folder, _ = build(name, tmp_path_factory.getbasetemp(), tokenizer_dir)
        import json

        return ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text()))

    g2 = args("gemma2")
    assert g2.attn_softcap == 10.0 and g2.final_softcap == 5.0 and g2.windows == (8, 0)
    assert g2.block_norms == ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                              "post_feedforward_layernorm")
    assert args("phi3").rotary_dim == 8 and args("glm").rope_interleaved and args("glm").rotary_dim == 8
    assert args("olmo2").qk_norm == "full" and args("olmo2").block_norms[0] is None
    assert args("cohere").parallel and args("cohere").qk_norm == "head_each" and args("cohere").logit_scale == 0.25
    gr = args("granite")
    assert (gr.embed_scale, gr.residual_scale, gr.attn_scale, gr.logit_scale) == (12.0, 0.5, 0.1, 0.25)
    assert args("starcoder2").mlp == "plain" and args("starcoder2").norm.bias
    ex = args("exaone4")
    assert ex.windows == (8, 0) and [k for k, _ in ex.rope] == ["default", "none"]
    assert args("qwen3").windows == (0, 8)
    sm = args("smollm3")
    assert sm.windows == (0, 8) and [k for k, _ in sm.rope] == ["default", "none"]
    c2 = args("cohere2")
    assert c2.windows == (8, 0) and [k for k, _ in c2.rope] == ["default", "none"] and c2.parallel


def test_window_patterns_without_layer_types():
    """Older configs give no layer_types: each family's own default pattern applies."""
    base = dict(vocab_size=10, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                sliding_window=8)
    assert ModelArgs.from_hf_config({**base, "model_type": "ministral"}).windows == (8, 8, 8, 8)
    assert ModelArgs.from_hf_config({**base, "model_type": "gemma2", "query_pre_attn_scalar": 16}).windows == (8, 0, 8, 0)
    assert ModelArgs.from_hf_config({**base, "model_type": "exaone4", "sliding_window_pattern": "LLLG"}).windows == (
        8, 8, 8, 0)
    assert ModelArgs.from_hf_config({**base, "model_type": "cohere2"}).windows == (8, 8, 8, 0)
    assert ModelArgs.from_hf_config({**base, "model_type": "llama"}).windows == (0, 0, 0, 0)  # llama ignores it
