"""Shared by the GPU benchmarks: a callable captured in a CUDA graph, as the e2e forward runs."""

from __future__ import annotations

import torch


def graphed(fn):
    """Run ``fn`` once (compiles, autotunes), capture one call in a CUDA graph and return its replay:
    timing the replay leaves host launch overhead out."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay
