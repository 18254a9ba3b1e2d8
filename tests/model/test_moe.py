"""The routed MoE MLP (modeling/moe.py) against transformers' own MoE blocks on the same weights."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from specem_fast.errors import SpecEMError
from specem_fast.model.modeling import moe as moe_mod
from specem_fast.model.modeling.moe import ExpertStacker, MoE, moe_key, moe_spec

H = 32


def hf_block(kind: str, seed: int, **kw):
    """transformers' MoE block of a tiny config, weights drawn large enough that routing and outputs vary."""
    base = dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    if kind == "mixtral":
        base.update(num_local_experts=6, num_experts_per_tok=2, intermediate_size=24)
    else:
        base.update(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24)
    if kind == "qwen2_moe":
        base.update(shared_expert_intermediate_size=40)
    base.update(kw)
    cfg = AutoConfig.for_model(kind, **base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return cfg.to_dict(), block.eval()


def ours(kind: str, cfg: dict, block) -> MoE:
    spec = moe_spec(kind, cfg, 1)
    m = MoE(spec, H)
    m.load_state_dict(block.state_dict(), strict=True)
    return m.eval()


CASES = [
    pytest.param("qwen3_moe", dict(norm_topk_prob=True), id="qwen3_moe-renorm"),
    pytest.param("qwen3_moe", dict(norm_topk_prob=False), id="qwen3_moe-no-renorm"),
    pytest.param("qwen2_moe", dict(), id="qwen2_moe-shared-expert"),
    pytest.param("qwen2_moe", dict(norm_topk_prob=True, num_experts_per_tok=3), id="qwen2_moe-renorm-top3"),
    pytest.param("mixtral", dict(), id="mixtral"),
]


@pytest.mark.parametrize("kind,kw", CASES)
@pytest.mark.parametrize("tokens", [1, 5, 97], ids=lambda n: f"T{n}")
def test_matches_transformers_block_fp32(kind, kw, tokens, monkeypatch):
    cfg, block = hf_block(kind, seed=tokens, **kw)
    m = ours(kind, cfg, block)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = block(x.unsqueeze(0))
        want = (want[0] if isinstance(want, tuple) else want).squeeze(0)
        got = m(x)
        # both paths on the same input, whichever the size and device pick
        monkeypatch.setattr(moe_mod, "GATHER_MAX_PAIRS", 10**9)
        monkeypatch.setattr(moe_mod, "GATHER_ON_CPU", True)
        gathered = m(x)
        monkeypatch.setattr(moe_mod, "GATHER_MAX_PAIRS", 0)
        grouped = m(x)
    assert want.abs().max() > 0.1
    for y in (got, gathered, grouped):
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    # discriminating: more experts than chosen, and the choice differs between tokens
    if tokens > 1:
        _, idx = moe_mod.route(m.gate(x), m.spec.top_k, m.spec.norm_topk)
        assert len(torch.unique(idx)) > m.spec.top_k


@pytest.mark.parametrize("kind,kw", [CASES[0], CASES[2], CASES[4]])
def test_bfloat16_close_to_transformers(kind, kw):
    cfg, block = hf_block(kind, seed=3, **kw)
    m = ours(kind, cfg, block).to(torch.bfloat16)
    block = block.to(torch.bfloat16)
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        want = block(x.unsqueeze(0)).squeeze(0)
        got = m(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)


def test_routing_renormalisation_and_shared_gate():
    spec = moe_mod.MoeSpec(num_experts=4, top_k=2, intermediate_size=8, norm_topk=True)
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
    w, idx = moe_mod.route(logits, 2, True)
    assert idx.tolist() == [[2, 3]] and torch.allclose(w.sum(-1), torch.ones(1))
    w2, _ = moe_mod.route(logits, 2, False)
    p = torch.softmax(logits, -1)
    assert torch.allclose(w2, p[:, [2, 3]])
    assert spec.shared_intermediate_size == 0


def test_spec_reads_sparse_steps_dense_layers_and_aliases():
    cfg = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=2,
               mlp_only_layers=[3], shared_expert_intermediate_size=32)
    s = moe_spec("qwen2_moe", cfg, 6)
    assert s.layers == (False, True, False, False, False, True)
    assert s.shared_intermediate_size == 32 and not s.norm_topk and not s.weights_fp32
    s3 = moe_spec("qwen3_moe", dict(num_local_experts=8, moe_intermediate_size=16, norm_topk_prob=True), 2)
    assert s3.num_experts == 8 and s3.top_k == 8 and s3.norm_topk and s3.layers == (True, True)
    mx = moe_spec("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16), 3)
    assert mx.norm_topk and mx.weights_fp32 and mx.layers == (True,) * 3 and mx.shared_intermediate_size == 0


@pytest.mark.parametrize("bad,match", [
    (dict(num_experts_per_tok=9), "exceeds"),
    (dict(num_experts=0), "num_experts"),
    (dict(moe_intermediate_size=None), "moe_intermediate_size"),
    (dict(mlp_only_layers="1"), "mlp_only_layers"),
    (dict(decoder_sparse_step=True), "decoder_sparse_step"),
])
def test_spec_refuses_bad_configs(bad, match):
    cfg = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
    cfg.update(bad)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(SpecEMError, match=match):
        moe_spec("qwen3_moe", cfg, 2)


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_stacker_rebuilds_fused_experts_from_a_saved_checkpoint(kind, tmp_path):
    """transformers 5 saves one tensor per expert and projection (Mixtral: block_sparse_moe ... w1/w3/w2);
    stacked back, they equal the fused tensors transformers holds in memory."""
    cfg, block = hf_block(kind, seed=4)
    full = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{
        k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version", "architectures")}))
    full.model.layers[0].mlp.load_state_dict(block.state_dict())
    full.save_pretrained(tmp_path)
    ref = MoE(moe_spec(kind, cfg, 1), H)
    expected = {"model.layers.0.mlp." + k: tuple(v.shape) for k, v in ref.state_dict().items()}
    st = ExpertStacker(expected, tmp_path, "re-save")
    got = {}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert any(".experts.0." in k for k in keys)  # per-expert on disk
        for key in keys:
            name = moe_key(key)
            if st.claims(name):
                got.update(st.add(name, f.get_tensor(key)))
            elif name.startswith("model.layers.0.mlp."):
                got[name] = f.get_tensor(key)
    st.finish()
    assert set(got) == set(expected)
    for k, v in block.state_dict().items():
        torch.testing.assert_close(got["model.layers.0.mlp." + k], v, atol=0, rtol=0)


def test_stacker_refuses_missing_extra_and_misshapen_experts(tmp_path):
    spec = moe_mod.MoeSpec(num_experts=2, top_k=1, intermediate_size=4, norm_topk=False)
    expected = {"model.layers.0.mlp." + k: tuple(v.shape) for k, v in MoE(spec, 8).state_dict().items()}
    st = ExpertStacker(expected, tmp_path, "re-save")
    name = "model.layers.0.mlp.experts.{}.{}.weight"
    assert st.claims(name.format(0, "gate_proj")) and not st.claims("model.layers.0.mlp.gate.weight")
    assert not st.claims("model.layers.1.mlp.experts.0.gate_proj.weight")  # no routed layer 1 here
    with pytest.raises(SpecEMError, match="config.json implies"):
        st.add(name.format(0, "down_proj"), torch.zeros(4, 8))
    with pytest.raises(SpecEMError, match="2 experts"):
        st.add(name.format(5, "up_proj"), torch.zeros(4, 8))
    st.add(name.format(0, "gate_proj"), torch.zeros(4, 8))
    with pytest.raises(SpecEMError, match="twice"):
        st.add(name.format(0, "gate_proj"), torch.zeros(4, 8))
    with pytest.raises(SpecEMError, match="miss 5 expert projections"):
        st.finish()


def test_compiles_into_one_graph_on_the_gathered_path():
    """Inside torch.compile (the compiled draft step) the routed MLP takes the sync-free path: one graph,
    no break for a host read, the same numbers as eager (which takes the grouped path on the CPU)."""
    from specem_fast.model import decode_step

    if decode_step.compile_problem(torch.device("cpu")) is not None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    torch.manual_seed(0)
    m = MoE(moe_mod.MoeSpec(8, 2, 16, True, shared_intermediate_size=24), H).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    paths = []
    m._gathered = lambda *a, f=m._gathered: paths.append("gathered") or f(*a)
    m._grouped = lambda *a, f=m._grouped: paths.append("grouped") or f(*a)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got = torch.compile(m, fullgraph=True)(x)
        want = m(x)
    assert paths == ["gathered", "grouped"]  # traced once (compile), then the eager call
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
