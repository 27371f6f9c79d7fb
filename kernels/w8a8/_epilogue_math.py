"""Element-wise epilogue math shared by the epilogue GEMMs (pointer kernel in
:mod:`.triton_gemm_epilogue`, persistent TMA kernel in :mod:`.triton_gemm_tma`): GELU (tanh) and
the gated residual add ``x + y·gate``.

Kept in its own module so that both kernels can use the same jit functions (and so the same order of
fp32 operations) without the two GEMM modules importing each other.
"""

from typing import Any, NamedTuple

import triton
import triton.language as tl

from turbocompile.kernels.norms.triton_rounding import rnd

__all__ = ["AMAX_GRANULE", "AMAX_MODE_IDS", "GELU_NATIVE_FORMS", "GELU_NATIVE_FORM", "RESIDUAL_IDS", "ResidualArgs",
           "gelu_native", "gelu_rowscale_codes_native", "residual_torch"]

# Columns per partial-amax entry ("partial" amax mode): the buffer is [M, ceil(N / AMAX_GRANULE)]
# whatever BLOCK_N the autotuner picks, so every stored tile width must be a multiple of it.
AMAX_GRANULE = 128
# amax_mode -> the kernels' AMAX_MODE constexpr: 0 none, 1 partial (per granule), 2 atomic (per row),
# 3 pow2 (TMA kernel only: FP8 codes at per-granule power-of-two scales instead of y, maxima as 1),
# 4 rowscale (TMA kernel only: FP8 codes at given per-row power-of-two scales, read from the buffer),
# 5 sumsq (TMA kernel only: y as usual, and the fp32 sums of squares of each granule in the buffer instead
# of maxima; the fused cross-attention's q RMSNorm statistic)
AMAX_MODE_IDS = {"none": 0, "partial": 1, "atomic": 2, "pow2": 3, "rowscale": 4, "sumsq": 5}


# GELU_tanh(y) = y * sigmoid(2u), u = sqrt(2/pi) * (y + 0.044715 * y^3), and
# exp(-2u) = 2^(y * (C1 + C2 * y^2)) with the constants folded here (the compiler may not reassociate
# fp32 math, so written term by term the chain costs ~3x the instructions).
_GELU_C1 = tl.constexpr(-2.0 * 0.7978845608028654 * 1.4426950408889634)
_GELU_C2 = tl.constexpr(-2.0 * 0.7978845608028654 * 1.4426950408889634 * 0.044715)
# u itself, for the tanh form: u = y * (A1 + A2 * y^2)
_GELU_A1 = tl.constexpr(0.7978845608028654)
_GELU_A2 = tl.constexpr(0.7978845608028654 * 0.044715)

# residual mode -> the kernels' RESIDUAL constexpr: 0 none, 1 ``x + y``, 2 ``x + y·gate``
RESIDUAL_IDS = {"none": 0, "add": 1, "gated": 2}


class ResidualArgs(NamedTuple):
    """Host-side operands of a residual epilogue (built by ``triton_gemm_residual.residual_args``).

    x: the residual [M, N] in the GEMM's output dtype, unit column stride (rows may be strided);
    gate: None (``x + y``) or the gate tensor, read as a [B, L, N] view with strides (stride_gb,
    stride_gl, 1), L = rows per sample; gate_mode: the kernels' GATE_MODE (see :func:`_gated_residual`);
    load: "tma" (a TMA descriptor over x, TMA kernel only) or "pointer" (masked loads).
    """

    x: Any
    gate: Any
    L: int
    stride_gb: int
    stride_gl: int
    gate_mode: int
    load: str


