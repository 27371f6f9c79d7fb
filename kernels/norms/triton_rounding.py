"""Exact round-to-nearest-even casts written as fp32/bit arithmetic (Triton helpers).

On the GPU `x.to(tl.bfloat16)` and `x.to(tl.float8e4nv)` already round to nearest even, but
Triton's CPU interpreter truncates (bf16) or rounds half up (fp8). Rounding explicitly first
makes the later cast exact in both places, so CPU tests check the same bits the GPU produces;
the cost is a few integer ops per element in memory-bound kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(v, dt: tl.constexpr):
    """fp32 v rounded (RNE) to dt's precision, returned as fp32; dt in {fp32, bf16, fp16}."""
    if dt == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        # a NaN whose payload carries into the sign (0x7FFFFFFF, what NVIDIA's fp32 units produce) stays NaN
        return tl.where(v != v, v, ((bits >> 16) << 16).to(tl.float32, bitcast=True))
    elif dt == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def round_e4m3(v):
    """fp32 v with |v| <= 448 rounded (RNE) to the nearest float8_e4m3fn value, as fp32."""
    a = tl.abs(v)  # round the magnitude, then restore the sign (keeps -0.0 like torch)
    bits = a.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFFF + ((bits >> 20) & 1)  # keep 3 mantissa bits
    normal = ((bits >> 20) << 20).to(tl.float32, bitcast=True)
    sub = (a + 24576.0) - 24576.0  # multiples of 2^-9 (e4m3 subnormal spacing), ties to even
    r = tl.where(a < 0.015625, sub, normal)
    return tl.where(v < 0, -r, r)


@triton.jit
def rnd(v, dt: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 v rounded (RNE) to dt, as fp32. NATIVE (GPU): the hardware cast, one cvt per
    element pair; otherwise the bit arithmetic of :func:`round_to` (the CPU interpreter)."""
    # A plain v.to(dt).to(tl.float32) is folded away by the compiler (seen on an H200, Triton 3.6:
    # the gated residual then skipped its bf16 rounding), so the round trip goes through the bits.
    if NATIVE:
        if dt == tl.float32:
            return v
        elif dt == tl.bfloat16:
            return (v.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            return tl.inline_asm_elementwise("{ .reg .b16 t; cvt.rn.f16.f32 t, $1; cvt.f32.f16 $0, t; }",
                                             "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return round_to(v, dt)


@triton.jit
def to_dt(v, dt: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 v cast to dt with RNE in both places (the interpreter's own bf16 cast truncates)."""
    if NATIVE:
        return v.to(dt)
    else:
        return round_to(v, dt).to(dt)
