"""SageSLA attention kernels: block-sparse INT8-QK / FP8-PV attention plus a linear branch.

``ref`` is the pure-PyTorch reference (imported eagerly by ``turbocompile.ops.attention``);
``triton_prep`` (pooling, block map, K/V quantization, linear statistics) and ``triton_attn``
(sparse forward with the fused linear-branch epilogue) import Triton and are loaded lazily.
"""

from turbocompile.kernels.sagesla import ref  # noqa: F401

__all__ = ["ref"]
