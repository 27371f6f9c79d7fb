"""Programmatic dependent launch (PDL, sm90+) between the kernels of one SageSLA call.

`prepare` and the attention kernel are a chain of short kernels on one stream (statistics, key means /
block map, top-k, quantization, attention). Normally each starts only after the previous one has
drained: its launch, the first wave's arrival and any work that does not need the previous kernel's
outputs all wait. With PDL (``launch_pdl=True`` on the launch) a kernel's programs may start as soon as
every program of the previous kernel has signalled ``griddepcontrol.launch_dependents``; a program then
runs ``griddepcontrol.wait`` before it touches anything the chain wrote, which returns once the
previous kernel has completed and its writes are visible.

The rule every kernel here follows keeps that safe for any order and mix of kernels, with or without
PDL: a kernel signals only after its own wait, so when its successor starts, everything before it in
the stream has completed; and before its wait a kernel only reads the op's inputs and writes nothing
to global memory (the attention kernel quantizes its q tile into shared memory there). A kernel
launched without PDL, or not on sm90+, runs the two instructions as no-ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from turbocompile.ops._backend import triton_interpret


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Top of a chained kernel: wait for the previous kernel (completed, writes visible), then let
    the next one's programs launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl_active(enabled, t: torch.Tensor) -> bool:
    """Whether to launch with PDL: asked for, on a CUDA device of compute capability 9 or above, and not
    under the CPU interpreter (which has no grid dependency control)."""
    return (bool(enabled) and t.is_cuda and not triton_interpret()
            and torch.cuda.get_device_capability(t.device)[0] >= 9)


def pdl_launch_kwargs(active: bool) -> dict:
    """Launch keyword arguments for a chained Triton kernel (none without PDL, so the interpreter and
    older GPUs see the usual launch)."""
    return {"launch_pdl": True} if active else {}
