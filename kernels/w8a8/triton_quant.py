"""Triton activation quantizers: one memory-bound pass (read x once, write 8-bit codes + fp32 scales).

Same math as :func:`turbocompile.kernels.w8a8.ref.quantize_ref` (see its module docstring): amax in
fp32 with a 1e-8 floor, ``inv = 128/amax`` (int8) or ``448/amax`` (fp8) as one correctly rounded
division (``div_rn``: Triton's plain ``/`` is an approximate division on GPUs), ``q = rne(x * inv)``.
INT8 codes are bit-identical to the reference (checked on CPU and on an H200); e4m3 codes are
rounded to the e4m3 grid in fp32 before the cast (``e4m3_grid``): bit-exact on CPU, and on an H200
(2026-11-22, round 2) scales match exactly but ~5e-6 of the codes still differ from torch's CUDA
cast (2 of 1e6, 31 of 6.3e6); GEMM outputs agree to bf16 rounding. Not yet explained.

Traffic per element: 2 B read (bf16) + 1 B written; scales add 4 B per group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from turbocompile.ops._backend import triton_interpret

__all__ = ["quantize_triton", "rne", "quant_scale_math"]

# fp32 constant: a bare Python float would make the CPU interpreter compute the scale in fp64.
AMAX_FLOOR = tl.constexpr(1e-8)


@triton.jit
def rne(y, USE_RINT: tl.constexpr):
    """Round half to even. GPU: libdevice rint (cvt.rni). Interpreter: the 1.5*2^23 trick
    (exact for |y| < 2^22; the interpreter has no libdevice and numpy does not contract FMAs)."""
    if USE_RINT:
        r = libdevice.rint(y)
    else:
        r = (y + 12582912.0).to(tl.float32) - 12582912.0
    return r


@triton.jit
def e4m3_grid(y):
    """Round fp32 ``y`` (|y| <= 448) to the nearest e4m3 value, ties to even, staying in fp32.

    Used on every backend: the CPU interpreter's fp32 -> e4m3 cast mis-rounds when the mantissa
    carries into the exponent, and Triton 3.6's GPU cast disagreed with torch's RNE cast on a few
    codes on an H200 (2026-11-22 run). Values already on the grid convert exactly everywhere.
    Normals: round the fp32 bit pattern to 3 mantissa bits. Subnormals (|y| < 2^-6): quantum
    2^-9, via the add-and-subtract trick with 1.5 * 2^14.
    """
    bits = y.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    bits = (bits + 0x7FFFF + lsb) & -1048576  # clear the low 20 mantissa bits (~0xFFFFF)
    normal = bits.to(tl.float32, bitcast=True)
    sub = (y + 24576.0).to(tl.float32) - 24576.0
    return tl.where(tl.abs(y) < 0.015625, sub, normal)


@triton.jit
def dequant_scale(amax, IS_FP8: tl.constexpr):
    """The stored scale amax/qmax: a correctly rounded division for fp8 (448), exact for int8 (128)."""
    if IS_FP8:
        return tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    return amax * 0.0078125


@triton.jit
def quant_scale_math(x, amax, IS_FP8: tl.constexpr, USE_RINT: tl.constexpr):
    """Quantize fp32 ``x`` against its group ``amax`` (already floored, broadcastable).

    Returns the codes (int8 / e4m3) and the dequantisation scale ``amax/qmax``.
    """
    # The explicit fp32 casts matter only in the interpreter, where numpy may promote to fp64.
    amax = amax.to(tl.float32)
    if IS_FP8:
        inv = tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax).to(tl.float32)
        y = tl.minimum(tl.maximum((x * inv).to(tl.float32), -448.0), 448.0).to(tl.float32)
        y = e4m3_grid(y)  # round in fp32 first: the e4m3 cast below is then exact on any backend
        q = y.to(tl.float8e4nv)
    else:
        inv = tl.math.div_rn(tl.full(amax.shape, 128.0, tl.float32), amax).to(tl.float32)
        y = rne((x * inv).to(tl.float32), USE_RINT)
        y = tl.minimum(tl.maximum(y, -128.0), 127.0)
        q = y.to(tl.int8)
    return q, dequant_scale(amax, IS_FP8)


@triton.jit
def _quant_block128_kernel(
    x_ptr,  # [M, K] bf16/fp16/fp32
    q_ptr,  # [M, K] int8/e4m3, contiguous
    s_ptr,  # [ceil(M/128), ceil(K/128)] fp32, contiguous
    M,
    K,
    stride_xm,
    stride_xk,
    stride_qm,
    stride_sm,
    IS_FP8: tl.constexpr,
    USE_RINT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per 128x128 block: the block's amax is local, so one read of x suffices.
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK + tl.arange(0, BLOCK)
    rk = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), AMAX_FLOOR)  # masked lanes are 0
    q, s = quant_scale_math(x, amax, IS_FP8, USE_RINT)
    tl.store(q_ptr + rm[:, None].to(tl.int64) * stride_qm + rk[None, :], q, mask=mask)
    tl.store(s_ptr + pid_m * stride_sm + pid_k, s)


@triton.jit
def _quant_per_token_kernel(
    x_ptr,  # [M, K]
    q_ptr,  # [M, K] contiguous
    s_ptr,  # [M, 1] fp32
    M,
    K,
    stride_xm,
    stride_xk,
    stride_qm,
    IS_FP8: tl.constexpr,
    USE_RINT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    # BLOCK_M rows per program. ONE_PASS (K <= BLOCK_K): the rows stay in registers between the
    # amax and the quantization; otherwise a second sweep re-reads them (mostly from L2).
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    q_rows = q_ptr + rm[:, None].to(tl.int64) * stride_qm
    if ONE_PASS:
        rk = tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (rk < K)[None, :]
        x = tl.load(x_rows + rk[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_FLOOR)
        q, s = quant_scale_math(x, amax[:, None], IS_FP8, USE_RINT)
        tl.store(q_rows + rk[None, :], q, mask=mask)
        tl.store(s_ptr + rm[:, None], s, mask=row_ok[:, None])
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask = row_ok[:, None] & (rk < K)[None, :]
            x = tl.load(x_rows + rk[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        amax = tl.maximum(amax, AMAX_FLOOR)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask = row_ok[:, None] & (rk < K)[None, :]
            x = tl.load(x_rows + rk[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            q, s = quant_scale_math(x, amax[:, None], IS_FP8, USE_RINT)
            tl.store(q_rows + rk[None, :], q, mask=mask)
        tl.store(s_ptr + rm, dequant_scale(amax, IS_FP8), mask=row_ok)


@triton.jit
def _lean_codes(v, IS_FP8: tl.constexpr, NATIVE: tl.constexpr):
    """Codes of v = x·(qmax/amax) with |v| <= qmax·(1 + 2^-23) (see ``_quant_rows_kernel``)."""
    if IS_FP8:
        if NATIVE:
            q = v.to(tl.float8e4nv)
        else:
            q = e4m3_grid(tl.minimum(tl.maximum(v, -448.0), 448.0)).to(tl.float8e4nv)
    else:
        q = (tl.minimum(v, 127.0) + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)
    return q


@triton.jit
def _quant_rows_kernel(
    x_ptr,  # [M, K]
    q_ptr,  # [M, K] contiguous
    s_ptr,  # [M, 1] fp32
    M,
    K,
    stride_xm,
    stride_xk,
    stride_qm,
    IS_FP8: tl.constexpr,
    NATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_K2: tl.constexpr,
):
    """Per-token quantization with each row in registers as one or two power-of-two tiles
    (K = 1536 -> 1024 + 512, 5120 -> 4096 + 1024: no masked lanes) and a lean quantizer.

    INT8: |x·inv| <= 128·(1 + 2^-23) because amax is the row's own max, so only +127 needs a clamp,
    and the code is the low byte of bits(v + 1.5·2^23) = 0x4B400000 + rint(v) (ties to even).
    FP8 on the GPU (NATIVE): the saturating round-to-nearest-even cvt, no clamp (|v| <= 448·(1 + 2^-23)
    rounds to 448 anyway); the interpreter, whose cast is not RNE, rounds to the e4m3 grid first.
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    q_rows = q_ptr + rm[:, None].to(tl.int64) * stride_qm
    rk = tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (rk < K)[None, :]
    xa = tl.load(x_rows + rk[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(xa), axis=1)
    if BLOCK_K2 > 0:
        rk2 = BLOCK_K + tl.arange(0, BLOCK_K2)
        mask2 = row_ok[:, None] & (rk2 < K)[None, :]
        xb = tl.load(x_rows + rk2[None, :] * stride_xk, mask=mask2, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(xb), axis=1))
    amax = tl.maximum(amax, AMAX_FLOOR)[:, None]
    if IS_FP8:
        inv = tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax)
    else:
        inv = tl.math.div_rn(tl.full(amax.shape, 128.0, tl.float32), amax)
    tl.store(q_rows + rk[None, :], _lean_codes(xa * inv, IS_FP8, NATIVE), mask=mask)
    if BLOCK_K2 > 0:
        tl.store(q_rows + rk2[None, :], _lean_codes(xb * inv, IS_FP8, NATIVE), mask=mask2)
    tl.store(s_ptr + rm[:, None], dequant_scale(amax, IS_FP8), mask=row_ok[:, None])


