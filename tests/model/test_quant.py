"""Quantized checkpoints: GPTQ, AWQ (4 and 8 bits) and block fp8 are dequantized at load,
everything else is refused in one line, and a quantization_config is never ignored.

The test quantizes a tiny llama's linear weights itself, packs the integers by each
format's packing rules with its own code (plain loops over words and slots), and
checks the loaded weights against ``scale * (q - zero)`` computed from the integers it
packed, never from an unpacking. Block fp8 is also compared with transformers, which
dequantizes it on the CPU.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from specem_fast.errors import SpecEMError
from specem_fast.model.modeling.loader import load_transformer

CPU = torch.device("cpu")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_SLOT_ORDER = {4: [0, 2, 4, 6, 1, 3, 5, 7], 8: [0, 2, 1, 3]}  # word slot k holds pack value ORDER[k]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_model_dirs):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("quant"), "llama", "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny_llama_fp8_sized(tmp_path_factory, default_model_dirs):
    """Sizes that are whole 128 blocks (transformers' CPU dequantization needs them) except k/v (64 rows)."""
    from tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("quant8"), "llama", "smollm2-135m-instruct", hidden_size=256,
                               intermediate_size=384, head_dim=32, num_attention_heads=8, num_key_value_heads=2)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _set_quant(folder: Path, qcfg: dict | None) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    if qcfg is None:
        cfg.pop("quantization_config", None)
    else:
        cfg["quantization_config"] = qcfg
    (folder / "config.json").write_text(json.dumps(cfg))


