"""A guard that fails on any device-to-host read inside a block of code.

On a GPU every such read (``.item()``, ``.tolist()``, ``.cpu()``, ``nonzero``,
``bool(t)``...) stalls the host until the device has caught up, so a decode step
that makes one cannot be queued ahead or graph-captured. On a CPU nothing
stalls, so the guard looks for the calls themselves: a ``TorchFunctionMode``
sees the Python-level methods (``tolist`` and ``numpy`` never reach the
dispatcher) and a ``TorchDispatchMode`` sees the aten ops that read data back
or need a data-dependent output size, whichever Python code issued them.
Used by the tests (and handy when hunting a sync); not on the serving path.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncError", "no_host_sync"]


class HostSyncError(RuntimeError):
    """A device-to-host read where none is allowed."""


_T = torch.Tensor
# Python-level calls that read a tensor's values on the host.
_FUNCS = {
    _T.item: "Tensor.item()", _T.tolist: "Tensor.tolist()", _T.cpu: "Tensor.cpu()", _T.numpy: "Tensor.numpy()",
    _T.__bool__: "bool(tensor)", _T.__int__: "int(tensor)", _T.__float__: "float(tensor)",
    _T.__index__: "tensor used as an index (operator.index)", _T.__complex__: "complex(tensor)",
    _T.__array__: "numpy.asarray(tensor)", _T.__repr__: "repr(tensor)", _T.__format__: "format(tensor)",
    _T.nonzero: "Tensor.nonzero()", torch.nonzero: "torch.nonzero()", torch.argwhere: "torch.argwhere()",
    _T.argwhere: "Tensor.argwhere()", torch.unique: "torch.unique()", _T.unique: "Tensor.unique()",
    torch.masked_select: "torch.masked_select()", _T.masked_select: "Tensor.masked_select()",
    torch.equal: "torch.equal()", _T.equal: "Tensor.equal()", torch.allclose: "torch.allclose()",
    _T.allclose: "Tensor.allclose()", torch.is_nonzero: "torch.is_nonzero()", _T.is_nonzero: "Tensor.is_nonzero()",
}

_aten = torch.ops.aten
# aten ops that read data back (or size their output by it). Inside a dispatch
# handler the mode is off, so reads an op makes internally (multinomial's
# validity check, a bool mask's nonzero) are caught by naming the op itself.
_OPS = {
    _aten._local_scalar_dense.default: "a scalar read (.item()/int()/float()/bool() of a tensor)",
    _aten.nonzero.default: "nonzero", _aten.masked_select.default: "masked_select",
    _aten._unique2.default: "unique", _aten.unique_dim.default: "unique", _aten.unique_consecutive.default: "unique",
    _aten.equal.default: "equal", _aten.is_nonzero.default: "is_nonzero", _aten.bincount.default: "bincount",
    _aten.multinomial.default: "multinomial (checks its input on the host)",
}
_OPTIONAL_OPS = ("_unique", "unique_dim_consecutive")
for _name in _OPTIONAL_OPS:
    _op = getattr(_aten, _name, None)
    if _op is not None and hasattr(_op, "default"):
        _OPS[_op.default] = "unique"


def _is_cpu_target(args: tuple, kwargs: dict) -> bool:
    dev = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            dev = a
        elif isinstance(a, torch.Tensor):
            dev = a.device
    try:
        return dev is not None and torch.device(dev).type == "cpu"
    except (RuntimeError, TypeError):
        return False


class _FunctionGuard(TorchFunctionMode):
    def __init__(self, host_to_device: bool):
        super().__init__()
        self.host_to_device = host_to_device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _FUNCS.get(func)
        if what is None and func is _T.to and _is_cpu_target(args, kwargs):
            what = "a copy to the CPU (.to('cpu'))"
        if what is None and self.host_to_device and func in (torch.tensor, torch.as_tensor) and args \
                and not isinstance(args[0], torch.Tensor):
            raise HostSyncError("host data made into a tensor in a no-sync region (torch.tensor): on CUDA "
                                "that is a blocking host->device copy; build it once, before the loop")
        if what is not None:
            raise HostSyncError(f"device-to-host read in a no-sync region: {what}")
        return func(*args, **kwargs)


def _index_has_mask(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _DispatchGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _OPS.get(func)
        if what is None:
            if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default) and _index_has_mask(args[1]):
                what = "indexing with a boolean mask (nonzero)"
            elif func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
                what = "repeat_interleave without output_size"
            elif func in (_aten._to_copy.default, _aten.copy_.default):
                src = args[0] if func is _aten._to_copy.default else args[1]
                dst = kwargs.get("device") if func is _aten._to_copy.default else args[0].device
                # an asynchronous copy into pinned memory does not wait for the device
                async_pinned = (func is _aten.copy_.default and (kwargs.get("non_blocking") or args[2:3] == (True,))
                                and args[0].is_pinned())
                if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None \
                        and torch.device(dst).type == "cpu" and not async_pinned:
                    what = "a device-to-host copy"
        if what is not None:
            raise HostSyncError(f"device-to-host read in a no-sync region: {what}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(host_to_device: bool = False) -> Iterator[None]:
    """Raise :class:`HostSyncError` on any device-to-host read inside the block.

    ``host_to_device=True`` also refuses ``torch.tensor(data)`` / ``torch.as_tensor(data)``
    from host data: on CUDA such a copy blocks too, so a loop that is to run
    ahead of the device builds its index tensors before it starts.
    """
    with _FunctionGuard(host_to_device), _DispatchGuard():
        yield
