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


# GELU_tanh(y) = y * sigmoid(2u), u = sqrt(2/pi) * (y + 0.044715 * y^3), and
# exp(-2u) = 2^(y * (C1 + C2 * y^2)) with the constants folded here (the compiler may not reassociate
# fp32 math, so written term by term the chain costs ~3x the instructions).
_GELU_C1 = tl.constexpr(-2.0 * 0.7978845608028654 * 1.4426950408889634)
_GELU_C2 = tl.constexpr(-2.0 * 0.7978845608028654 * 1.4426950408889634 * 0.044715)


@triton.jit
def _gelu_tanh(y, NATIVE: tl.constexpr):
    """fp32 GELU (tanh form) as ``y / (1 + 2^t)``, ``t = y (C1 + C2 y^2)`` clamped at 126 (2^126 is
    finite; beyond it GELU is -0 anyway).

    NATIVE (a GPU build): ex2 and rcp as PTX ``.approx.ftz`` instructions (two MUFU ops and no
    subnormal fix-ups; relative error ~2^-22 each, far below the bf16 rounding of the output).
    Otherwise (the CPU interpreter, which has no inline PTX) exp2 and a division.
    """
    t = tl.minimum(y * (_GELU_C1 + _GELU_C2 * (y * y)), 126.0)
    if NATIVE:
        r = tl.inline_asm_elementwise(
            "{ .reg .f32 e; ex2.approx.ftz.f32 e, $1; add.ftz.f32 e, e, 0f3F800000; rcp.approx.ftz.f32 $0, e; }",
            "=r,r", [t], dtype=tl.float32, is_pure=True, pack=1)
        return y * r
    return y / (1.0 + tl.exp2(t))


@triton.jit
def _round_bf16_rne(x):
    """fp32 -> nearest bf16 value (ties to even), still fp32. Only used under the CPU interpreter,
    whose fp32 -> bf16 cast truncates (the GPU cast is already round-to-nearest-even)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # clear the low 16 bits (~0xFFFF)
    return bits.to(tl.float32, bitcast=True)