# --------------------------------------------------------------- the test's packers
def pack_along_rows(ints: np.ndarray, bits: int) -> torch.Tensor:
    """[R, C] ints -> int32 [R*bits/32, C]: word r holds rows r*per .. r*per+per-1, row r*per+j at bit j*bits."""
    per = 32 // bits
    words = np.zeros((ints.shape[0] // per, ints.shape[1]), dtype=np.uint32)
    for r in range(words.shape[0]):
        for j in range(per):
            words[r] |= ints[r * per + j].astype(np.uint32) << np.uint32(j * bits)
    return torch.from_numpy(words.view(np.int32).copy())


def pack_along_cols(ints: np.ndarray, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """[R, C] ints -> int32 [R, ceil(C*bits/32)]: word c holds columns c*per.., slot k = column c*per+order[k]."""
    per = 32 // bits
    order = order or list(range(per))
    cols = -(-ints.shape[1] // per) * per
    padded = np.zeros((ints.shape[0], cols), dtype=np.uint32)
    padded[:, : ints.shape[1]] = ints
    words = np.zeros((ints.shape[0], cols // per), dtype=np.uint32)
    for c in range(words.shape[1]):
        for k in range(per):
            words[:, c] |= padded[:, c * per + order[k]] << np.uint32(k * bits)
    return torch.from_numpy(words.view(np.int32).copy())


def quantize_groups(w_in_out: torch.Tensor, groups: np.ndarray, n_groups: int, bits: int, sym: bool, seed: int):
    """Per (group, output) scale and zero; returns ints [in, out], zeros [G, out], fp16 scales [G, out]."""
    top = 2**bits - 1
    w = w_in_out.double().numpy()
    zeros = np.zeros((n_groups, w.shape[1]), dtype=np.int64)
    scales = np.zeros((n_groups, w.shape[1]), dtype=np.float16)
    for g in range(n_groups):
        rows = w[groups == g]
        if sym:
            scales[g] = (np.abs(rows).max(0) / (2 ** (bits - 1) - 1)).astype(np.float16)
            zeros[g] = 2 ** (bits - 1)
        else:
            lo, hi = rows.min(0), rows.max(0)
            scales[g] = ((hi - lo) / top).astype(np.float16)
            zeros[g] = np.clip(np.round(-lo / scales[g].astype(np.float64)), 0, top)
    s = scales.astype(np.float64)[groups]
    ints = np.clip(np.round(w / s) + zeros[groups], 0, top).astype(np.int64)
    # zero points at the ends of the range, where the v1 "minus one" wraps around
    zeros[0, 0] = 0
    zeros[-1, -1] = top
    return ints, zeros, scales


def reference(ints, zeros, scales, groups) -> torch.Tensor:
    """scale * (q - zero) from the integers the test packed: the weight [out, in] a correct loader must produce."""
    s = torch.from_numpy(scales.astype(np.float32))[groups]
    z = torch.from_numpy(zeros)[groups]
    return (s * (torch.from_numpy(ints) - z).float()).t().contiguous()


def _quantized(k: str) -> bool:
    """The tensors the test quantizes: every decoder layer's linear, MoE experts' projections too (not the router)."""
    return bool(re.match(r"model\.layers\.\d+\.(self_attn\.(qkv|[qkvo])_proj|mlp\.(experts\.\d+\.)?"
                         r"(gate_up|gate|up|down)_proj)\.weight$", k))


def write_gptq(src: Path, dst: Path, bits: int, group: int, sym: bool, desc_act: bool, fmt: str,
               keep_g_idx: bool = True) -> dict[str, torch.Tensor]:
    """A GPTQ copy of ``src``; returns the reference weight of every quantized linear."""
    _copy(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    out, refs = {}, {}
    rng = np.random.default_rng(bits * 100 + group)
    for k, v in sd.items():
        prefix = k[: -len(".weight")]
        if not _quantized(k):
            out[k] = v
            continue
        n_in = v.shape[1]
        gs = n_in if group == -1 else group
        n_groups = -(-n_in // gs)
        if desc_act:  # act-order: channels quantized in a permuted order, groups follow that order
            perm = rng.permutation(n_in)
            groups = np.empty(n_in, dtype=np.int64)
            groups[perm] = np.arange(n_in) // gs
        else:
            groups = np.arange(n_in) // gs
        ints, zeros, scales = quantize_groups(v.t(), groups, n_groups, bits, sym, seed=0)
        stored = (zeros - 1) % (2**bits) if fmt == "gptq" else zeros
        out[prefix + ".qweight"] = pack_along_rows(ints, bits)
        out[prefix + ".qzeros"] = pack_along_cols(stored, bits)
        out[prefix + ".scales"] = torch.from_numpy(scales)
        if keep_g_idx:
            out[prefix + ".g_idx"] = torch.from_numpy(groups.astype(np.int32))
        refs[k] = reference(ints, zeros, scales, groups)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    _set_quant(dst, {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": desc_act,
                     "checkpoint_format": fmt})
    return refs


def write_awq(src: Path, dst: Path, bits: int, group: int) -> dict[str, torch.Tensor]:
    _copy(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    out, refs = {}, {}
    for k, v in sd.items():
        prefix = k[: -len(".weight")]
        if not (k.startswith("model.layers.") and prefix.endswith(LINEARS)):
            out[k] = v
            continue
        n_in = v.shape[1]
        groups = np.arange(n_in) // group
        ints, zeros, scales = quantize_groups(v.t(), groups, n_in // group, bits, sym=False, seed=0)
        out[prefix + ".qweight"] = pack_along_cols(ints, bits, AWQ_SLOT_ORDER[bits])
        out[prefix + ".qzeros"] = pack_along_cols(zeros, bits, AWQ_SLOT_ORDER[bits])
        out[prefix + ".scales"] = torch.from_numpy(scales)
        refs[k] = reference(ints, zeros, scales, groups)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    _set_quant(dst, {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True, "version": "gemm"})
    return refs


def write_fp8(src: Path, dst: Path, block=(128, 128)) -> dict[str, torch.Tensor]:
    """Block fp8: per block scale = amax / 448, weight = (w / scale) in float8_e4m3fn, weight_scale_inv = scale."""
    _copy(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    out, refs = {}, {}
    for k, v in sd.items():
        prefix = k[: -len(".weight")]
        if not _quantized(k):
            out[k] = v
            continue
        n, m = v.shape
        bn, bm = block
        scale = torch.zeros(-(-n // bn), -(-m // bm))
        q = torch.empty(n, m, dtype=torch.float8_e4m3fn)
        ref = torch.empty(n, m)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                rows, cols = slice(i * bn, (i + 1) * bn), slice(j * bm, (j + 1) * bm)
                scale[i, j] = v[rows, cols].abs().max() / 448
                q[rows, cols] = (v[rows, cols] / scale[i, j]).to(torch.float8_e4m3fn)
                ref[rows, cols] = q[rows, cols].float() * scale[i, j]
        out[k], out[prefix + ".weight_scale_inv"], refs[k] = q, scale, ref
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    _set_quant(dst, {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block)})
    return refs


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_transformer(folder, CPU, torch.float32).state_dict()


def _check(folder: Path, refs: dict[str, torch.Tensor], plain: Path) -> None:
    got = _weights(folder)
    assert len(refs) == 2 * len(LINEARS)
    for k, ref in refs.items():
        torch.testing.assert_close(got[k], ref, atol=0, rtol=0, msg=k)
    base = load_file(str(plain / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(got[k], base[k])


# ------------------------------------------------------------------------- GPTQ/AWQ
@pytest.mark.parametrize("bits,group,sym,desc_act,fmt", [
    (4, 32, True, False, "gptq"),
    (4, 32, False, True, "gptq"),
    (8, 32, True, False, "gptq"),
    (8, -1, False, False, "gptq_v2"),
    (4, 16, False, True, "gptq_v2"),
])
def test_gptq_is_dequantized_exactly(tiny_llama, tmp_path, bits, group, sym, desc_act, fmt):
    refs = write_gptq(tiny_llama, tmp_path / "gptq", bits, group, sym, desc_act, fmt)
    _check(tmp_path / "gptq", refs, tiny_llama)


def test_gptq_without_g_idx_uses_consecutive_groups(tiny_llama, tmp_path):
    refs = write_gptq(tiny_llama, tmp_path / "gptq", 4, 32, False, False, "gptq", keep_g_idx=False)
    _check(tmp_path / "gptq", refs, tiny_llama)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 16)])
def test_awq_is_dequantized_exactly(tiny_llama, tmp_path, bits, group):
    refs = write_awq(tiny_llama, tmp_path / "awq", bits, group)
    _check(tmp_path / "awq", refs, tiny_llama)


def test_a_gptq_model_runs_like_transformers_on_its_dequantized_weights(tiny_llama, tmp_path):
    """End to end: our runner on the GPTQ folder vs transformers on a plain copy holding the reference weights."""
    from specem_fast.model.kv_cache import KVCacheManager
    from specem_fast.model.runner import ModelRunner, Run
    from transformers import AutoModelForCausalLM

    refs = write_gptq(tiny_llama, tmp_path / "gptq", 4, 32, False, True, "gptq")
    plain = _copy(tiny_llama, tmp_path / "plain")
    sd = load_file(str(tiny_llama / "model.safetensors"))
    sd.update(refs)
    save_file(sd, str(plain / "model.safetensors"), metadata={"format": "pt"})
    r = ModelRunner("q", tmp_path / "gptq", "cpu", "float32", "torch")
    r.cache = KVCacheManager([r.cache_shape], 1, 64)["q"]
    ids = [1, 504, 3300, 2001, 77, 9000, 12, 4242]
    ours = r.logits(r.forward([Run(0, ids, 0, 0, 0)]))
    hf = AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert ours.argmax(-1).tolist() == ref.argmax(-1).tolist()


# ---------------------------------------------------------------------------- fp8
def test_fp8_partial_blocks_are_dequantized_exactly(tiny_llama, tmp_path):
    refs = write_fp8(tiny_llama, tmp_path / "fp8", block=(48, 40))  # 64x64, 32x64, 128x64, 64x128: partial blocks
    _check(tmp_path / "fp8", refs, tiny_llama)


def test_fp8_logits_equal_transformers(tiny_llama_fp8_sized, tmp_path):
    from specem_fast.model.kv_cache import KVCacheManager
    from specem_fast.model.runner import ModelRunner, Run
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "fp8"
    refs = write_fp8(tiny_llama_fp8_sized, folder)
    got = _weights(folder)
    for k, ref in refs.items():
        torch.testing.assert_close(got[k], ref, atol=0, rtol=0)
    r = ModelRunner("f", folder, "cpu", "float32", "torch")
    r.cache = KVCacheManager([r.cache_shape], 1, 64)["f"]
    ids = [1, 504, 3300, 2001, 77, 9000, 12, 4242, 31, 18000]
    ours = r.logits(r.forward([Run(0, ids, 0, 0, 0)]))
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # transformers dequantized it
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert ours.argmax(-1).tolist() == ref.argmax(-1).tolist()


# ------------------------------------------------------------------------ refusals
def _refusal(folder: Path) -> str:
    with pytest.raises(SpecEMError) as e:
        load_transformer(folder, CPU, torch.float32)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg
    return msg


@pytest.mark.parametrize("qcfg,method", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bitsandbytes"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "compressed-tensors"),
    ({"quant_method": "torchao", "quant_type": {"default": "Int4WeightOnlyConfig"}}, "torchao"),
    ({"quant_method": "fbgemm_fp8"}, "fbgemm_fp8"),
])
def test_other_methods_are_refused_naming_the_method_and_a_way_out(tiny_llama, tmp_path, qcfg, method):
    folder = _copy(tiny_llama, tmp_path / "m")
    _set_quant(folder, qcfg)
    msg = _refusal(folder)
    assert repr(method) in msg and "transformers backend" in msg and "vllm:" in msg and "dequantized copy" in msg


@pytest.mark.parametrize("qcfg,why", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "only 4- and 8-bit"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, "'marlin' layout"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "'gemv' layout"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": False}, "without zero points"),
])
def test_variants_we_cannot_read_exactly_are_refused(tiny_llama, tmp_path, qcfg, why):
    folder = _copy(tiny_llama, tmp_path / "m")
    _set_quant(folder, qcfg)
    msg = _refusal(folder)
    assert why in msg and "transformers backend" in msg


@pytest.mark.parametrize("qcfg", [
    {"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": False, "sym": True},
    {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"},
    {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
])
def test_a_quantization_config_over_plain_weights_is_refused(tiny_llama, tmp_path, qcfg):
    """The issue's case: before, these loaded silently as an unquantized model."""
    folder = _copy(tiny_llama, tmp_path / "m")
    _set_quant(folder, qcfg)
    msg = _refusal(folder)
    assert "weights hold no quantized tensors" in msg and "remove quantization_config" in msg


def test_fp8_tensors_without_a_quantization_config_are_refused_not_a_torch_error(tiny_llama, tmp_path):
    write_fp8(tiny_llama, tmp_path / "fp8")
    _set_quant(tmp_path / "fp8", None)
    msg = _refusal(tmp_path / "fp8")
    assert "float8_e4m3fn" in msg and "quantization_config" in msg


def test_real_gptq_tensors_under_a_plain_config_are_refused(tiny_llama, tmp_path):
    write_gptq(tiny_llama, tmp_path / "g", 4, 32, True, False, "gptq")
    _set_quant(tmp_path / "g", None)
    msg = _refusal(tmp_path / "g")
    assert "a quantized tensor" in msg and "declares no quantization_config" in msg


def test_incomplete_or_mismatched_quantized_tensors_are_refused(tiny_llama, tmp_path):
    folder = tmp_path / "g"
    write_gptq(tiny_llama, folder, 4, 32, False, True, "gptq")
    sd = load_file(str(folder / "model.safetensors"))
    # desc_act needs g_idx
    broken = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.g_idx"}
    save_file(broken, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert "model.layers.1.mlp.up_proj has" in _refusal(folder) and "no g_idx" in _refusal(folder)
    # a g_idx naming a group that does not exist
    bad = dict(sd)
    g = bad["model.layers.0.mlp.down_proj.g_idx"].clone()
    g[5] = 99
    bad["model.layers.0.mlp.down_proj.g_idx"] = g
    save_file(bad, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert "g_idx names groups" in _refusal(folder)
    # bits in config.json that do not match the packing
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _set_quant(folder, {"quant_method": "gptq", "bits": 8, "group_size": 32, "desc_act": True})
    assert "qweight has shape" in _refusal(folder)


def test_non_finite_scales_are_refused(tiny_llama, tmp_path):
    folder = tmp_path / "f"
    write_fp8(tiny_llama, folder)
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight_scale_inv"][0, 0] = float("nan")
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert "NaN/inf" in _refusal(folder)


def test_quantization_refusal_is_available_before_loading(tiny_llama, tmp_path):
    """hub/resolve (and a backend choice) read the refusal from config.json alone."""
    from specem_fast.model.quant import quantization_refusal

    assert quantization_refusal(tiny_llama, {"model_type": "llama"}) is None
    assert quantization_refusal(tiny_llama, {"quantization_config": {"quant_method": "gptq", "bits": 4}}) is None
    msg = quantization_refusal(tiny_llama, {"quantization_config": {"quant_method": "bitsandbytes"}})
    assert str(tiny_llama) in msg and "bitsandbytes" in msg


def test_memory_estimate_counts_the_dequantized_weights(tiny_llama, tmp_path):
    """The KV/weights check before loading reads safetensors headers: a packed qweight stands for
    32/bits weights, and zero points/scales/g_idx are not kept."""
    from specem_fast.model.runner import memory_needs

    _, plain = memory_needs(tiny_llama, torch.float32)
    for bits in (4, 8):
        write_gptq(tiny_llama, tmp_path / f"g{bits}", bits, 32, False, True, "gptq")
        assert memory_needs(tmp_path / f"g{bits}", torch.float32)[1] == plain
    write_awq(tiny_llama, tmp_path / "a", 4, 32)
    write_fp8(tiny_llama, tmp_path / "f")
    assert memory_needs(tmp_path / "a", torch.float32)[1] == memory_needs(tmp_path / "f", torch.float32)[1] == plain


def test_a_gptq_member_writes_the_same_ensemble_text_as_its_dequantized_twin(tiny_llama, tiny_dirs, tmp_path):
    """A quantized checkpoint joins an ensemble like any member: the text and each round's
    winner equal those of the plain folder holding the reference weights."""
    from specem_fast import Ensemble

    refs = write_gptq(tiny_llama, tmp_path / "gptq", 8, 32, True, False, "gptq")
    plain = _copy(tiny_llama, tmp_path / "plain")
    sd = load_file(str(tiny_llama / "model.safetensors"))
    sd.update(refs)
    save_file(sd, str(plain / "model.safetensors"), metadata={"format": "pt"})
    other = str(tiny_dirs["qwen2"])
    got = []
    for first in (str(tmp_path / "gptq"), str(plain)):
        ens = Ensemble.from_pretrained([first, other], cache_tokens=256, max_batch=1, dtype="float32", kernels="torch")
        try:
            res = ens.generate("Write a short poem about the sea.", max_new_tokens=24, window=5)
        finally:
            ens.close()
        got.append((res.text, [r.winner_model == first for r in res.rounds]))
    assert got[0] == got[1] and got[0][0]


def test_quantized_parts_of_a_module_the_model_lacks_are_refused(tiny_llama, tmp_path):
    """AWQ's scaled activations (mlp.act.scales, gelu families) have no place in the native model."""
    folder = tmp_path / "a"
    write_awq(tiny_llama, folder, 4, 32)
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.layers.0.mlp.act.scales"] = torch.ones(128, dtype=torch.float16)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    msg = _refusal(folder)
    assert "mlp.act.scales" in msg and "no linear layer" in msg and "transformers backend" in msg


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, default_model_dirs):
    """qwen3_moe at tiny size: 4 experts, top-2, per-expert projections on disk (stacked at load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=49152, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=48, intermediate_size=96,
                               norm_topk_prob=True, max_position_embeddings=512)
    cfg.bos_token_id, cfg.eos_token_id = 1, 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    folder = tmp_path_factory.mktemp("moe") / "qwen3_moe"
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dirs["smollm2-135m-instruct"] / f, folder / f)
    assert any(".experts.3.down_proj.weight" in k for k in load_file(str(folder / "model.safetensors")))
    return folder


@pytest.mark.parametrize("method", ["gptq", "fp8"])
def test_quantized_moe_experts_are_dequantized_and_stacked(tiny_moe, tmp_path, method):
    """Per-expert quantized projections dequantize, then stack like plain ones: the model equals its
    plain twin holding the reference weights, and runs like transformers on that twin."""
    from specem_fast.model.kv_cache import KVCacheManager
    from specem_fast.model.runner import ModelRunner, Run
    from transformers import AutoModelForCausalLM

    q = tmp_path / method
    refs = write_gptq(tiny_moe, q, 4, 16, False, True, "gptq") if method == "gptq" else write_fp8(tiny_moe, q, (32, 32))
    assert sum(".experts." in k for k in refs) == 2 * 4 * 3
    plain = _copy(tiny_moe, tmp_path / "plain")
    sd = load_file(str(tiny_moe / "model.safetensors"))
    sd.update(refs)
    save_file(sd, str(plain / "model.safetensors"), metadata={"format": "pt"})
    a, b = _weights(q), _weights(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = ModelRunner("m", q, "cpu", "float32", "torch")
    r.cache = KVCacheManager([r.cache_shape], 1, 64)["m"]
    ids = [1, 504, 3300, 2001, 77, 9000, 12, 4242]
    ours = r.logits(r.forward([Run(0, ids, 0, 0, 0)]))
    hf = AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_quantized_fused_projections_are_dequantized_then_split(tmp_path, default_model_dirs):
    """phi3 stores qkv_proj and gate_up_proj fused: a GPTQ phi3 dequantizes them, then splits them."""
    from specem_fast.model.kv_cache import KVCacheManager
    from specem_fast.model.runner import ModelRunner, Run
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("phi3", vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=96, max_position_embeddings=512,
                               pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    src = tmp_path / "phi3"
    model.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dirs["smollm2-135m-instruct"] / f, src / f)
    refs = write_gptq(src, tmp_path / "q", 8, 16, True, True, "gptq")
    assert {k.split(".")[-2] for k in refs} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    plain = _copy(src, tmp_path / "plain")
    sd = load_file(str(src / "model.safetensors"))
    sd.update(refs)
    save_file(sd, str(plain / "model.safetensors"), metadata={"format": "pt"})
    a, b = _weights(tmp_path / "q"), _weights(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = ModelRunner("p", tmp_path / "q", "cpu", "float32", "torch")
    r.cache = KVCacheManager([r.cache_shape], 1, 64)["p"]
    ids = [1, 504, 3300, 2001, 77, 9000, 12, 4242]
    ours = r.logits(r.forward([Run(0, ids, 0, 0, 0)]))
    hf = AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
