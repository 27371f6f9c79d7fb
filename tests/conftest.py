"""Shared test setup.

On a machine without CUDA, Triton kernels are tested in Triton's CPU interpreter:
``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is created, so it
is set here, before test modules import kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
