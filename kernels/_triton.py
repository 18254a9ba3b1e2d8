"""Optional Triton import and small launch helpers shared by the kernels.

Triton is optional: `import specem_fast.kernels` must work without it (the
torch references then serve); calling a Triton kernel raises a clear error.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False


def require_triton(reference: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"triton is not installed: use {reference} (specem_fast.kernels.reference)")


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
