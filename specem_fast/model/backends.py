"""Backend checks, in one place: the device exists, the kernel path can run on it,
torch.compile can be used there. Run once per device before any weights load
(``Ensemble.from_pretrained``) and by each :class:`ModelRunner` for its own device."""

from __future__ import annotations

import os

import torch

from specem_fast import kernels
from specem_fast.config import KERNEL_CHOICES, EngineConfig, env_choice
from specem_fast.model.decode_step import compile_problem
from specem_fast.errors import SpecEMError


def check_device(dev: str | torch.device) -> torch.device:
    """The device, or a clear error for one this machine does not have."""
    try:
        d = torch.device(dev)
    except (RuntimeError, TypeError, ValueError):
        raise SpecEMError(f"unknown device {dev!r}: use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
            raise SpecEMError(f"device {str(dev)!r} asked for, but CUDA is not available ({why}); use --device cpu")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise SpecEMError(f"device {str(dev)!r} does not exist: {n} GPU(s) visible, cuda:0 to cuda:{n - 1}")
    elif d.type != "cpu":
        raise SpecEMError(f"device type {d.type!r} is not supported: use cpu or cuda[:N]")
    return d


def check_backend(device: str | torch.device, kernel_setting: str = "auto", compile: bool = False) -> bool:
    """Check that ``device`` can run the chosen kernels (and torch.compile); returns
    whether the Triton kernels serve it."""
    d = check_device(device)
    choice = env_choice("SPECEM_KERNELS", kernel_setting, KERNEL_CHOICES)  # kernels/ reads no environment
    if choice not in KERNEL_CHOICES:
        raise SpecEMError(f"kernels must be one of {', '.join(KERNEL_CHOICES)} (got {choice!r})")
    triton = kernels.use_triton(d, choice)
    if triton and (problem := kernels.triton_problem(d)):
        asked = "SPECEM_KERNELS=triton" if os.environ.get("SPECEM_KERNELS", "").strip() else "kernels='triton'"
        raise SpecEMError(f"{asked} cannot run on {device}: {problem}; use kernels='torch' (--kernels torch) or 'auto'")
    if compile and (problem := compile_problem(d)):
        raise SpecEMError(f"compile=True cannot be used on {device}: {problem}; or run without --compile")
    return triton


def check_engine(config: EngineConfig) -> None:
    """Every device of an engine configuration, before any weights load."""
    for dev in dict.fromkeys(config.devices or (config.device,)):
        check_backend(dev, config.kernels, config.compile)
