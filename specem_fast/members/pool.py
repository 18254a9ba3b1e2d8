"""Members in parallel: a round's per-member work on one host thread per group of members.

Members on different devices draft and verify concurrently: each device's
kernels are queued from its own host thread (its own CUDA stream, the device's
default one), so a round costs about the slowest member's time instead of the
sum. Members on one CPU run side by side too, each worker with its share of
the cores as torch intra-op threads: small models' matmuls use two threads
poorly and one member's Python work overlaps another's matmuls
(benchmarks/bench_parallel.py measures it; the figures are in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

from specem_fast.config import PARALLEL_CHOICES
from specem_fast.errors import SpecEMError

T = TypeVar("T")


def member_groups(devices: dict[str, torch.device | None], mode: str, cpu_threads: int | None = None
                  ) -> list[list[str]]:
    """Which members share a worker: "off" one group, "on" one per member, "auto" one per
    device, and one per member on a CPU with at least two intra-op threads to split
    (with one thread there is nothing to split).
    A member with no device here (``None``: in another process, behind HTTP) always has its own
    worker, whatever the mode: it only waits."""
    remote = [[m] for m, d in devices.items() if d is None]
    devices = {m: d for m, d in devices.items() if d is not None}
    if not devices:
        return remote
    if mode == "off":
        return [list(devices)] + remote
    if mode == "on":
        return [[m] for m in devices] + remote
    split_cpu = (torch.get_num_threads() if cpu_threads is None else cpu_threads) >= 2
    groups: dict[object, list[str]] = {}
    for m, d in devices.items():
        groups.setdefault(m if d.type == "cpu" and split_cpu else d, []).append(m)
    return list(groups.values()) + remote


class MemberPool:
    """Runs ``fn(member)`` for several members, one worker thread per group.

    With one group (every member on one device, the default on a CPU) it is a
    plain loop in the caller's thread: nothing changes. Results come back in
    the order asked; if any call raises, every worker is waited for first (no
    thread still touches a cache when the caller handles the error) and the
    first error in that order is raised.
    """

    def __init__(self, devices: dict[str, torch.device | None], mode: str = "auto", interpreted: bool = False):
        """``interpreted``: some member runs Triton kernels through the interpreter (on a CPU),
        which patches module state while a kernel runs, so members must run in turn."""
        if mode not in PARALLEL_CHOICES:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL_CHOICES)} (got {mode!r})")
        if interpreted and mode == "on":
            raise SpecEMError("parallel='on' cannot run Triton kernels on the CPU (the Triton interpreter is "
                              "not thread-safe); use parallel='auto' or 'off', or kernels='torch'")
        self.groups = member_groups(devices, "off" if interpreted else mode)
        self._group_of = {m: i for i, g in enumerate(self.groups) for m in g}
        self._device = [devices[g[0]] for g in self.groups]
        on_cpu = [i for i, d in enumerate(self._device) if d is not None and d.type == "cpu"]
        # CPU workers split the cores (each thread's intra-op thread count is its own)
        self._cpu_threads = {i: max(1, torch.get_num_threads() // len(on_cpu)) for i in on_cpu if len(on_cpu) > 1}
        self._pool = (ThreadPoolExecutor(len(self.groups), thread_name_prefix="specem-member")
                      if len(self.groups) > 1 else None)

    @property
    def concurrent(self) -> bool:
        return self._pool is not None

    def map(self, fn: Callable[[str], T], members: Sequence[str]) -> list[T]:
        by_group: dict[int, list[str]] = {}
        for m in members:
            by_group.setdefault(self._group_of[m], []).append(m)
        if self._pool is None or len(by_group) < 2:
            return [fn(m) for m in members]
        futures = {g: self._pool.submit(self._run_group, g, fn, names) for g, names in by_group.items()}
        done: dict[str, T] = {}
        errors: dict[str, BaseException] = {}
        for f in futures.values():
            out, err = f.result()
            done.update(out)
            errors.update(err)
        for m in members:
            if m in errors:
                raise errors[m]
        return [done[m] for m in members]

    def _run_group(self, g: int, fn: Callable[[str], T], names: list[str]):
        if g in self._cpu_threads and torch.get_num_threads() != self._cpu_threads[g]:
            torch.set_num_threads(self._cpu_threads[g])
        out, err = {}, {}
        dev = self._device[g]
        # Triton launches on the current device's stream: make it this group's GPU
        ctx = torch.cuda.device(dev) if dev is not None and dev.type == "cuda" else contextlib.nullcontext()
        with ctx:
            for m in names:
                try:
                    out[m] = fn(m)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    err[m] = exc
                    break  # this worker's later members would run on a state the error left behind
        return out, err

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
