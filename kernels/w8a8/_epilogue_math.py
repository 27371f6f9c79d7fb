"""Element-wise epilogue math shared by the GELU-epilogue GEMMs (pointer kernel in
:mod:`.triton_gemm_epilogue`, persistent TMA kernel in :mod:`.triton_gemm_tma`).

Kept in its own module so that both kernels can use the same jit functions (and so the same order of
fp32 operations) without the two GEMM modules importing each other.
"""

import triton
import triton.language as tl

__all__ = ["AMAX_GRANULE", "AMAX_MODE_IDS"]

# Columns per partial-amax entry ("partial" amax mode): the buffer is [M, ceil(N / AMAX_GRANULE)]
# whatever BLOCK_N the autotuner picks, so every stored tile width must be a multiple of it.
AMAX_GRANULE = 128
# amax_mode -> the kernels' AMAX_MODE constexpr: 0 none, 1 partial (per granule), 2 atomic (per row)
AMAX_MODE_IDS = {"none": 0, "partial": 1, "atomic": 2}


@triton.jit
def _gelu_tanh(y):
    """fp32 GELU (tanh form) as y * sigmoid(2u)."""
    u = (0.7978845608028654 * (y + 0.044715 * y * y * y)).to(tl.float32)
    # clamp: exp(88) is still finite in fp32; beyond it GELU is -0 anyway
    return (y / (1.0 + tl.exp(tl.minimum(-2.0 * u, 88.0)))).to(tl.float32)


@triton.jit
def _round_bf16_rne(x):
    """fp32 -> nearest bf16 value (ties to even), still fp32. Only used under the CPU interpreter,
    whose fp32 -> bf16 cast truncates (the GPU cast is already round-to-nearest-even)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # clear the low 16 bits (~0xFFFF)
    return bits.to(tl.float32, bitcast=True)
