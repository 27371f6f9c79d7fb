"""Making the right CUDA device current: graphs and ops on a GPU other than cuda:0.

Triton (and Gluon) launch a kernel on the *current* CUDA device, on that device's current stream,
whatever device the tensor arguments live on; so do ``torch.cuda.CUDAGraph`` capture and replay.
torch's own ops set the device from their inputs, but the bodies of the ``torch.ops.turbocompile``
ops are Python functions that the dispatcher runs without a device guard. A graph whose weights
sit on ``cuda:1`` would therefore launch its kernels on ``cuda:0`` with pointers into ``cuda:1``.

* :func:`device_scope` makes a device current for a whole call (optimize, one graph run, a CUDA
  graph's capture or replay): one device switch per call.
* :func:`on_tensor_device` wraps an op body: if its first tensor argument is on a CUDA device that is
  not current, the body runs with that device current. Covers a graph called directly
  (``OptimizeResult.graph_module(...)``) and ops called one by one. On the common path (CPU tensors,
  or the device already current) it only reads the tensor's device and the current one (0.4-0.6 µs a
  call, ``benchmarks/probe_device_guard.py``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager

import torch

__all__ = ["device_scope", "on_tensor_device"]


def device_scope(device: "torch.device | str | None") -> ContextManager:
    """``torch.cuda.device(device)`` for a CUDA device (the device current inside, restored after);
    a no-op context for None, CPU or any other device type."""
    if device is None:
        return contextlib.nullcontext()
    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def on_tensor_device(fn: Callable) -> Callable:
    """``fn`` run with the CUDA device of its first tensor positional argument current (see module doc).

    The wrapper keeps ``fn``'s name and docstring (``functools.wraps``); an op's schema must still be inferred
    from ``fn`` itself (``ops._registry.define`` does), since string annotations resolve in ``fn``'s module.
    """

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.is_cuda and a.get_device() != torch.cuda.current_device():
                    with torch.cuda.device(a.device):
                        return fn(*args, **kwargs)
                break
        return fn(*args, **kwargs)

    return guarded
