"""Kernel families (installed as ``turbocompile.kernels``): each has a PyTorch ``ref`` and lazily imported Triton modules."""
