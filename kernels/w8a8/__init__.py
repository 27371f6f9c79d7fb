"""W8A8 linear kernels: 8-bit (INT8 or FP8 e4m3) weights and activations, fp32 scales.

* :mod:`.ref` - pure-PyTorch quantizer and exact (float64) scaled GEMM references.
* :mod:`.triton_quant` - one-pass Triton activation quantizers (block128 / per-token).
* :mod:`.triton_gemm` - Triton scaled GEMM (block-128 scales in the K loop, row scales in the
  epilogue, optional in-GEMM activation quantization), bias fused in the epilogue.

The Triton modules import ``triton``; import them lazily (``turbocompile.ops.w8a8`` does).
"""

from turbocompile.kernels.w8a8 import ref  # noqa: F401

__all__ = ["ref"]
