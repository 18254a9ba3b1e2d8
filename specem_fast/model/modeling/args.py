"""Architecture description read from a Hugging Face config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from specem_fast.errors import SpecEMError
from specem_fast.model.modeling.families import FAMILIES, Family, fused_parts
from specem_fast.model.modeling.moe import MoeSpec, moe_spec

# The architectures the native runtime implements (config.json model_type): one
# entry each in families.FAMILIES, which says what differs between them.
SUPPORTED_ARCHITECTURES = frozenset(FAMILIES)


@dataclass(frozen=True)
class NormSpec:
    kind: str  # "rms" or "layer"
    eps: float
    bias: bool = False  # LayerNorm bias
    offset: bool = False  # scale by (1 + w) in fp32 (Gemma stores w - 1)
    weight_fp32: bool = False  # apply the weight in fp32, then cast (else cast, then weight)


@dataclass(frozen=True)
class ModelArgs:
    """One checkpoint's architecture, resolved from config.json through its family's
    entry (families.py): the decoder reads only this."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: NormSpec
    block_norms: tuple[str | None, str | None, str | None, str | None]  # names: attn in/out, mlp in/out
    parallel: bool  # attention and MLP in parallel off one norm
    qk_norm: str | None  # None, "head", "head_each" or "full"
    qkv_bias: bool
    o_bias: bool
    mlp: str  # "gated" or "plain"
    plain_names: tuple[str, str]  # a plain MLP's in and out projections
    mlp_bias: bool
    hidden_act: str  # "silu", "gelu_tanh", "gelu" (exact) or "relu2" (relu squared)
    tie_embeddings: bool
    attn_scale: float
    attn_softcap: float | None
    rotary_dim: int  # leading dims of each head that rotate (partial rotary when < head_dim)
    rope_interleaved: bool  # rotate (x0, x1), (x2, x3)... rather than the two halves
    windows: tuple[int, ...]  # per layer: sliding window (0 = full attention)
    rope: tuple[tuple[str, dict[str, Any]], ...]  # per layer: (kind, rope parameters); kind "none": no rotary
    embed_scale: float | None = None  # embeddings * this
    embed_scale_rounded: bool = False  # ... rounded to the compute dtype first (Gemma)
    residual_scale: float | None = None  # sublayer outputs * this before the residual add
    logit_scale: float | None = None  # logits * this (folded into the final hidden states)
    final_softcap: float | None = None
    moe: MoeSpec | None = None  # routed MLP (moe.py): experts, top-k, which layers route; None: dense

    @property
    def family(self) -> Family:
        return FAMILIES[self.arch]

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Read and check a config.json; bad or inconsistent values raise SpecEMError."""
        cfg, arch = _text_config(cfg)
        fam = FAMILIES[arch]
        n_layers = _pos_int(cfg, "num_hidden_layers")
        hidden, n_heads, n_kv, head_dim = _attention_shape(cfg)
        windows = _layer_windows(cfg, fam, n_layers)
        rope = _layer_rope(cfg, fam, windows)
        qkv_bias = bool(cfg.get(fam.qkv_bias_key, fam.qkv_bias_default)) if fam.qkv_bias_key else False
        mlp_bias = bool(cfg.get(fam.mlp_bias_key, fam.mlp_bias_default)) if fam.mlp_bias_key else False
        qk_norm = fam.qk_norm if not fam.qk_norm_key or cfg.get(fam.qk_norm_key) else None
        norm = NormSpec(fam.norm, _pos_num(cfg, fam.eps_key, fam.eps_default), fam.norm_bias, fam.norm_offset,
                        fam.norm_weight_fp32)
        return cls(
            arch=arch,
            vocab_size=_pos_int(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_pos_int(cfg, "intermediate_size"),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            norm=norm,
            block_norms=(fam.attn_in, fam.attn_out, fam.mlp_in, fam.mlp_out),
            parallel=fam.parallel,
            qk_norm=qk_norm,
            qkv_bias=qkv_bias,
            o_bias=bool(cfg.get(fam.o_bias_key, False)) if fam.o_bias_key else qkv_bias and fam.o_bias,
            mlp=fam.mlp,
            plain_names=fam.plain_names,
            mlp_bias=mlp_bias,
            hidden_act=_activation(cfg, fam),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", fam.tie_default)),
            attn_scale=_attn_scale(cfg, fam, head_dim),
            attn_softcap=_opt_num(cfg, fam.attn_softcap_key),
            rotary_dim=_rotary_dim(cfg, rope, head_dim),
            rope_interleaved=fam.rope_interleaved,
            windows=windows,
            rope=rope,
            embed_scale=hidden**0.5 if fam.embed_scale == "sqrt_hidden" else _opt_num(cfg, fam.embed_scale),
            embed_scale_rounded=fam.embed_scale == "sqrt_hidden",
            residual_scale=_opt_num(cfg, fam.residual_key),
            logit_scale=_logit_scale(cfg, fam),
            final_softcap=_opt_num(cfg, fam.final_softcap_key),
            moe=moe_spec(fam.moe, cfg, n_layers) if fam.moe else None,
        )

    def fused_parts(self, name: str) -> list[tuple[str, int]] | None:
        """How checkpoint tensor ``name`` splits into ours along dim 0 (None: not fused)."""
        sizes = {"q": self.num_heads * self.head_dim, "kv": self.num_kv_heads * self.head_dim,
                 "ff": self.intermediate_size}
        return fused_parts(self.family, name, sizes)

    def inv_freq(self, layer: int) -> tuple[torch.Tensor, float]:
        """Rotary inverse frequencies (fp64) and cos/sin scaling for a layer.

        Empty for a layer without rotary. Longrope gives two rows (short factors,
        long factors): positions from ``original_max_position_embeddings`` on use
        the long ones (see :meth:`rope_switch`).
        """
        kind, p = self.rope[layer]
        dim = self.rotary_dim
        if kind == "none":
            return torch.zeros(0, dtype=torch.float64, device="cpu"), 1.0
        exps = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim
        inv = 1.0 / (p["rope_theta"] ** exps)
        if kind in ("default", None, "dynamic"):
            # dynamic NTK: transformers rescales only past max_position_embeddings
            return inv, 1.0
        if kind == "linear":
            return inv / p["factor"], 1.0
        if kind == "llama3":
            factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
            old = p["original_max_position_embeddings"]
            lo_wav, hi_wav = old / lo, old / hi
            wav = 2 * math.pi / inv
            scaled = torch.where(wav > lo_wav, inv / factor, inv)
            smooth = (old / wav - lo) / (hi - lo)
            mid = (1 - smooth) * scaled / factor + smooth * scaled
            is_mid = (wav >= hi_wav) & (wav <= lo_wav)
            return torch.where(is_mid, mid, scaled), 1.0
        if kind == "yarn":
            return _yarn(p, dim, inv)
        if kind == "longrope":
            old = p["original_max_position_embeddings"]
            factor = p.get("factor") or p["max_position_embeddings"] / old
            att = p.get("attention_factor")
            if att is None:
                att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
            rows = [1.0 / (torch.tensor(p[k], dtype=torch.float64, device="cpu") * p["rope_theta"] ** exps)
                    for k in ("short_factor", "long_factor")]
            return torch.stack(rows), float(att)
        raise SpecEMError(
            f"unsupported rope scaling {kind!r}; supported: default, linear, llama3, dynamic, yarn, longrope"
        )

    def rope_switch(self, layer: int) -> int | None:
        """Longrope: the first position that uses the long factors (None otherwise)."""
        kind, p = self.rope[layer]
        return p["original_max_position_embeddings"] if kind == "longrope" else None


def _text_config(cfg: Any) -> tuple[dict[str, Any], str]:
    """(the language model's settings, model_type), checked to be a family we run."""
    if not isinstance(cfg, dict):
        raise SpecEMError(f"config.json holds a JSON {type(cfg).__name__}, not an object of settings; re-save the model")
    if cfg.get("model_type") == "gemma3" and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
    arch = cfg.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SpecEMError(
            f"unsupported architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    return cfg, arch


def _attention_shape(cfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """(hidden_size, heads, kv heads, head_dim), checked against each other."""
    n_heads = _pos_int(cfg, "num_attention_heads")
    hidden = _pos_int(cfg, "hidden_size")
    n_kv = _pos_int(cfg, "num_key_value_heads", n_heads)
    if n_heads % n_kv:
        raise SpecEMError(
            f"config.json: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}; "
            "fix config.json to match the weights"
        )
    head_dim = _pos_int(cfg, "head_dim", 0)
    if not head_dim:
        if hidden % n_heads:
            raise SpecEMError(
                f"config.json: hidden_size={hidden} is not divisible by num_attention_heads={n_heads} and "
                "head_dim is not given; fix config.json to match the weights"
            )
        head_dim = hidden // n_heads
    return hidden, n_heads, n_kv, head_dim


def _activation(cfg: dict[str, Any], fam: Family) -> str:
    """The MLP activation as the decoder names it: silu, gelu, gelu_tanh or relu2."""
    act = next((cfg[k] for k in fam.act_keys if cfg.get(k)), fam.act_default)
    if act not in _ACTIVATIONS:
        raise SpecEMError(f"config.json: activation {act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    if act.startswith("gelu"):
        return "gelu" if act == "gelu" and not fam.gelu_is_tanh else "gelu_tanh"
    return act if act == "relu2" else "silu"


def _logit_scale(cfg: dict[str, Any], fam: Family) -> float | None:
    """Logits * this: a multiplier (cohere) or 1 / a divisor (granite)."""
    if fam.logit_div_key and _opt_num(cfg, fam.logit_div_key):
        return 1.0 / _opt_num(cfg, fam.logit_div_key)
    return _opt_num(cfg, fam.logit_mul_key)


def _yarn(p: dict[str, Any], dim: int, inv: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN (transformers' _compute_yarn_parameters): interpolate the low frequencies,
    keep the high ones, ramp between; cos/sin scaled by the attention factor."""
    base, factor = p["rope_theta"], p.get("factor")
    old = p["original_max_position_embeddings"]
    if factor is None:
        factor = p["max_position_embeddings"] / old

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = p.get("attention_factor")
    if att is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        att = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr(rot: float) -> float:
        return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = corr(fast), corr(slow)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
    extra = 1 - ramp  # share of the unscaled (extrapolated) frequency
    return inv / factor * (1 - extra) + inv * extra, float(att)


# what transformer.py implements: SiLU, GELU (exact) and GELU's tanh approximation
# ("gelu" means the approximation in Gemma's configs)
_ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu", "relu2")


def _bad(key: str, value: Any, want: str) -> SpecEMError:
    return SpecEMError(f"config.json: {key} must be {want} (got {value!r}); fix config.json to match the weights")


def _pos_int(cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise SpecEMError(f"config.json has no {key}; it is needed to build the model: re-save the model's config")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(key, value, "a positive integer")
    return value


def _pos_num(cfg: dict[str, Any], key: str, default: float | None = None) -> float:
    value = cfg.get(key, default)
    if value is None:
        raise SpecEMError(f"config.json has no {key}; it is needed to build the model: re-save the model's config")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _bad(key, value, "a positive number")
    return float(value)


def _layer_types(cfg: dict[str, Any], n: int) -> list[str] | None:
    types = cfg.get("layer_types")
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != n or any(
        t not in ("sliding_attention", "full_attention") for t in types
    ):
        raise _bad("layer_types", types, f"a list of {n} 'sliding_attention'/'full_attention' entries (one per layer)")
    return types


def _opt_num(cfg: dict[str, Any], key: str | None) -> float | None:
    """A positive number the config may leave out (None: absent or null)."""
    if key is None or cfg.get(key) is None:
        return None
    return _pos_num(cfg, key)


def _attn_scale(cfg: dict[str, Any], fam: Family, head_dim: int) -> float:
    how, _, key = fam.attn_scale.partition(":")
    if how == "pre_attn_scalar":
        return _pos_num(cfg, key) ** -0.5
    if how == "multiplier":
        return _pos_num(cfg, key, 1.0)
    return head_dim**-0.5


def _rotary_dim(cfg: dict[str, Any], rope: tuple, head_dim: int) -> int:
    factor = cfg.get("partial_rotary_factor")
    for _, p in rope:
        factor = p.get("partial_rotary_factor", factor)
    if factor is None:
        return head_dim
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise _bad("partial_rotary_factor", factor, "a number in (0, 1]")
    dim = int(head_dim * factor)
    if dim < 2 or dim % 2:
        raise _bad("partial_rotary_factor", factor, f"a fraction of head_dim={head_dim} that is even")
    return dim


def _layer_windows(cfg: dict[str, Any], fam: Family, n: int) -> tuple[int, ...]:
    sw = cfg.get("sliding_window") or 0
    if isinstance(sw, bool) or not isinstance(sw, int) or sw < 0:
        raise _bad("sliding_window", sw, "a non-negative integer or null")
    if fam.windows == "none" or not sw:
        return (0,) * n
    if fam.windows == "all":
        return (sw,) * n
    if fam.windows == "qwen_all":
        return (sw if cfg.get("use_sliding_window", False) else 0,) * n
    if fam.windows == "qwen":
        if not cfg.get("use_sliding_window", False):
            return (0,) * n
        types = _layer_types(cfg, n)
        if types:
            return tuple(sw if t == "sliding_attention" else 0 for t in types)
        first_full = cfg.get("max_window_layers", n)
        return tuple(sw if i >= first_full else 0 for i in range(n))
    types = _layer_types(cfg, n)
    if not types:
        pattern = cfg.get(fam.pattern_key) if fam.pattern_key else None
        if isinstance(pattern, str) and pattern and set(pattern) <= {"L", "G"}:  # EXAONE-4's "LLLG"
            types = ["sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention" for i in range(n)]
        else:
            every = _pos_int(cfg, fam.pattern_key, fam.pattern_default) if fam.pattern_key else fam.pattern_default
            types = ["full_attention" if every and (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    return tuple(sw if t == "sliding_attention" else 0 for t in types)


def _rope_params(p: dict[str, Any] | None, fallback_theta: float, cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if p is not None and not isinstance(p, dict):
        raise _bad("rope_parameters/rope_scaling", p, "an object")
    p = dict(p or {})
    p.setdefault("rope_theta", fallback_theta)
    theta = p["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1:
        raise _bad("rope_theta", theta, "a number greater than 1")
    kind = p.get("rope_type") or p.get("type") or "default"
    if kind in ("yarn", "longrope"):  # what transformers' standardize_rope_params fills in
        longest = cfg.get("max_position_embeddings")
        p.setdefault("max_position_embeddings", longest)
        p.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings") or longest)
        if not isinstance(p["original_max_position_embeddings"], int):
            raise _bad("original_max_position_embeddings", p["original_max_position_embeddings"], "an integer")
    return kind, p


def _layer_rope(cfg: dict[str, Any], fam: Family, windows: tuple[int, ...]) -> tuple[tuple[str, dict[str, Any]], ...]:
    params = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta", fam.rope_theta_default)
    local_theta = cfg.get(fam.local_rope_theta_key, 10000.0) if fam.local_rope_theta_key else theta
    if isinstance(params, dict) and "full_attention" in params:  # per layer type (transformers 5)
        full = _rope_params(params["full_attention"], theta, cfg)
        local = _rope_params(params.get("sliding_attention"), local_theta, cfg)
    else:
        full = _rope_params(params if isinstance(params, dict) else cfg.get("rope_scaling"), theta, cfg)
        local = ("default", {"rope_theta": local_theta}) if fam.local_rope_theta_key else full
    if fam.nope_full_layers and any(windows):
        full = ("none", {})
    rope = [local if w else full for w in windows]
    flags = cfg.get(fam.rope_layers_key) if fam.rope_layers_key else None
    if flags is not None:
        if not isinstance(flags, list) or len(flags) != len(windows) or any(f not in (0, 1) for f in flags):
            raise _bad(fam.rope_layers_key, flags, f"a list of {len(windows)} 0/1 entries (one per layer)")
        rope = [r if f else ("none", {}) for r, f in zip(rope, flags)]
    return tuple(rope)