def residual_torch(y: Any, res: ResidualArgs) -> Any:
    """``res.x + y·gate`` with torch ops in y's dtype (the eager roundings), for degenerate launches (K = 0)."""
    import torch

    if res.gate is None:
        return res.x + y
    m, n = y.shape
    g = torch.as_strided(res.gate, (m // res.L, res.L, n), (res.stride_gb, res.stride_gl, 1)).reshape(m, n)
    return res.x + y * g.to(y.dtype)


# How a GPU build evaluates the GELU (the kernels' NATIVE constexpr; 0 is the portable form the CPU
# interpreter runs):
#   1 "ex2_rcp": y / (1 + 2^t) with ex2.approx.ftz and rcp.approx.ftz: two MUFU ops per element.
#   2 "tanh":    0.5 y (1 + tanh u) with tanh.approx.f32: one MUFU op per element. The MUFU unit
#                issues 16 results per clock per SM (1/8 of the FP32 pipe), so in a 128x256 tile
#                epilogue the two-MUFU form costs ~4096 clocks of MUFU time, the tanh form half.
#                tanh.approx.f32 has ~2^-11 relative error: below the bf16 rounding of the output for
#                y > 0; for y < 0 the 1 + tanh u cancellation turns it into an absolute error of at
#                most ~2^-12 |y| (GELU is then tiny).
GELU_NATIVE_FORMS = {"ex2_rcp": 1, "tanh": 2}
GELU_NATIVE_FORM = "tanh"


def gelu_native(interpret: bool) -> int:
    """The NATIVE constexpr for a GELU-epilogue launch: 0 under the CPU interpreter (no inline PTX),
    else the id of :data:`GELU_NATIVE_FORM` (module-level, so a benchmark can compare the forms)."""
    return 0 if interpret else GELU_NATIVE_FORMS[GELU_NATIVE_FORM]


@triton.jit
def _gelu_tanh(y, NATIVE: tl.constexpr):
    """fp32 GELU (tanh form).

    NATIVE 0 (the CPU interpreter, which has no inline PTX): ``y / (1 + 2^t)``, ``t = y (C1 + C2 y^2)``
    clamped at 126 (2^126 is finite; beyond it GELU is -0 anyway), with exp2 and a division.
    NATIVE 1: the same formula with ex2 and rcp as PTX ``.approx.ftz`` (two MUFU ops, no subnormal
    fix-ups; relative error ~2^-22 each). NATIVE 2: ``h + h tanh(u)``, ``h = y / 2``, with PTX
    ``tanh.approx.f32`` (one MUFU op; see GELU_NATIVE_FORMS for its error).
    """
    if NATIVE == 2:
        u = y * (_GELU_A1 + _GELU_A2 * (y * y))
        th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True,
                                       pack=1)
        h = 0.5 * y
        return h + h * th
    t = tl.minimum(y * (_GELU_C1 + _GELU_C2 * (y * y)), 126.0)
    if NATIVE == 1:
        r = tl.inline_asm_elementwise(
            "{ .reg .f32 e; ex2.approx.ftz.f32 e, $1; add.ftz.f32 e, e, 0f3F800000; rcp.approx.ftz.f32 $0, e; }",
            "=r,r", [t], dtype=tl.float32, is_pure=True, pack=1)
        return y * r
    return y / (1.0 + tl.exp2(t))


@triton.jit
def gelu_rowscale_codes_native(y, c):
    """e4m3 codes ``e4m3_rne(bf16(GELU(y)) / s)`` of an fp32 tile y, ``c = 0.5 / s`` per row ([BLOCK_M] fp32,
    s a power of two), in the GPU form (``tanh.approx.f32``, inline PTX; never under the interpreter).

    The same values as ``_gelu_tanh(y, 2)`` rounded to bf16, times ``1 / s``, cast to e4m3, with fewer
    instructions per element (the GELU GEMM's epilogue is issue-bound):

    * the scaling moves in front: ``hs = y·(0.5/s)``, ``v = hs + hs·tanh(u)`` is ``(h + h·tanh u) / s``
      exactly (a power of two commutes with fp32 rounding; bf16 shares fp32's exponent range), so
      ``bf16(v) = bf16(h) / s`` and the separate ``0.5·y`` and ``· 1/s`` multiplies go;
    * no clamp at ±448: ``cvt.rn.satfinite`` saturates;
    * the bf16 rounding is one packed ``cvt.rn.bf16x2.f32`` per two values, read back as fp32 by a
      shift / a mask (Triton's own cast rounds one value per instruction), and the e4m3 cast is one
      ``cvt.rn.satfinite.e4m3x2.f32`` per two values.
    """
    u = y * (_GELU_A1 + _GELU_A2 * (y * y))
    th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True, pack=1)
    hs = y * c[:, None]
    v = hs + hs * th
    # two values per asm instance: one packed bf16x2 rounding, read back as fp32 (shift / mask); the e4m3
    # cast below pairs neighbouring columns into cvt.rn.satfinite.e4m3x2.f32 (byte pairs as stored)
    vb = tl.inline_asm_elementwise(
        "{ .reg .b32 b; cvt.rn.bf16x2.f32 b, $3, $2; shl.b32 $0, b, 16; and.b32 $1, b, 0xFFFF0000; }",
        "=r,=r,r,r", [v], dtype=tl.float32, is_pure=True, pack=2)
    return vb.to(tl.float8e4nv)


