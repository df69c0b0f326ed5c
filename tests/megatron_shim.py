"""Test-only shim: run megatron-core's CUDA-hard-coded optimizer and DDP code on CPU (DESIGN §5.2).

megatron-core 0.16.1 allocates its DDP buffers and the optimizers' scalars with ``device='cuda'``
or ``torch.cuda.current_device()``, checks ``param.type() == 'torch.cuda.FloatTensor'``, and
opens CUDA streams. Inside one test process, :func:`install` maps exactly those onto the CPU:

* ``torch.cuda.current_device()`` returns ``"cpu"`` (used as a ``device=`` argument);
* the factory functions Megatron calls with a CUDA device (``torch.tensor``, ``zeros``, ``empty``,
  ``ones``, ``full``) get ``device="cpu"`` instead, and ``Tensor.cuda()`` is the identity;
* ``Tensor.type()`` without arguments reports CPU float tensors as ``torch.cuda.*Tensor``;
* streams, ``synchronize`` and ``empty_cache`` are no-ops.

Nothing else changes: the collectives run on gloo, the math is Megatron's own. Never import this
outside tests; it is process-global and only meant for spawned test ranks.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_INSTALLED = False
_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor",
               "torch.HalfTensor": "torch.cuda.HalfTensor",
               "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, int):
        return True  # an ordinal means a CUDA device in Megatron's calls
    return str(device).startswith("cuda")


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)
    return wrapper


class _Stream:
    """Stands in for torch.cuda.Stream: waits and records are no-ops on one CPU stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event


def install() -> None:
    """Apply the CPU mappings in this process (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    for name in ("tensor", "zeros", "empty", "ones", "full", "arange"):
        setattr(torch, name, _cpu_factory(getattr(torch, name)))
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.device_count = lambda: 1
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Stream = _Stream
    torch.cuda.current_stream = lambda *a, **k: _Stream()
    torch.cuda.default_stream = lambda *a, **k: _Stream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.Tensor.cuda = lambda self, *a, **k: self
    original_type = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original_type(self, *args, **kwargs)
        name = original_type(self)
        return _TYPE_NAMES.get(name, name)

    torch.Tensor.type = type_