# Per-token launch: "rows" (one/two-tile lean kernel, K <= 16384) or "loop" (the original kernel).
# H200 (benchmarks/RESULTS.md, session 5): K = 5120 INT8 0.276 vs 0.343 ms, FP8 0.273 vs 0.506 ms;
# K = 1536 0.047 vs 0.053 / 0.063 ms; and its FP8 codes equal torch's cast (the loop kernel's
# fp32 e4m3 rounding differed in ~6e-6 of them).
PER_TOKEN_KERNEL = "rows"


def quantize_triton(x: torch.Tensor, fmt: str, granularity: str,
                    config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D activation with the Triton kernels; same contract as ``quantize_ref``.

    Args:
        x: [M, K] bf16 / fp16 / fp32 (any strides).
        fmt: "int8" | "fp8".
        granularity: "block128" | "per_token" (a weight's "per_channel" is the same row-wise math).
        config: per-token launch override for benchmarks and tests: ``kernel`` ("rows" | "loop",
            default :data:`PER_TOKEN_KERNEL`), ``block_m``, ``num_warps``, ``split`` (rows kernel:
            two column tiles instead of one next_pow2(K) tile).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_triton: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quantize_triton: x must be bf16/fp16/fp32, got {x.dtype}")
    m, k = x.shape
    is_fp8 = fmt == "fp8"
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if is_fp8 else torch.int8, device=x.device)
    use_rint = not triton_interpret()
    if granularity == "block128":
        mb, kb = triton.cdiv(m, 128), triton.cdiv(k, 128)
        s = torch.empty((mb, kb), dtype=torch.float32, device=x.device)
        if m and k:
            _quant_block128_kernel[(kb, mb)](
                x, q, s, m, k, x.stride(0), x.stride(1), q.stride(0), s.stride(0),
                IS_FP8=is_fp8, USE_RINT=use_rint, BLOCK=128, num_warps=8,
            )
        return q, s
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    if k == 0:
        s.fill_(1e-8 / (448.0 if is_fp8 else 128.0))
        return q, s
    cfg = dict(kernel=PER_TOKEN_KERNEL, split=True)
    cfg.update(config or {})
    if cfg["kernel"] == "rows" and k <= 16384:
        from turbocompile.kernels.norms._launch import split_tiles

        bk, bk2 = split_tiles(k) if cfg["split"] else (max(16, triton.next_power_of_2(k)), 0)
        width = bk + bk2
        # about 4K elements per program, 4 warps up to 8K elements (best on the H200 at K = 1536,
        # 5120 and 8960: 2 rows x 4 warps, 1 x 4, 1 x 8)
        block_m = cfg.get("block_m") or min(16, 1 << max(0, (4096 // width).bit_length() - 1))  # a power of two
        num_warps = cfg.get("num_warps") or (4 if block_m * width <= 8192 else 8)
        _quant_rows_kernel[(triton.cdiv(m, block_m),)](
            x, q, s, m, k, x.stride(0), x.stride(1), q.stride(0),
            IS_FP8=is_fp8, NATIVE=use_rint, BLOCK_M=block_m, BLOCK_K=bk, BLOCK_K2=bk2, num_warps=num_warps,
        )
        return q, s
    block_k = min(triton.next_power_of_2(k), 16384)
    one_pass = k <= block_k
    block_m = cfg.get("block_m") or (max(1, min(16, 4096 // block_k)) if one_pass else 1)
    num_warps = cfg.get("num_warps") or (8 if block_m * block_k >= 4096 else 4)
    _quant_per_token_kernel[(triton.cdiv(m, block_m),)](
        x, q, s, m, k, x.stride(0), x.stride(1), q.stride(0),
        IS_FP8=is_fp8, USE_RINT=use_rint, BLOCK_M=block_m, BLOCK_K=block_k, ONE_PASS=one_pass,
        num_warps=num_warps,
    )
    return q, s
