"""Backend selection shared by every ``torch.ops.turbocompile`` op.

Each op takes a ``backend`` string argument with one of :data:`BACKENDS`:

* ``"torch"``  – the PyTorch reference kernel (runs on any device).
* ``"triton"`` – the Triton kernel. On a CUDA tensor it needs Triton; on a CPU tensor
  it runs only under ``TRITON_INTERPRET=1`` (how CI tests kernels). Anything else is a
  :class:`~turbocompile.errors.KernelUnavailableError`, never a silent fallback.
* ``"auto"``   – Triton on CUDA tensors when Triton imports, the reference on CPU
  tensors (there is no CPU fast path to hide). A CUDA tensor without Triton is an
  error too, so a missing fast path is never hidden.

Triton itself is imported lazily: ``import turbocompile`` never imports it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from turbocompile.errors import KernelUnavailableError

__all__ = ["BACKENDS", "has_triton", "triton_interpret", "resolve_backend", "check_backend"]

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when the ``triton`` package is importable (does not import it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> None:
    """Raise a one-line error unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise KernelUnavailableError(
            f"unknown backend '{backend}'; valid choices: {', '.join(BACKENDS)}"
        )


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Return ``"triton"`` or ``"torch"`` for a tensor on ``device``.

    Args:
        backend: one of :data:`BACKENDS`.
        device: device of the op's main input.
        op: op name, used in error messages.
    """
    check_backend(backend)
    if backend == "torch":
        return "torch"
    if device.type == "meta":
        return "torch"
    if backend == "auto":
        if device.type == "cpu":
            return "torch"
        if device.type == "cuda":
            if not has_triton():
                raise KernelUnavailableError(
                    f"{op}: backend 'auto' on a CUDA tensor needs Triton (pip install triton>=3.6), "
                    "or choose backend 'torch' explicitly"
                )
            return "triton"
        return "torch"
    # backend == "triton"
    if not has_triton():
        raise KernelUnavailableError(f"{op}: backend 'triton' requested but Triton is not installed")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and triton_interpret():
        return "triton"
    raise KernelUnavailableError(
        f"{op}: backend 'triton' needs a CUDA tensor (got {device.type}); on CPU set TRITON_INTERPRET=1 "
        "or choose backend 'torch' or 'auto'"
    )
