"""Verification kernels (installed as ``specem_fast.kernels``).

Each kernel has a Triton implementation for CUDA and a plain torch reference
(:mod:`.reference`) used on CPU and as the test oracle. :func:`use_triton`
decides the path once per model from the choice it is given (the engine's
``kernels`` setting, or ``SPECEM_KERNELS``, read and checked by the package's config).
"""

from __future__ import annotations

import torch

from .reference import (
    ReferencePlan,
    SegmentScores,
    branch_attention_lse_reference,
    branch_attention_reference,
    plan_branch_attention_reference,
    segment_score_reference,
    segment_score_torch,
    visibility_mask,
)

# Triton kernels. These modules import triton inside a guard, so this import
# works where triton is missing (macOS); calling a kernel then raises.
# TRITON_INTERPRET=1 (CPU interpreter) must be set before this import.
from .branch_attention import BranchAttentionPlan, branch_attention, plan_branch_attention, plan_branch_attention_host
from .decode import decode_attention
from .cascade import (
    CascadePlan,
    cascade_attention,
    plan_cascade_attention,
    plan_cascade_attention_host,
    prefix_backend,
)
from ._triton import interpreting as _interpreting
from .segment_score import HAS_TRITON, segment_score, segment_score_grouped


def triton_problem(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None: they can).

    On CPU they run only under Triton's interpreter, which must be switched on
    (TRITON_INTERPRET=1) before this package is imported.
    """
    if not HAS_TRITON:
        return "triton is not installed (it comes with the [gpu] extra on CUDA machines)"
    if torch.device(device).type != "cuda" and not _interpreting():
        return ("the Triton kernels need a CUDA device; on a CPU they run only under the interpreter "
                "(TRITON_INTERPRET=1 set before specem_fast is imported; slow, for tests)")
    return None


def use_triton(device: torch.device | str, choice: str = "auto") -> bool:
    """Whether the Triton kernels serve ``device``: "triton" or "torch" as asked, and "auto"
    picks them on CUDA when triton is installed."""
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel choice {choice!r} is not auto, triton or torch")
    if choice != "auto":
        return choice == "triton"
    return torch.device(device).type == "cuda" and HAS_TRITON


__all__ = [
    "HAS_TRITON",
    "BranchAttentionPlan",
    "CascadePlan",
    "ReferencePlan",
    "SegmentScores",
    "branch_attention",
    "branch_attention_lse_reference",
    "branch_attention_reference",
    "cascade_attention",
    "decode_attention",
    "plan_branch_attention",
    "plan_branch_attention_host",
    "plan_branch_attention_reference",
    "plan_cascade_attention",
    "plan_cascade_attention_host",
    "prefix_backend",
    "segment_score",
    "segment_score_grouped",
    "segment_score_reference",
    "segment_score_torch",
    "triton_problem",
    "use_triton",
    "visibility_mask",
]
