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
    branch_attention_lse_reference,
    branch_attention_reference,
    segment_score_reference,
    segment_score_torch,
    visibility_mask,
)

# Triton kernels. These modules import triton inside a guard, so this import
# works where triton is missing (macOS); calling a kernel then raises.
# TRITON_INTERPRET=1 (CPU interpreter) must be set before this import.
from .branch_attention import BranchAttentionPlan, branch_attention, plan_branch_attention
from .cascade import CascadePlan, cascade_attention, plan_cascade_attention, prefix_backend
from .segment_score import HAS_TRITON, segment_score, segment_score_grouped


def use_triton(device: torch.device | str, setting: str = "auto") -> bool:
    choice = os.environ.get("SPECEM_KERNELS", "").strip().lower() or setting
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    return torch.device(device).type == "cuda"


__all__ = [
    "HAS_TRITON",
    "BranchAttentionPlan",
    "CascadePlan",
    "SegmentScores",
    "branch_attention",
    "branch_attention_lse_reference",
    "branch_attention_reference",
    "cascade_attention",
    "plan_branch_attention",
    "plan_cascade_attention",
    "prefix_backend",
    "segment_score",
    "segment_score_grouped",
    "segment_score_reference",
    "segment_score_torch",
    "use_triton",
    "visibility_mask",
]
