"""Memoised environment probes for test gating (never raise)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=None)
def has_cuda() -> bool:
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_here() -> bool:
    """Triton kernels can run: on a GPU, or in the CPU interpreter."""
    return has_triton() and (has_cuda() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


def sm_at_least(major: int, minor: int = 0) -> bool:
    if not has_cuda():
        return False
    return torch.cuda.get_device_capability() >= (major, minor)


def kernel_device() -> str:
    """Device on which kernel tests run: cuda when present, else cpu (interpreter)."""
    return "cuda" if has_cuda() else "cpu"
