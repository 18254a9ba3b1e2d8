"""Verification kernels (installed as ``specem_fast.kernels``).

Each kernel has a Triton implementation for CUDA and a plain torch reference
(:mod:`.reference`) used on CPU and as the test oracle. :func:`use_triton`
decides the path once per model; ``SPECEM_KERNELS=triton|torch`` or the
engine's ``kernels`` setting forces it.
"""

from __future__ import annotations

import os

import torch

from .reference import (
    SegmentScores,
    branch_attention_reference,
    segment_score_reference,
    visibility_mask,
)


def use_triton(device: torch.device | str, setting: str = "auto") -> bool:
    choice = os.environ.get("SPECEM_KERNELS", "").strip().lower() or setting
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    return torch.device(device).type == "cuda"


__all__ = [
    "SegmentScores",
    "branch_attention_reference",
    "segment_score_reference",
    "use_triton",
    "visibility_mask",
]
