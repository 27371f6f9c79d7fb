"""Triton block128 x block128 scaled 8-bit GEMM (TurboDiffusion's W8A8 scheme), round 2.

``y[m, n] = sum_kb sA[m//128, kb] * sW[n//128, kb] * (qA[m, kb-block] . qW[n, kb-block]) + bias[n]``.

Why a separate kernel: with both operands block-scaled and ``BLOCK_M, BLOCK_N`` dividing 128, every
output tile lies inside ONE 128x128 scale block of each operand, so the per-K-block factor
``c = sA * sW`` is a SCALAR per (tile, K block): two scalar loads per K step instead of a
[BLOCK_N] vector (round 1 held ~32 scale registers per thread and issued ~32 loads per step).
Each K step (BLOCK_K = 128 = the scale block) is then: 8-bit dot -> int32 (int8) / fp32 (fp8)
partial, ``acc += partial * c`` in fp32. Only the summation order differs from the reference.

Variants (``VARIANT`` constexpr; the benchmark times all of them side by side):

* ``0`` "scalar": the straight loop above. Triton 3.6 waits on each wgmma before the rescale
  (an int32-accumulator wgmma is never made asynchronous by its pipeliner), so the tensor cores
  idle during the rescale unless another warpgroup/CTA on the SM fills the gap.
* ``1`` "magic" (int8 only): int32 -> fp32 by the exponent trick
  ``bits(p + 0x4B400000) - 1.5*2^23`` (exact for |p| < 2^22; a 128-deep int8 partial is at most
  2^21) instead of ``cvt.rn.f32.s32``, which runs on a narrower pipe.
* ``2`` "skew" (fp8 only): software-skewed loop. The dot of K block kb is issued before the
  rescale of block kb-1, so that rescale overlaps the running wgmma (DeepGEMM-style promotion).
  Triton makes a dot asynchronous only if its loop-carried result is consumed after a
  ``wgmma wait 0`` in the loop body; a tiny all-zero int8 dot at the top of the body (int32
  accumulator -> always synchronous) supplies that wait. It retires the previous block's dot,
  whose partial is then rescaled while the current block's dot runs. The tiny dot adds zero.

Measured (H200, benchmarks/RESULTS.md round 2): "scalar" is the default for both formats; "magic"
and "skew" were slower (the skew loop needs ~232 registers and an extra wgmma + wait per step).

Loads: rows/columns past M/N wrap (``% M``/``% N``), stores are masked; K tails masked unless
EVEN_K. Bias (fp32 math) in the epilogue.
"""

from __future__ import annotations

import triton
import triton.language as tl

from turbocompile.kernels.w8a8._tiling import grouped_tile

__all__ = ["block_gemm_kernel", "block_configs", "VARIANTS"]

VARIANTS = {"scalar": 0, "magic": 1, "skew": 2}


@triton.jit
def _load_tiles(a_ptrs, w_ptrs, k_left, rk, EVEN_K: tl.constexpr):
    if EVEN_K:
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
    else:
        a = tl.load(a_ptrs, mask=(rk < k_left)[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=(rk < k_left)[:, None], other=0.0)
    return a, w


@triton.jit
def _partial_f32(a, w, IS_FP8: tl.constexpr, MAGIC: tl.constexpr):
    """One K block's dot as fp32 (exact for int8: |partial| <= 2^21)."""
    if IS_FP8:
        part = tl.dot(a, w)
    else:
        p = tl.dot(a, w, out_dtype=tl.int32)
        if MAGIC:
            part = (p + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        else:
            part = p.to(tl.float32)
    return part


@triton.jit
def block_gemm_kernel(
    a_ptr,  # [M, K] int8 | e4m3
    w_ptr,  # [N, K] int8 | e4m3
    sa_ptr,  # [ceil(M/128), KB] fp32
    sw_ptr,  # [ceil(N/128), KB] fp32
    bias_ptr,  # [N] or dummy
    y_ptr,  # [M, N]
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_sam,
    stride_sak,
    stride_swn,
    stride_swk,
    stride_ym,
    stride_yn,
    IS_FP8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    VARIANT: tl.constexpr,
    BLOCK_M: tl.constexpr,  # divides 128
    BLOCK_N: tl.constexpr,  # divides 128
    BLOCK_K: tl.constexpr,  # == 128
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm_true = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_true = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rm_true % M
    rn = rn_true % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk  # W^T tile
    # The tile's scale rows: one 128-row block of A, one 128-column block of W.
    sa_row = sa_ptr + ((pid_m * BLOCK_M) // 128) * stride_sam
    sw_row = sw_ptr + ((pid_n * BLOCK_N) // 128) * stride_swn
    num_kb = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if VARIANT == 2:
        # Skewed: block 0's dot in the prologue; the body issues block kb's dot, then rescales
        # block kb-1's partial while it runs.
        a, w = _load_tiles(a_ptrs, w_ptrs, K, rk, EVEN_K)
        part = _partial_f32(a, w, IS_FP8, False)
        c = tl.load(sa_row) * tl.load(sw_row)
        sync = tl.zeros((BLOCK_M, 16), dtype=tl.int32)
        zero_b = tl.zeros((32, 16), dtype=tl.int8)
        for kb in range(1, num_kb):
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
            a, w = _load_tiles(a_ptrs, w_ptrs, K - kb * BLOCK_K, rk, EVEN_K)
            # Synchronous tiny dot (adds 0): its wgmma wait retires block kb-1's dot.
            sync_a = (tl.zeros((BLOCK_M, 32), dtype=tl.int32) + kb).to(tl.int8)  # loop-variant: not hoisted
            sync = tl.dot(sync_a, zero_b, sync, out_dtype=tl.int32)
            nxt = _partial_f32(a, w, IS_FP8, False)
            acc += part * c
            c = tl.load(sa_row + kb * stride_sak) * tl.load(sw_row + kb * stride_swk)
            part = nxt
        acc += part * c
        acc += tl.sum(sync, axis=1).to(tl.float32)[:, None]  # == 0; keeps the tiny dot alive
    else:
        for kb in range(0, num_kb):
            a, w = _load_tiles(a_ptrs, w_ptrs, K - kb * BLOCK_K, rk, EVEN_K)
            c = tl.load(sa_row + kb * stride_sak) * tl.load(sw_row + kb * stride_swk)
            part = _partial_f32(a, w, IS_FP8, VARIANT == 1)
            acc += part * c
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm_true[:, None].to(tl.int64) * stride_ym + rn_true[None, :] * stride_yn
    mask = (rm_true < M)[:, None] & (rn_true < N)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def block_configs(variant: int) -> list:
    """Autotune candidates. Tiles stay <= 128x128 (the scale block; a bigger fp32 accumulator
    plus the partial would not fit the register file). 128x64 / 64x128 tiles with few registers
    let 2-3 CTAs share an SM, so one CTA's rescale overlaps another's wgmma."""
    cfgs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]
    if variant != 2:
        cfgs.append(triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=8, num_stages=3))
        cfgs.append(triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=5))
        cfgs.append(triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4))
    return cfgs
