"""Tiny random models of each supported architecture, saved as HF folders.

They use the real tokenizers of the default models so the text hand-off is
exercised for real, while a forward costs microseconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from specem_fast.hub.fetch import model_dir

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_config(arch: str, vocab_size: int, **over):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6)
    if arch == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=True, head_dim=16)
    elif arch == "mistral":
        cfg = MistralConfig(**common, sliding_window=12, tie_word_embeddings=False, head_dim=16)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=False)
    elif arch == "gemma3_text":
        cfg = Gemma3TextConfig(**{**common, "num_hidden_layers": 3}, head_dim=32, sliding_window=8,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               query_pre_attn_scalar=32)
    else:
        raise ValueError(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_model_dir(root: Path, arch: str, tokenizer_from: str, seed: int = 0, **over) -> Path:
    """Save a random tiny ``arch`` model with ``tokenizer_from``'s tokenizer; returns the folder."""
    from transformers import AutoModelForCausalLM

    src = model_dir(tokenizer_from)
    src_cfg = json.loads((src / "config.json").read_text())
    out = Path(root) / f"tiny-{arch}-{seed}"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    cfg = tiny_config(arch, src_cfg["vocab_size"], **over)
    cfg.bos_token_id, cfg.eos_token_id = src_cfg.get("bos_token_id"), src_cfg.get("eos_token_id")
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # larger weights than the init so logits are not flat
        for p in model.parameters():
            if p.dim() >= 1:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
    model.save_pretrained(out, safe_serialization=True)
    for f in _TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    return out
