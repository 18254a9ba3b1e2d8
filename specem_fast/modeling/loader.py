"""Load a Hugging Face folder (config.json + safetensors) into our Transformer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import SpecEMError
from .args import ModelArgs
from .transformer import Transformer

_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise SpecEMError(f"{folder} has no config.json; point to a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecEMError(f"{path} is not valid JSON ({exc}); re-fetch or re-save the model") from None


def load_transformer(folder: Path, device: torch.device, dtype: torch.dtype, cfg: dict | None = None) -> Transformer:
    args = ModelArgs.from_hf_config(cfg if cfg is not None else read_config(folder))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SpecEMError(f"{folder} has no *.safetensors weights; save the model with safetensors")
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                name = _normalise(key)
                if name in expected:  # skips a tied checkpoint's lm_head copy and non-text towers
                    state[name] = sf.get_tensor(key).to(dtype)
    missing = sorted(expected - set(state))
    if missing:
        raise SpecEMError(
            f"{folder}: weights are missing {len(missing)} tensors (first: {missing[0]}); "
            "is this a complete checkpoint of a supported architecture?"
        )
    model.load_state_dict(state, assign=True, strict=True)
    model.to(device)
    model._inv_freqs = [(inv.to(device), scaling) for inv, scaling in model._inv_freqs]
    return model.eval().requires_grad_(False)


def _normalise(key: str) -> str | None:
    for p in _PREFIXES:
        if key.startswith(p):
            key = "model." + key[len(p) :]
            break
    if key.startswith(("model.vision", "model.multi_modal", "vision_tower", "multi_modal_projector")):
        return None
    return key
