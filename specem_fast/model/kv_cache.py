"""One KV-cache manager for every model of the ensemble and every request.

Each model gets preallocated K and V buffers of shape
``[layers, slots, kv_heads, cache_tokens, head_dim]`` in its own dtype and on
its own device. A request holds the same slot index in every model. Per
(model, slot) the manager tracks the committed length: positions below it hold
the model's accepted sequence in order (physical position == logical
position). Drafts and verify branches live above it, in a scratch region, until
:meth:`commit` moves the kept branch down or :meth:`crop` drops them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specem_fast.errors import CacheFullError
from specem_fast.model import room


@dataclass(frozen=True)
class CacheShape:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    # One position past the budget that padding rows of a compiled step write to
    # (specem_fast.model.decode_step); nothing reads it.
    sink: bool = False


class ModelCache:
    """K/V buffers and per-slot lengths of one model."""

    def __init__(self, shape: CacheShape, num_slots: int, cache_tokens: int):
        self.shape = shape
        self.capacity = cache_tokens
        dims = (shape.num_layers, num_slots, shape.num_kv_heads, cache_tokens + shape.sink, shape.head_dim)
        # empty, not zeros: untouched pages cost no memory and nothing reads
        # a position before it is written.
        self.k = torch.empty(dims, dtype=shape.dtype, device=shape.device)
        self.v = torch.empty(dims, dtype=shape.dtype, device=shape.device)
        self.length = [0] * num_slots
        # Highest committed length each slot has reached: a token written below
        # it is a recomputation (what the `recompute` mode does on purpose).
        self.high = [0] * num_slots

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def check_room(self, slot: int, end: int) -> None:
        if not room.fits(0, end, self.capacity):
            raise CacheFullError(
                f"KV cache of model {self.shape.name} is full: request needs {end} positions, "
                f"budget is {self.capacity} per request; raise cache_tokens (--cache-tokens) "
                "or lower max_new_tokens / window"
            )

    def append(self, slot: int, n: int) -> int:
        """Reserve the next n committed positions; returns where they start."""
        start = self.length[slot]
        self.check_room(slot, start + n)
        self.length[slot] = start + n
        self.high[slot] = max(self.high[slot], start + n)
        return start

    def commit(self, slot: int, src: int, n: int) -> None:
        """Append scratch positions [src, src+n) to the committed sequence."""
        dst = self.length[slot]
        self.check_room(slot, max(dst, src) + n)
        if n and src != dst:
            # clone: source and destination may overlap when src < dst + n
            self.k[:, slot, :, dst : dst + n] = self.k[:, slot, :, src : src + n].clone()
            self.v[:, slot, :, dst : dst + n] = self.v[:, slot, :, src : src + n].clone()
        self.length[slot] = dst + n
        self.high[slot] = max(self.high[slot], dst + n)

    def crop(self, slot: int, n: int) -> None:
        if not 0 <= n <= self.length[slot]:
            raise ValueError(f"cannot crop slot {slot} of {self.shape.name} to {n} (length {self.length[slot]})")
        self.length[slot] = n


class KVCacheManager:
    """Slots shared by all models; each model's buffers sized by ``cache_tokens``."""

    def __init__(self, shapes: list[CacheShape], num_slots: int, cache_tokens: int):
        self.models = {s.name: ModelCache(s, num_slots, cache_tokens) for s in shapes}
        self.num_slots = num_slots
        self.cache_tokens = cache_tokens
        self._free = list(range(num_slots - 1, -1, -1))

    def __getitem__(self, name: str) -> ModelCache:
        return self.models[name]

    @property
    def bytes(self) -> int:
        return sum(m.bytes for m in self.models.values())

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.num_slots} request slots are in use; raise max_batch or wait for a request to finish")
        slot = self._free.pop()
        for m in self.models.values():
            m.length[slot] = m.high[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        for m in self.models.values():
            m.length[slot] = m.high[slot] = 0
        self._free.append(slot)