@triton.jit
def _round_bf16_rne(x):
    """fp32 -> nearest bf16 value (ties to even), still fp32. Only used under the CPU interpreter,
    whose fp32 -> bf16 cast truncates (the GPU cast is already round-to-nearest-even)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # clear the low 16 bits (~0xFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gated_residual(v, x, gate_ptr, rm, rn, row0, M, N, L, stride_gb, stride_gl,
                    RESIDUAL: tl.constexpr, GATE_MODE: tl.constexpr, NATIVE: tl.constexpr):
    """``x_new = x + y·gate`` for a [BLOCK_M, WIDTH] tile, rounded exactly as the unfused graph.

    v: the GEMM's fp32 value (scales and bias applied, not rounded); x: the residual tile in its storage
    dtype DT, which is also the output dtype; rows ``rm`` / columns ``rn`` of the [M, N] output, the
    tile's first row ``row0``. The unfused graph stores y = DT(v), then
    ``turbocompile::residual_ln_modulate`` computes (the norm kernels' ``_residual``, the eager
    ``x + y * gate.to(dt)``): g = DT(gate), t = DT(y·g) (y·g of two DT values is exact in fp32, so one
    rounding), x_new = DT(x + t). Same sequence here, through the bit-level round trip of :func:`rnd` (a
    plain ``.to(dt).to(fp32)`` can be folded away by the compiler). RESIDUAL 1: no gate, x_new = DT(x + y).
    Exception: for an fp32 residual the round trip is the identity, and a GPU build contracts x + y·g into
    one FMA (the product unrounded): each element is then eager's value or the once-rounded fp64 x + y·g.

    The gate is element [b, l, n] of a [B, L, N] view (strides stride_gb, stride_gl, 1; b = row // L,
    l = row % L), read per GATE_MODE: 0 one [WIDTH] vector for every row (B = 1 or one gate for all
    samples); 1 per-sample gate (stride_gl = 0) with L >= BLOCK_M, so a tile spans at most two samples:
    two vectors and a select per row; 2 a full gather (per-token gates; register-hungry, no Wan graph
    uses it). Returns x_new in fp32 (exactly representable in DT).
    """
    dt: tl.constexpr = x.dtype
    y = rnd(v, dt, NATIVE)
    if RESIDUAL == 2:
        n_ok = rn < N
        if GATE_MODE == 0:
            g = tl.load(gate_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        elif GATE_MODE == 1:
            b0 = row0 // L
            b1 = tl.minimum(b0 + 1, (M - 1) // L)
            g0 = tl.load(gate_ptr + b0.to(tl.int64) * stride_gb + rn, mask=n_ok, other=0.0).to(tl.float32)
            g1 = tl.load(gate_ptr + b1.to(tl.int64) * stride_gb + rn, mask=n_ok, other=0.0).to(tl.float32)
            g = tl.where((rm // L == b0)[:, None], g0[None, :], g1[None, :])
        else:
            rows = rm.to(tl.int64)
            g_off = (rows // L) * stride_gb + (rows % L) * stride_gl
            g = tl.load(gate_ptr + g_off[:, None] + rn[None, :], mask=(rm < M)[:, None] & n_ok[None, :],
                        other=0.0).to(tl.float32)
        y = rnd(y * rnd(g, dt, NATIVE), dt, NATIVE)
    return rnd(x.to(tl.float32) + y, dt, NATIVE)
