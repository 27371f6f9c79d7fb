"""CUDA-graph execution of a static-shape turbocompile graph (loaded artifact or optimize result).

A Wan forward launches ~1,000 kernels; on an H200 the host needs about as long to launch them as the
GPU needs to run them (benchmarks/RESULTS.md). :class:`CUDAGraphRunner` records the whole graph once
into a ``torch.cuda.CUDAGraph`` and replays it:

1. warm-up: run the graph ``warmup`` times on a side stream with the static input buffers, so Triton
   JIT compilation, autotuning (its benchmarks are host-synchronising) and cuBLAS/cuDNN handle
   creation happen before capture;
2. capture: one run under ``torch.cuda.graph`` (private memory pool: the intermediates keep fixed
   addresses; the static output buffer is reused by every replay);
3. call: copy the inputs into the static buffers (dtype converted by ``copy_``), ``replay()``, return a
   CLONE of the static output (a later call would overwrite it).

Shapes are those captured; any other shape is a one-line :class:`InputError`. Everything inside the
graph must be capturable: no host synchronisation (``.item()``, ``.cpu()``, data-dependent Python
control flow) and no pageable host-to-device copies. The turbocompile ops and their Triton wrappers
satisfy this (they only allocate with ``torch.empty``/``torch.zeros``/``torch.full`` on the device,
read shapes on the host and launch kernels).

Warm-up, capture and every replay run with the graph's device current (:func:`device_scope`): a CUDA
graph is captured from, and replayed on, the current device's streams.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from turbocompile.device_scope import device_scope
from turbocompile.errors import InputError, KernelUnavailableError

__all__ = ["CUDAGraphRunner", "signature_example_inputs", "require_cuda"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}


def require_cuda(device: torch.device, what: str = "CUDA-graph execution") -> None:
    """Raise :class:`KernelUnavailableError` unless ``device`` is a CUDA device and CUDA is available."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise KernelUnavailableError(f"{what} needs a CUDA GPU; this graph is on '{torch.device(device)}' "
                                     "(load it with device='cuda', or run without cuda_graph)")


def signature_example_inputs(signature: dict, device, seed: int = 0) -> list[torch.Tensor]:
    """Random inputs (standard normal; timesteps in [0, 1000)) shaped as a manifest ``signature``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for spec in signature["inputs"]:
        dt = _DTYPES[spec["dtype"]]
        t = torch.randn(spec["shape"], generator=gen, dtype=torch.float32)
        if spec["name"] == "timestep":
            t = torch.rand(spec["shape"], generator=gen) * 1000.0
        out.append(t.to(device=device, dtype=dt))
    return out


class CUDAGraphRunner(nn.Module):
    """Callable replaying ``graph_module`` from a CUDA graph; same positional call as the graph.

    Args:
        graph_module: the FX graph (weights on a CUDA device).
        example_inputs: tensors fixing the captured shapes/dtypes (copied into the static buffers).
        warmup: eager runs before capture (>= 1: compilation and autotuning must not happen inside
            the capture).
        names: input names for error messages.
        fn: what to run for warm-up and capture instead of ``graph_module`` itself, e.g. its
            :func:`turbocompile.eager.bind` runner (the same kernels, launched with less host work).
    """

    def __init__(self, graph_module: nn.Module, example_inputs: Sequence[torch.Tensor], *, warmup: int = 2,
                 names: Sequence[str] | None = None, fn=None):
        super().__init__()
        self.graph_module = graph_module
        run = graph_module if fn is None else fn
        device = next((t.device for t in list(graph_module.buffers()) + list(graph_module.parameters())),
                      example_inputs[0].device if example_inputs else torch.device("cpu"))
        require_cuda(device)
        if warmup < 1:
            raise ValueError("CUDAGraphRunner: warmup must be >= 1 (Triton compiles/autotunes on first use)")
        self.names = list(names) if names is not None else [f"input {i}" for i in range(len(example_inputs))]
        self.device = device
        self.static_inputs = [t.detach().to(device).clone() for t in example_inputs]
        with device_scope(device):
            stream = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.no_grad(), torch.cuda.stream(stream):
                for _ in range(warmup):
                    run(*self.static_inputs)
            torch.cuda.current_stream(device).wait_stream(stream)
            torch.cuda.synchronize(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph):
                self.static_output = run(*self.static_inputs)
            torch.cuda.synchronize(device)

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for t in self.static_inputs]

    def forward(self, *args):
        if len(args) != len(self.static_inputs):
            raise InputError(f"the CUDA graph was captured with {len(self.static_inputs)} inputs, got {len(args)}")
        for name, buf, a in zip(self.names, self.static_inputs, args):
            if not isinstance(a, torch.Tensor):
                raise InputError(f"{name} must be a tensor, got {type(a).__name__}")
            if tuple(a.shape) != tuple(buf.shape):
                raise InputError(f"{name} has shape {list(a.shape)}; the CUDA graph was captured for "
                                 f"{list(buf.shape)} (shapes are fixed; call without cuda_graph for others)")
        with device_scope(self.device):
            for buf, a in zip(self.static_inputs, args):
                buf.copy_(a, non_blocking=True)
            self.graph.replay()
            out = self.static_output
            if isinstance(out, torch.Tensor):
                return out.clone()
            return type(out)(o.clone() for o in out)
