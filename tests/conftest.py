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

# Models that a test builds without naming a device go to the CPU, on a GPU machine too (and whatever the shell
# exports): the pass, export and integration tests feed them CPU inputs, as in CI. Kernel and op tests pick their
# device themselves (tests._env.kernel_device), and tests meant for the GPU pass device="cuda".
os.environ["TURBOCOMPILE_DEVICE"] = "cpu"


def pytest_configure(config):
    """Under pytest-xdist (``-n``), each worker's torch gets its share of the cores. With every worker on all of
    them, threads oversubscribe the machine: on a 16-core GPU host, 14 workers ran the tests outside tests/kernels
    and tests/ops in 90 s with this, and had done under a third of them after 9 minutes without (session 31)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        share = max(1, cores // int(workers))
        torch.set_num_threads(share)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))  # the CLI and compile-check subprocesses too


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
