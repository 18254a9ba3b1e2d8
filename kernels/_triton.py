"""Optional Triton import and small launch helpers shared by the kernels.

Triton is optional: `import specem_fast.kernels` must work without it (the
torch references then serve); calling a Triton kernel raises a clear error.
"""

from __future__ import annotations

import torch

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


def is_interpreted(kernel) -> bool:
    """Whether a @triton.jit kernel runs under the CPU interpreter (TRITON_INTERPRET=1)."""
    return HAS_TRITON and type(kernel).__name__ == "InterpretedFunction"


if HAS_TRITON:
    @triton.jit
    def _probe():  # made as every kernel is: it runs interpreted when they do
        pass


def interpreting() -> bool:
    """Whether the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1 when they were defined)."""
    return HAS_TRITON and is_interpreted(_probe)


_SM_CACHE: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 on CPU or under the interpreter)."""
    if device.type != "cuda" or interpreting():
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_CACHE:
        _SM_CACHE[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_CACHE[idx]
