"""What differs between the decoder families the native runtime runs, as data.

One :class:`Family` per config.json ``model_type``. :meth:`ModelArgs.from_hf_config`
reads a config through its family's entry once; the decoder (transformer.py) and
the loader read only the resulting :class:`ModelArgs`, never the family name.
Adding a family is an entry here, plus code only for math no entry can express.

What each field means is written next to it. The defaults are llama's (pre-norm
RMSNorm blocks, gated SiLU MLP, separate q/k/v/gate/up weights, half-split rotary
over the whole head, no soft-capping, no multipliers). Defaults of config keys a
checkpoint may omit are transformers' own (configuration_<type>.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    # -- norms ------------------------------------------------------------------
    norm: str = "rms"  # "rms" (x / rms(x)) or "layer" (mean-centred LayerNorm)
    norm_bias: bool = False  # LayerNorm with a bias (torch's nn.LayerNorm)
    norm_offset: bool = False  # weights stored as w - 1: scale by (1 + w), computed in fp32 (Gemma)
    norm_weight_fp32: bool = False  # weight applied in fp32 before the cast back (else after it, as llama)
    eps_key: str = "rms_norm_eps"
    eps_default: float = 1e-6
    # The block's norms by checkpoint name, per place: before attention, on its
    # output (before the residual add), before the MLP, on its output. None: no norm there.
    attn_in: str | None = "input_layernorm"
    attn_out: str | None = None
    mlp_in: str | None = "post_attention_layernorm"
    mlp_out: str | None = None
    parallel: bool = False  # x + attn(n(x)) + mlp(n(x)): both read attn_in's output (Cohere)
    # qk-norm: None; "head" (one weight over head_dim, shared by heads); "head_each"
    # (a weight per head, [heads, head_dim]); "full" (over all heads' q or k, before the head split)
    qk_norm: str | None = None
    qk_norm_key: str | None = None  # config flag that turns the qk-norm on (else always on when set)
    # -- attention --------------------------------------------------------------
    qkv_bias_key: str | None = "attention_bias"  # None: never
    qkv_bias_default: bool = False
    o_bias: bool = True  # o_proj has a bias when q/k/v have one (Qwen2 and GLM: never)
    o_bias_key: str | None = None  # o_proj's bias has a key of its own (Seed-OSS)
    fused_qkv: str | None = None  # one checkpoint tensor holding q, k, v (split at load)
    # attention scale: "head_dim" (1/sqrt(head_dim)) or a config key whose value is
    # the scalar s with scale 1/sqrt(s) ("pre_attn_scalar:KEY") or the scale itself ("multiplier:KEY")
    attn_scale: str = "head_dim"
    attn_softcap_key: str | None = None  # attention logit soft-capping: cap * tanh(s / cap)
    # -- MLP --------------------------------------------------------------------
    mlp: str = "gated"  # "gated": down(act(gate(x)) * up(x)); "plain": out(act(in(x)))
    plain_names: tuple[str, str] = ("c_fc", "c_proj")  # a plain MLP's in and out projections
    mlp_bias_key: str | None = "mlp_bias"  # None: never
    mlp_bias_default: bool = False
    fused_gate_up: str | None = None  # one checkpoint tensor holding gate then up (split at load)
    act_keys: tuple[str, ...] = ("hidden_act",)  # the first present key names the activation
    act_default: str = "silu"
    gelu_is_tanh: bool = False  # "gelu" in this family's configs means the tanh approximation (Gemma)
    # -- rotary -----------------------------------------------------------------
    rope_interleaved: bool = False  # rotate pairs (x0, x1), (x2, x3)... instead of the two halves
    rope_theta_default: float = 10000.0
    local_rope_theta_key: str | None = None  # sliding layers' own base (Gemma-3's rope_local_base_freq)
    nope_full_layers: bool = False  # full-attention layers have no rotary when sliding windows are used (EXAONE-4)
    rope_layers_key: str | None = None  # config list, one 0/1 per layer: 0 = no rotary there (SmolLM3)
    # -- multipliers ------------------------------------------------------------
    embed_scale: str | None = None  # "sqrt_hidden" (rounded to the compute dtype, Gemma) or a config key
    residual_key: str | None = None  # sublayer outputs scaled by this before the residual add (Granite)
    logit_mul_key: str | None = None  # logits * value (Cohere's logit_scale)
    logit_div_key: str | None = None  # logits / value (Granite's logits_scaling)
    final_softcap_key: str | None = None  # logits soft-capping
    # -- sliding windows --------------------------------------------------------
    # "none"; "all" (sliding_window on every layer); "qwen_all" (every layer when
    # use_sliding_window, Qwen3-MoE); "qwen" (use_sliding_window, then
    # layer_types or max_window_layers); "layer_types" (layer_types, else every
    # `pattern`-th layer is full: pattern from pattern_key, default pattern_default; 0: none is)
    windows: str = "none"
    pattern_key: str | None = None
    pattern_default: int = 0
    # -- embeddings -------------------------------------------------------------
    tie_default: bool = False
    # -- routed MLP (moe.py) ----------------------------------------------------
    moe: str | None = None  # routing rule and config keys: a moe.MOE_KINDS entry (None: dense MLP)


_GEMMA = dict(norm_offset=True, gelu_is_tanh=True, act_default="gelu_pytorch_tanh", embed_scale="sqrt_hidden",
              tie_default=True)
_SANDWICH = dict(attn_out="post_attention_layernorm", mlp_in="pre_feedforward_layernorm",
                 mlp_out="post_feedforward_layernorm")
_POST_NORM = dict(attn_in=None, attn_out="post_attention_layernorm", mlp_in=None, mlp_out="post_feedforward_layernorm")

FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(windows="all", mlp_bias_key=None),
    "qwen2": Family(qkv_bias_default=True, o_bias=False, windows="qwen", mlp_bias_key=None),
    "qwen3": Family(qk_norm="head", windows="qwen", mlp_bias_key=None),
    "gemma": Family(**_GEMMA, mlp_bias_key=None),
    "gemma2": Family(**_GEMMA, **_SANDWICH, act_keys=("hidden_activation", "hidden_act"),
                     attn_scale="pre_attn_scalar:query_pre_attn_scalar", attn_softcap_key="attn_logit_softcapping",
                     final_softcap_key="final_logit_softcapping", windows="layer_types", pattern_default=2,
                     mlp_bias_key=None),
    "gemma3_text": Family(**_GEMMA, **_SANDWICH, act_keys=("hidden_activation", "hidden_act"), qk_norm="head",
                          attn_scale="pre_attn_scalar:query_pre_attn_scalar", local_rope_theta_key="rope_local_base_freq",
                          final_softcap_key="final_logit_softcapping", windows="layer_types",
                          pattern_key="sliding_window_pattern", pattern_default=6, mlp_bias_key=None),
    "olmo2": Family(**_POST_NORM, norm_weight_fp32=True, qk_norm="full", eps_default=1e-5, mlp_bias_key=None),
    "granite": Family(attn_scale="multiplier:attention_multiplier", embed_scale="embedding_multiplier",
                      residual_key="residual_multiplier", logit_div_key="logits_scaling"),
    "phi3": Family(fused_qkv="self_attn.qkv_proj", fused_gate_up="mlp.gate_up_proj", qkv_bias_key=None,
                   mlp_bias_key=None, windows="all", eps_default=1e-5),
    "glm": Family(fused_gate_up="mlp.gate_up_proj", qkv_bias_default=True, o_bias=False, rope_interleaved=True,
                  mlp_bias_key=None, eps_default=1.5625e-07),
    "glm4": Family(fused_gate_up="mlp.gate_up_proj", qkv_bias_default=True, o_bias=False, rope_interleaved=True,
                   attn_out="post_self_attn_layernorm", mlp_out="post_mlp_layernorm", mlp_bias_key=None,
                   eps_default=1.5625e-07),
    "cohere": Family(norm="layer", norm_weight_fp32=True, eps_key="layer_norm_eps", eps_default=1e-5, mlp_in=None,
                     parallel=True, qk_norm="head_each", qk_norm_key="use_qk_norm", rope_interleaved=True,
                     logit_mul_key="logit_scale", mlp_bias_key=None, tie_default=True, rope_theta_default=500000.0),
    "starcoder2": Family(norm="layer", norm_bias=True, eps_key="norm_epsilon", eps_default=1e-5, mlp="plain",
                         qkv_bias_key="use_bias", qkv_bias_default=True, mlp_bias_key="use_bias",
                         mlp_bias_default=True, act_default="gelu_pytorch_tanh", windows="all", tie_default=True),
    "exaone4": Family(**_POST_NORM, qk_norm="head", nope_full_layers=True, qkv_bias_key=None, mlp_bias_key=None,
                      windows="layer_types", pattern_key="sliding_window_pattern", pattern_default=4,
                      eps_default=1e-5),
    "olmo3": Family(**_POST_NORM, norm_weight_fp32=True, qk_norm="full", eps_default=1e-5, mlp_bias_key=None,
                    rope_theta_default=500000.0,
                    windows="layer_types", pattern_default=4),
    "cohere2": Family(norm="layer", norm_weight_fp32=True, eps_key="layer_norm_eps", eps_default=1e-5, mlp_in=None,
                      parallel=True, rope_interleaved=True, nope_full_layers=True, logit_mul_key="logit_scale",
                      mlp_bias_key=None, tie_default=True, windows="layer_types", pattern_key="sliding_window_pattern",
                      pattern_default=4),
    "smollm3": Family(windows="qwen", rope_layers_key="no_rope_layers", rope_theta_default=2000000.0),
    "ministral": Family(windows="layer_types", mlp_bias_key=None, qkv_bias_key=None),  # no layer_types: all sliding
    "helium": Family(norm_weight_fp32=True, rope_interleaved=True, o_bias=False, eps_default=1e-8,
                     rope_theta_default=100000.0),
    "seed_oss": Family(o_bias_key="attention_out_bias"),
    "arcee": Family(mlp="plain", plain_names=("up_proj", "down_proj"), act_default="relu2", eps_default=1e-5),
    "nemotron": Family(norm="layer", norm_bias=True, norm_offset=True, eps_key="norm_eps", eps_default=1e-5,
                       mlp="plain", plain_names=("up_proj", "down_proj"), act_default="relu2"),
    "ernie4_5": Family(rope_interleaved=True, qkv_bias_key="use_bias", mlp_bias_key="use_bias", eps_default=1e-5,
                       tie_default=True, rope_theta_default=500000.0),
    # routed MLPs (moe.py); attention as in their dense relatives
    "qwen3_moe": Family(qk_norm="head", windows="qwen_all", mlp_bias_key=None, moe="qwen3_moe"),
    "qwen2_moe": Family(qkv_bias_key="qkv_bias", qkv_bias_default=True, o_bias=False, windows="qwen",
                        mlp_bias_key=None, moe="qwen2_moe"),
    "mixtral": Family(windows="all", mlp_bias_key=None, rope_theta_default=1000000.0, moe="mixtral"),
}


def fused_parts(fam: Family, name: str, sizes: dict[str, int]) -> list[tuple[str, int]] | None:
    """How a fused checkpoint tensor splits along dim 0: [(our name, rows)], or None
    when ``name`` is not fused. ``sizes``: rows of q, k (= v) and of gate (= up)."""
    for fused, parts in ((fam.fused_qkv, (("q_proj", "q"), ("k_proj", "kv"), ("v_proj", "kv"))),
                         (fam.fused_gate_up, (("gate_proj", "ff"), ("up_proj", "ff")))):
        if not fused:
            continue
        for suffix in (".weight", ".bias"):
            tail = fused + suffix
            if name.endswith("." + tail) and name.startswith("model.layers."):
                head = name[: -len(tail)] + fused.rsplit(".", 1)[0] + "."
                return [(head + ours + suffix, sizes[which]) for ours, which in parts]
    return None

