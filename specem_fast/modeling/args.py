"""Architecture description read from a Hugging Face config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SpecEMError
from ..registry import SUPPORTED_ARCHITECTURES


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
        if cfg.get("model_type") == "gemma3" and isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise SpecEMError(
                f"unsupported architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        n_layers = cfg["num_hidden_layers"]
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        gemma = arch == "gemma3_text"
        windows = _layer_windows(cfg, arch, n_layers)
        rope = _layer_rope(cfg, gemma, n_layers)
        scale = cfg["query_pre_attn_scalar"] ** -0.5 if gemma else head_dim**-0.5
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        tie = cfg.get("tie_word_embeddings", gemma)
        return cls(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            rms_eps=cfg.get("rms_norm_eps", 1e-6),
            attn_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            tie_embeddings=bool(tie),
            attn_scale=scale,
            hidden_act=act,
            windows=windows,
            rope=rope,
            final_softcap=cfg.get("final_logit_softcapping"),
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


def _layer_windows(cfg: dict[str, Any], arch: str, n: int) -> tuple[int, ...]:
    sw = cfg.get("sliding_window") or 0
    if arch == "gemma3_text":
        types = cfg.get("layer_types")
        if not types:
            pattern = cfg.get("sliding_window_pattern", 6)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
        return tuple(sw if t == "sliding_attention" else 0 for t in types)
    if arch == "qwen2":
        if not cfg.get("use_sliding_window", False):
            return (0,) * n
        types = cfg.get("layer_types")
        if types:
            return tuple(sw if t == "sliding_attention" else 0 for t in types)
        first_full = cfg.get("max_window_layers", n)
        return tuple(sw if i >= first_full else 0 for i in range(n))
    return (sw,) * n  # mistral: every layer; llama: none (0)


def _rope_params(p: dict[str, Any] | None, fallback_theta: float) -> tuple[str, dict[str, Any]]:
    p = dict(p or {})
    p.setdefault("rope_theta", fallback_theta)
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
