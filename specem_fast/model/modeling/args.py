"""Architecture description read from a Hugging Face config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from specem_fast.errors import SpecEMError

# The architectures the native runtime implements (config.json model_type).
SUPPORTED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "gemma3_text"})


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    attn_bias: bool
    tie_embeddings: bool
    attn_scale: float
    hidden_act: str
    windows: tuple[int, ...]  # per layer: sliding window (0 = full attention)
    rope: tuple[tuple[str, dict[str, Any]], ...]  # per layer: (kind, rope parameters)
    final_softcap: float | None = None

    @property
    def gemma(self) -> bool:
        return self.arch == "gemma3_text"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Read and check a config.json; bad or inconsistent values raise SpecEMError."""
        if not isinstance(cfg, dict):
            raise SpecEMError(f"config.json holds a JSON {type(cfg).__name__}, not an object of settings; re-save the model")
        if cfg.get("model_type") == "gemma3" and isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise SpecEMError(
                f"unsupported architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        n_layers = _pos_int(cfg, "num_hidden_layers")
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
        gemma = arch == "gemma3_text"
        windows = _layer_windows(cfg, arch, n_layers)
        rope = _layer_rope(cfg, gemma, n_layers)
        scale = _pos_num(cfg, "query_pre_attn_scalar") ** -0.5 if gemma else head_dim**-0.5
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if act not in _ACTIVATIONS:
            raise SpecEMError(f"config.json: activation {act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
        tie = cfg.get("tie_word_embeddings", gemma)
        softcap = cfg.get("final_logit_softcapping")
        if softcap is not None:
            softcap = _pos_num(cfg, "final_logit_softcapping")
        return cls(
            arch=arch,
            vocab_size=_pos_int(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_pos_int(cfg, "intermediate_size"),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            rms_eps=_pos_num(cfg, "rms_norm_eps", 1e-6),
            attn_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            tie_embeddings=bool(tie),
            attn_scale=scale,
            hidden_act=act,
            windows=windows,
            rope=rope,
            final_softcap=softcap,
        )

    def inv_freq(self, layer: int) -> tuple[torch.Tensor, float]:
        """Rotary inverse frequencies (fp64) and cos/sin scaling for a layer."""
        kind, p = self.rope[layer]
        dim = self.head_dim
        inv = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
        if kind in ("default", None):
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
        raise SpecEMError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


# what transformer.py implements (gelu variants are computed with the tanh approximation)
_ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh", "gelu")


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


def _layer_windows(cfg: dict[str, Any], arch: str, n: int) -> tuple[int, ...]:
    sw = cfg.get("sliding_window") or 0
    if isinstance(sw, bool) or not isinstance(sw, int) or sw < 0:
        raise _bad("sliding_window", sw, "a non-negative integer or null")
    if arch == "gemma3_text":
        types = _layer_types(cfg, n)
        if not types:
            pattern = _pos_int(cfg, "sliding_window_pattern", 6)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
        return tuple(sw if t == "sliding_attention" else 0 for t in types)
    if arch == "qwen2":
        if not cfg.get("use_sliding_window", False):
            return (0,) * n
        types = _layer_types(cfg, n)
        if types:
            return tuple(sw if t == "sliding_attention" else 0 for t in types)
        first_full = cfg.get("max_window_layers", n)
        return tuple(sw if i >= first_full else 0 for i in range(n))
    return (sw,) * n  # mistral: every layer; llama: none (0)


def _rope_params(p: dict[str, Any] | None, fallback_theta: float) -> tuple[str, dict[str, Any]]:
    if p is not None and not isinstance(p, dict):
        raise _bad("rope_parameters/rope_scaling", p, "an object")
    p = dict(p or {})
    p.setdefault("rope_theta", fallback_theta)
    theta = p["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1:
        raise _bad("rope_theta", theta, "a number greater than 1")
    kind = p.get("rope_type") or p.get("type") or "default"
    return kind, p


def _layer_rope(cfg: dict[str, Any], gemma: bool, n: int) -> tuple[tuple[str, dict[str, Any]], ...]:
    params = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta", 10000.0)
    if gemma:
        windows = _layer_windows(cfg, "gemma3_text", n)
        if isinstance(params, dict) and "full_attention" in params:
            full = _rope_params(params["full_attention"], theta)
            local = _rope_params(params.get("sliding_attention"), cfg.get("rope_local_base_freq", 10000.0))
        else:
            full = _rope_params(cfg.get("rope_scaling"), theta)
            local = ("default", {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)})
        return tuple(local if w else full for w in windows)
    if isinstance(params, dict):
        one = _rope_params(params, theta)
    else:
        one = _rope_params(cfg.get("rope_scaling"), theta)
    return (one,) * n
