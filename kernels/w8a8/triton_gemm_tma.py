"""Persistent TMA W8A8 GEMM, per-token (activation) x per-channel (weight) scales, Hopper (sm90+).

``y[m, n] = (sum_k qA[m, k] * qW[n, k]) * sA[m] * sW[n] + bias[n]`` -> bf16 / fp16 / fp32.

* Operands are read through host-side TMA tensor descriptors
  (:class:`triton.tools.tensor_descriptor.TensorDescriptor`): qA [M, K] as [BLOCK_M, BLOCK_K] boxes,
  qW in nn.Linear's [N, K] layout (the pass stores it so, K contiguous) as [BLOCK_N, BLOCK_K] boxes,
  transposed in the dot (``w.T``) - both operands K-major, which is what the 8-bit wgmma needs; no
  weight copy per call. The TMA unit zero-fills boxes that stick out of the tensor, so M, N and K
  tails need no masks in the K loop (a zero code times anything adds nothing).
* INT8 accumulates in int32 (exact), FP8 e4m3 in fp32 (Triton's default fp8 wgmma accumulation, as
  in the pointer kernel of :mod:`.triton_gemm`).
* Persistent grid: min(#SMs, #tiles) programs; program p handles tiles p, p + #SMs, ... in the
  grouped (GROUP_M-swizzled) order of :func:`._tiling.grouped_coords`, so each wave of #SMs tiles
  shares A row tiles and W column tiles in L2. The tile loop is a ``tl.range(..., flatten=FLATTEN)``
  so the compiler can pipeline the next tile's loads under the current tile's epilogue.
* Epilogue: int32 -> fp32, ``* sA[m] * sW[n] + bias[n]`` in fp32 (same order of operations as the
  pointer kernel, so INT8 results are identical), cast, TMA store (clipped at M, N). With
  EPILOGUE_SUBTILE the BLOCK_N tile is split into two halves that are scaled and stored one after
  the other (fewer live fp32 registers, half the store staging buffer).
* Optional epilogue extensions (constexprs, all off for the plain GEMM, whose code is unchanged):
  ACTIVATION 1 = GELU (tanh form) on the fp32 value before the cast (``h = GELU(y)``, the FFN's
  ffn.0; same jit helper as the pointer kernel of :mod:`.triton_gemm_epilogue`, so INT8 results are
  identical to it), and AMAX_MODE 1 "partial" / 2 "atomic": the abs-max of exactly the values
  stored (after the cast, over real rows and columns) per 128-column granule into
  ``amax [M, ceil(N/128)]``, or per row via atomic_max into a zeroed ``amax [M, 1]`` - the
  contract of :mod:`.triton_gemm_epilogue`, whose per-token quantizer consumes it. The partial
  mode needs every stored width (BLOCK_N, or BLOCK_N / 2 with EPILOGUE_SUBTILE) to be a multiple
  of 128: its autotune list drops the other configs, a fixed config is refused with a ValueError.
  RESIDUAL 1 / 2: ``x_new = x + y`` / ``x + y·gate`` (the Wan blocks' residual stream) with the unfused
  graph's roundings (``_epilogue_math._gated_residual``): the residual tile x is read through its own TMA
  descriptor (RES_TMA) or with masked pointer loads, and x_new is what the descriptor store writes.
  AMAX_MODE 3 "pow2" (same width rule): y holds FP8 e4m3 codes instead of the values, each 128-column
  granule of a row at its own power-of-two scale, with the granule maxima in ``amax`` as in "partial"
  (:func:`.triton_pow2.pow2_granule_codes`; out_dtype is then the dtype the values are rounded to
  first, and the code rows need N % 16 == 0). AMAX_MODE 4 "rowscale": FP8 codes at power-of-two row
  scales given in ``amax`` [M, 1] (:func:`.triton_bound.rowscale_codes`; no width rule). AMAX_MODE 5
  "sumsq": y stored as usual, and the fp32 sum of squares of exactly the values stored per 128-column
  granule into ``amax [M, ceil(N/128)]`` (layout and width rule of "partial"): the RMSNorm statistic of
  y's rows, which the fused cross-attention reads instead of re-reading y (:func:`_store_sumsq`).

Shape rule (see :func:`tma_unsupported_reason`): TMA needs 16-byte aligned bases and row strides,
i.e. K % 16 == 0 for the 1-byte operands (contiguous rows) and N * out_itemsize % 16 == 0 for y;
:func:`turbocompile.kernels.w8a8.triton_gemm.w8a8_gemm_triton` routes everything else to the
pointer kernel by this rule, never by catching a failure.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from turbocompile.kernels.w8a8 import _epilogue_math as _em
from turbocompile.kernels.w8a8._epilogue_math import (AMAX_GRANULE, AMAX_MODE_IDS, _gated_residual, _gelu_tanh,
                                                      _round_bf16_rne, gelu_rowscale_codes_native)
from turbocompile.kernels.w8a8._tiling import grouped_coords
from turbocompile.kernels.w8a8._tuned_launch import launch_tuned
from turbocompile.kernels.w8a8.triton_bound import rowscale_codes
from turbocompile.kernels.w8a8.triton_pow2 import pow2_granule_codes
from turbocompile.ops._backend import triton_interpret

__all__ = [
    "ACTIVATIONS",
    "FLATTEN",
    "FP8_PROMOTE",
    "tma_configs",
    "tma_hardware_ok",
    "tma_unsupported_reason",
    "tuned_tma_config",
    "w8a8_gemm_tma",
]

# Flatten the persistent tile loop with the K loop (tl.range(..., flatten=True)). Module-level so a
# benchmark can compare / turn it off; it is a constexpr of the kernel (changing it recompiles).
FLATTEN = True
# FP8 only: promote the K loop's sums to an fp32 accumulator every BLOCK_K (``max_num_imprecise_acc``).
# Hopper's FP8 wgmma otherwise adds into a reduced-precision accumulator for the whole K loop (Triton's
# sm90 default), whose error grows with K: 2.8e-3 relative at K = 13824 vs 1.3e-4 promoted (RESULTS.md,
# session 21). Off: on an H100 it makes the six Wan GEMM shapes 42-57% slower (session 22: every k-tile's
# wgmma result must be waited for and added in fp32, so products no longer overlap), for an accuracy
# gain that FP8's own quantization error (3.8e-2) hides. A constexpr of the kernel (and of the autotune key).
FP8_PROMOTE = False
# The GELU GEMM's FP8-codes epilogue at given row scales (AMAX_MODE 4, GPU tanh form, bf16 h) in its short
# form (_gelu_rowscale_tile: same codes, ~3 fewer instructions per element). Module-level so that a
# benchmark can time the long form (the generic _scale_bias_cast + rowscale_codes) beside it.
GELU_CODES_SHORT = True

_OUT_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
# activation name -> the kernel's ACTIVATION constexpr (0 = none)
ACTIVATIONS = {"gelu_tanh": 1}
# Programs per tile loop under the CPU interpreter: small, so tests walk several tiles per program.
_INTERPRET_SMS = 3


@triton.jit
def _dequant_bias(acc, s_a, sw_ptr, bias_ptr, rn, N, stride_swn, HAS_BIAS: tl.constexpr):
    """``acc * sA[m] * sW[n] (+ bias[n])`` in fp32 for the columns ``rn``, in that order of operations (the
    pointer kernel's, so INT8 results are identical to it)."""
    n_ok = rn < N
    v = acc.to(tl.float32) * s_a[:, None]
    v = v * tl.load(sw_ptr + rn * stride_swn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        v += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return v


@triton.jit
def _scale_bias_cast(
    acc,  # [BLOCK_M, WIDTH] int32 | fp32 raw dot sums
    s_a,  # [BLOCK_M] fp32 activation scales of this tile's rows (0 past M)
    sw_ptr,
    bias_ptr,
    off_n,
    N,
    stride_swn,
    HAS_BIAS: tl.constexpr,
    OUT_KIND: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    NATIVE: tl.constexpr,
    WIDTH: tl.constexpr,
    res,  # RESIDUAL: the residual tile of these rows/columns in y's dtype (else unused)
    gate_ptr,
    rm,  # [BLOCK_M] row indices of the tile
    row0,  # the tile's first row
    M,
    L,
    stride_gb,
    stride_gl,
    RESIDUAL: tl.constexpr,
    GATE_MODE: tl.constexpr,
):
    """``act(acc * sA[m] * sW[n] + bias[n])`` in fp32 for columns off_n..off_n+WIDTH, cast to y's
    dtype (act = identity, or GELU-tanh for ACTIVATION 1: the pointer GELU kernel's order of fp32
    operations); with RESIDUAL, ``res + y·gate`` instead (``_epilogue_math._gated_residual``). (The
    descriptor loads/stores stay in the kernel body: descriptors are not passed to helpers.)"""
    rn = off_n + tl.arange(0, WIDTH)
    v = _dequant_bias(acc, s_a, sw_ptr, bias_ptr, rn, N, stride_swn, HAS_BIAS)
    if ACTIVATION == 1:
        v = _gelu_tanh(v, NATIVE)
    if RESIDUAL != 0:
        # every value is rounded explicitly: the result is exact in y's dtype, the cast below too
        v = _gated_residual(v, res, gate_ptr, rm, rn, row0, M, N, L, stride_gb, stride_gl, RESIDUAL, GATE_MODE,
                            NATIVE != 0)
    elif ROUND_BF16:
        v = _round_bf16_rne(v)  # the interpreter's bf16 cast truncates; this makes it exact
    if OUT_KIND == 0:
        out = v.to(tl.bfloat16)
    elif OUT_KIND == 1:
        out = v.to(tl.float16)
    else:
        out = v
    return out


@triton.jit
def _gelu_rowscale_tile(acc, s_a, sw_ptr, bias_ptr, off_n, N, stride_swn, HAS_BIAS: tl.constexpr, s_ptr, rm, M,
                        stride_sm, WIDTH: tl.constexpr):
    """GPU form of ``_scale_bias_cast`` (GELU, bf16 h) + ``rowscale_codes``: the same codes, from
    :func:`._epilogue_math.gelu_rowscale_codes_native` (fewer instructions per element)."""
    y = _dequant_bias(acc, s_a, sw_ptr, bias_ptr, off_n + tl.arange(0, WIDTH), N, stride_swn, HAS_BIAS)
    s = tl.load(s_ptr + rm * stride_sm, mask=rm < M, other=1.0)
    return gelu_rowscale_codes_native(y, tl.math.div_rn(tl.full(s.shape, 0.5, tl.float32), s))


@triton.jit
def _load_residual(res_ptr, rm, off_n, M, N, stride_rm, WIDTH: tl.constexpr):
    """Residual tile [BLOCK_M, WIDTH] (rows rm, columns off_n..) in its storage dtype, masked at M and N
    (unit column stride)."""
    rn = off_n + tl.arange(0, WIDTH)
    return tl.load(res_ptr + rm[:, None].to(tl.int64) * stride_rm + rn[None, :],
                   mask=(rm < M)[:, None] & (rn < N)[None, :], other=0.0)


@triton.jit
def _store_amax(
    out,  # [BLOCK_M, WIDTH] the values just stored (y's dtype)
    amax_ptr,
    rm,  # [BLOCK_M] row indices of the tile
    off_n,
    M,
    N,
    stride_amax_m,
    AMAX_MODE: tl.constexpr,  # 1 partial (per GRANULE columns), 2 atomic (per row)
    GRANULE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    WIDTH: tl.constexpr,
):
    """abs-max of the stored (rounded) values over real columns: per granule into amax [M, G]
    (columns off_n.. start a granule, WIDTH is a multiple of GRANULE), or atomic_max per row into a
    zeroed amax [M, 1]. Rows past M are never written (their values are not stored either)."""
    rn = off_n + tl.arange(0, WIDTH)
    # columns past N hold GELU(0) = 0 anyway (zero-filled W box, zero scale and bias): masked to be
    # independent of that
    ah = tl.where((rn < N)[None, :], tl.abs(out.to(tl.float32)), 0.0)
    row_ok = rm < M
    if AMAX_MODE == 1:
        tl.static_assert(WIDTH % GRANULE == 0, "partial amax: stored tile width must be a multiple of GRANULE")
        G: tl.constexpr = WIDTH // GRANULE
        if G == 1:
            gmax = tl.max(ah, axis=1)[:, None]  # one granule (128-wide stores): a plain row reduction
        else:
            gmax = tl.max(tl.reshape(ah, (BLOCK_M, G, GRANULE)), axis=2)  # [BLOCK_M, G]
        # granule indices as a vector even for G == 1: a half tile may lie wholly past N (the
        # descriptor store clips it), and its granule must not be written
        rg = off_n // GRANULE + tl.arange(0, G)
        tl.store(amax_ptr + rm[:, None].to(tl.int64) * stride_amax_m + rg[None, :], gmax,
                 mask=row_ok[:, None] & (rg < tl.cdiv(N, GRANULE))[None, :])
    elif AMAX_MODE == 2:
        tl.atomic_max(amax_ptr + rm.to(tl.int64) * stride_amax_m, tl.max(ah, axis=1), mask=row_ok)


@triton.jit
def _store_sumsq(
    out,  # [BLOCK_M, WIDTH] the values just stored (y's dtype)
    ssq_ptr,
    rm,  # [BLOCK_M] row indices of the tile
    off_n,
    M,
    N,
    stride_ssq_m,
    GRANULE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    WIDTH: tl.constexpr,
):
    """fp32 sum of squares of the stored (rounded) values over real columns, per granule into ssq [M, G]
    (columns off_n.. start a granule, WIDTH is a multiple of GRANULE). Rows past M are never written.

    Squares of the values y holds, not of the fp32 accumulator: a row's granule sums add up to what
    ``sum(y_row.float()²)`` gives for the stored row, up to fp32 summation order (and, on a GPU, an FMA
    contraction of the square into the sum, which only drops the product's rounding)."""
    rn = off_n + tl.arange(0, WIDTH)
    yv = out.to(tl.float32)
    # columns past N hold zeros (zero-filled W box, scale and bias loaded as 0): masked anyway, so the sums do
    # not depend on that
    sq = tl.where((rn < N)[None, :], yv * yv, 0.0)
    tl.static_assert(WIDTH % GRANULE == 0, "sumsq: stored tile width must be a multiple of GRANULE")
    G: tl.constexpr = WIDTH // GRANULE
    if G == 1:
        gsum = tl.sum(sq, axis=1)[:, None]
    else:
        gsum = tl.sum(tl.reshape(sq, (BLOCK_M, G, GRANULE)), axis=2)  # [BLOCK_M, G]
    # a vector of granule indices even for G == 1: a half tile wholly past N must not be written
    rg = off_n // GRANULE + tl.arange(0, G)
    tl.store(ssq_ptr + rm[:, None].to(tl.int64) * stride_ssq_m + rg[None, :], gsum,
             mask=(rm < M)[:, None] & (rg < tl.cdiv(N, GRANULE))[None, :])


@triton.jit
def _w8a8_gemm_tma_kernel(
    a_desc,  # qA [M, K] int8 | e4m3, block [BLOCK_M, BLOCK_K]
    w_desc,  # qW [N, K] int8 | e4m3, block [BLOCK_N, BLOCK_K]
    y_desc,  # y [M, N], block [BLOCK_M, BLOCK_N] (or BLOCK_N // 2 with EPILOGUE_SUBTILE)
    sa_ptr,  # [M, 1] fp32
    sw_ptr,  # [N, 1] fp32
    bias_ptr,  # [N] any float, or a dummy
    amax_ptr,  # [M, ceil(N/128)] fp32 (AMAX_MODE 1, 3, 5) | [M, 1] zeroed fp32 (2) | [M, 1] row scales (4) | dummy
    M,
    N,
    K,
    M_BUCKET,  # only an autotune key (size class of M), unused in the body
    stride_sam,
    stride_swn,
    stride_amax_m,
    r_desc,  # residual x [M, N] in y's dtype, y_desc's box (RESIDUAL with RES_TMA), else None
    res_ptr,  # the same residual for pointer loads (RESIDUAL without RES_TMA), else a dummy
    gate_ptr,  # gate as a [B, L, N] broadcast view (RESIDUAL 2), else a dummy
    L,  # rows per sample (M = B * L), for the gate's batch index
    stride_rm,
    stride_gb,
    stride_gl,
    IS_FP8: tl.constexpr,
    FP8_PROMOTE: tl.constexpr,  # see the module constant
    GELU_SHORT: tl.constexpr,  # GELU_CODES_SHORT (the module constant)
    HAS_BIAS: tl.constexpr,
    OUT_KIND: tl.constexpr,  # 0 bf16, 1 fp16, 2 fp32 (y_desc's dtype)
    ACTIVATION: tl.constexpr,  # 0 none, 1 GELU (tanh form)
    ROUND_BF16: tl.constexpr,  # interpreter + bf16 output + an epilogue extension: round explicitly
    NATIVE: tl.constexpr,  # GELU form: 0 portable (interpreter), 1 / 2 inline PTX (_epilogue_math.gelu_native)
    AMAX_MODE: tl.constexpr,  # 0 none, 1 partial (per GRANULE columns), 2 atomic (per row), 3 pow2 codes, 4 rowscale,
    #                           5 sumsq (per GRANULE columns)
    RESIDUAL: tl.constexpr,  # 0 none, 1 x + y, 2 x + y·gate (_epilogue_math.RESIDUAL_IDS)
    RES_TMA: tl.constexpr,  # residual tiles through r_desc (True) or pointer loads (False)
    GATE_MODE: tl.constexpr,  # how the gate rows are read (_epilogue_math._gated_residual)
    GRANULE: tl.constexpr,
    NUM_SMS: tl.constexpr,
    FLATTEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,
):
    HALF_N: tl.constexpr = BLOCK_N // 2
    # GELU + FP8 codes at given row scales, GPU form, bf16 h: the short epilogue (_gelu_rowscale_tile)
    GELU_CODES: tl.constexpr = GELU_SHORT and (ACTIVATION == 1) and (AMAX_MODE == 4) and (NATIVE == 2) \
        and (RESIDUAL == 0) and (OUT_KIND == 0)
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    # The epilogue recomputes its tile from its own counter instead of reusing (pid_m, pid_n) of the
    # loads: once the loops are flattened the loads of tile t+1 are issued before the epilogue of
    # tile t, and a value shared by both would have to be kept alive across that overlap.
    tile_out = start - NUM_SMS
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = grouped_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_am = pid_m * BLOCK_M
        off_wn = pid_n * BLOCK_N
        if IS_FP8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kb in range(k_tiles):
            a = a_desc.load([off_am, kb * BLOCK_K])
            w = w_desc.load([off_wn, kb * BLOCK_K])
            if IS_FP8:
                if FP8_PROMOTE:
                    acc = tl.dot(a, w.T, acc, max_num_imprecise_acc=BLOCK_K)
                else:
                    acc = tl.dot(a, w.T, acc)
            else:
                acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)

        tile_out += NUM_SMS
        pid_m, pid_n = grouped_coords(tile_out, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rm = off_m + tl.arange(0, BLOCK_M)
        s_a = tl.load(sa_ptr + rm * stride_sam, mask=rm < M, other=0.0)
        if EPILOGUE_SUBTILE:
            # [BM, BN] -> [BM, 2, BN/2] -> [BM, BN/2, 2] -> two [BM, BN/2] halves (columns
            # off_n.. and off_n + BN/2..), scaled and stored one after the other.
            acc3 = tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF_N)), (0, 2, 1))
            acc0, acc1 = tl.split(acc3)
            r0 = s_a  # the residual tiles (RESIDUAL), else placeholders
            if RESIDUAL != 0:
                if RES_TMA:
                    r0 = r_desc.load([off_m, off_n])
                else:
                    r0 = _load_residual(res_ptr, rm, off_n, M, N, stride_rm, HALF_N)
            if GELU_CODES:
                y0 = _gelu_rowscale_tile(acc0, s_a, sw_ptr, bias_ptr, off_n, N, stride_swn, HAS_BIAS, amax_ptr, rm,
                                         M, stride_amax_m, HALF_N)
            else:
                y0 = _scale_bias_cast(acc0, s_a, sw_ptr, bias_ptr, off_n, N, stride_swn, HAS_BIAS, OUT_KIND,
                                      ACTIVATION, ROUND_BF16, NATIVE, HALF_N, r0, gate_ptr, rm, off_m, M, L, stride_gb,
                                      stride_gl, RESIDUAL, GATE_MODE)
                if AMAX_MODE == 3:  # FP8 codes at per-granule power-of-two scales (stores the granule maxima)
                    y0 = pow2_granule_codes(y0, amax_ptr, rm, off_n, M, N, stride_amax_m, NATIVE != 0, GRANULE,
                                            BLOCK_M, HALF_N)
                elif AMAX_MODE == 4:  # FP8 codes at the given row scales
                    y0 = rowscale_codes(y0, amax_ptr, rm, M, stride_amax_m, NATIVE != 0)
            y_desc.store([off_m, off_n], y0)
            if AMAX_MODE == 1 or AMAX_MODE == 2:
                _store_amax(y0, amax_ptr, rm, off_n, M, N, stride_amax_m, AMAX_MODE, GRANULE, BLOCK_M, HALF_N)
            elif AMAX_MODE == 5:
                _store_sumsq(y0, amax_ptr, rm, off_n, M, N, stride_amax_m, GRANULE, BLOCK_M, HALF_N)
            r1 = s_a
            if RESIDUAL != 0:
                if RES_TMA:
                    r1 = r_desc.load([off_m, off_n + HALF_N])
                else:
                    r1 = _load_residual(res_ptr, rm, off_n + HALF_N, M, N, stride_rm, HALF_N)
            if GELU_CODES:
                y1 = _gelu_rowscale_tile(acc1, s_a, sw_ptr, bias_ptr, off_n + HALF_N, N, stride_swn, HAS_BIAS,
                                         amax_ptr, rm, M, stride_amax_m, HALF_N)
            else:
                y1 = _scale_bias_cast(acc1, s_a, sw_ptr, bias_ptr, off_n + HALF_N, N, stride_swn, HAS_BIAS,
                                      OUT_KIND, ACTIVATION, ROUND_BF16, NATIVE, HALF_N, r1, gate_ptr, rm, off_m, M, L,
                                      stride_gb, stride_gl, RESIDUAL, GATE_MODE)
                if AMAX_MODE == 3:
                    y1 = pow2_granule_codes(y1, amax_ptr, rm, off_n + HALF_N, M, N, stride_amax_m, NATIVE != 0,
                                            GRANULE, BLOCK_M, HALF_N)
                elif AMAX_MODE == 4:
                    y1 = rowscale_codes(y1, amax_ptr, rm, M, stride_amax_m, NATIVE != 0)
            y_desc.store([off_m, off_n + HALF_N], y1)
            if AMAX_MODE == 1 or AMAX_MODE == 2:
                _store_amax(y1, amax_ptr, rm, off_n + HALF_N, M, N, stride_amax_m, AMAX_MODE, GRANULE, BLOCK_M,
                            HALF_N)
            elif AMAX_MODE == 5:
                _store_sumsq(y1, amax_ptr, rm, off_n + HALF_N, M, N, stride_amax_m, GRANULE, BLOCK_M, HALF_N)
        else:
            r = s_a
            if RESIDUAL != 0:
                if RES_TMA:
                    r = r_desc.load([off_m, off_n])
                else:
                    r = _load_residual(res_ptr, rm, off_n, M, N, stride_rm, BLOCK_N)
            if GELU_CODES:
                y_tile = _gelu_rowscale_tile(acc, s_a, sw_ptr, bias_ptr, off_n, N, stride_swn, HAS_BIAS, amax_ptr,
                                             rm, M, stride_amax_m, BLOCK_N)
            else:
                y_tile = _scale_bias_cast(acc, s_a, sw_ptr, bias_ptr, off_n, N, stride_swn, HAS_BIAS, OUT_KIND,
                                          ACTIVATION, ROUND_BF16, NATIVE, BLOCK_N, r, gate_ptr, rm, off_m, M, L,
                                          stride_gb, stride_gl, RESIDUAL, GATE_MODE)
                if AMAX_MODE == 3:
                    y_tile = pow2_granule_codes(y_tile, amax_ptr, rm, off_n, M, N, stride_amax_m, NATIVE != 0,
                                                GRANULE, BLOCK_M, BLOCK_N)
                elif AMAX_MODE == 4:
                    y_tile = rowscale_codes(y_tile, amax_ptr, rm, M, stride_amax_m, NATIVE != 0)
            y_desc.store([off_m, off_n], y_tile)
            if AMAX_MODE == 1 or AMAX_MODE == 2:
                _store_amax(y_tile, amax_ptr, rm, off_n, M, N, stride_amax_m, AMAX_MODE, GRANULE, BLOCK_M, BLOCK_N)
            elif AMAX_MODE == 5:
                _store_sumsq(y_tile, amax_ptr, rm, off_n, M, N, stride_amax_m, GRANULE, BLOCK_M, BLOCK_N)


def tma_configs() -> list:
    """Autotune candidates (kept short: 9 shapes x 2 formats are tuned on the GPU).

    BLOCK_K = 128 (128 bytes of 8-bit codes = one 128B-swizzled TMA row). Shared memory per stage:
    (BM + BN) * 128 B, plus the epilogue's store staging (BM x BN_store x 2 B for bf16):
    128x256 s3 = 144 + 32 KB (subtiled), 128x128 s4 = 128 + 32 KB, 64x128 s4 = 96 + 16 KB.
    The partial-amax epilogue uses only those whose stored width is a multiple of 128 (all but the
    subtiled 128x128, whose 64-column halves would split a granule): see :func:`_store_width`.
    """

    def cfg(bm, bn, warps, stages, subtile):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8,
                              "EPILOGUE_SUBTILE": subtile}, num_warps=warps, num_stages=stages,
                             pre_hook=_set_block_shapes)

    return [
        cfg(128, 256, 8, 3, True),
        cfg(128, 128, 8, 4, False),
        cfg(128, 128, 8, 4, True),
        cfg(128, 128, 4, 4, False),
        cfg(64, 128, 4, 4, False),
    ]
    # Tried (H200 session 5): 128x128 s3 subtiled and 128x128 s2 x 4 warps, meant as two CTAs per SM so
    # that one CTA's epilogue runs under the other's MMAs; the autotuner never picked them. That test
    # did not show what it meant to: the persistent grid is capped at #SMs programs for every config,
    # so only one CTA per SM ever ran. The design point itself (two 128x128 tiles per SM, epilogues
    # alternating with MMAs) was measured by session 9's Gluon ping-pong kernel: equal at ffn.0, slower
    # at the other 1.3B shapes (RESULTS.md). A 128x128 FP8 tile needs about 25% more shared-memory
    # bandwidth per MAC than 128x256 (B read per 64-row wgmma, TMA writes), and these GEMMs sit near
    # Hopper's 128 B/clk shared-memory limit.


def _set_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook: the descriptors' box shapes follow the config being launched."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["y_desc"].block_shape = [bm, bn // 2 if nargs["EPILOGUE_SUBTILE"] else bn]
    if nargs.get("r_desc") is not None:  # the residual is read in the tiles y is stored in
        nargs["r_desc"].block_shape = list(nargs["y_desc"].block_shape)


def _store_width(cfg: dict) -> int:
    """Columns per descriptor store (and per amax pass) of a config: BLOCK_N, or half with EPILOGUE_SUBTILE."""
    return cfg["BLOCK_N"] // 2 if cfg["EPILOGUE_SUBTILE"] else cfg["BLOCK_N"]


_TUNED = None  # every config of tma_configs() (benchmarks may reset it to rebuild with a reduced list)
_TUNED_PARTIAL = None  # partial amax: the configs whose stored width is a multiple of AMAX_GRANULE
# M changes the best tile only through its size class: bucket it.
_TUNE_KEY = ["M_BUCKET", "N", "K", "IS_FP8", "FP8_PROMOTE", "HAS_BIAS", "OUT_KIND", "ACTIVATION", "AMAX_MODE", "RESIDUAL", "RES_TMA",
             "GATE_MODE"]


def _tuned_kernel(partial_amax: bool = False):
    global _TUNED, _TUNED_PARTIAL
    if partial_amax:
        if _TUNED_PARTIAL is None:
            cfgs = [c for c in tma_configs() if _store_width(c.kwargs) % AMAX_GRANULE == 0]
            if not cfgs:
                raise ValueError("w8a8_gemm_tma: no TMA autotune config stores a multiple of 128 columns "
                                 "(needed by the partial amax)")
            _TUNED_PARTIAL = triton.autotune(configs=cfgs, key=_TUNE_KEY)(_w8a8_gemm_tma_kernel)
        return _TUNED_PARTIAL
    if _TUNED is None:
        _TUNED = triton.autotune(configs=tma_configs(), key=_TUNE_KEY)(_w8a8_gemm_tma_kernel)
    return _TUNED


def tuned_tma_config(partial_amax: bool = False):
    """The autotuner's last pick (for the benchmark's report), or None; ``partial_amax``: that of the
    launches that write per-granule values ("partial", "pow2", "sumsq": a separate, filtered config list)."""
    tuned = _TUNED_PARTIAL if partial_amax else _TUNED
    return None if tuned is None else getattr(tuned, "best_config", None)


def tma_hardware_ok(device: torch.device) -> bool:
    """TMA descriptors can be used on ``device``: a CUDA GPU of compute capability >= 9.0, or any
    tensor under the CPU interpreter (which emulates descriptor loads/stores)."""
    if triton_interpret():
        return True
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx] >= (9, 0)


_CAPABILITY: dict[int, tuple[int, int]] = {}


def _row_major_16b(t: torch.Tensor) -> str | None:
    """Why ``t`` (2-D) cannot be a TMA global tensor, or None."""
    if t.stride(1) != 1:
        return f"inner stride {t.stride(1)} != 1"
    if (t.stride(0) * t.element_size()) % 16:
        return f"row stride {t.stride(0) * t.element_size()} B not a multiple of 16"
    if t.data_ptr() % 16:
        return "base address not 16-byte aligned"
    return None


def tma_unsupported_reason(qa: torch.Tensor, qw: torch.Tensor, out_dtype: torch.dtype,
                           act_granularity: str, weight_granularity: str, fuse_quant: bool = False) -> str | None:
    """The TMA kernel's shape rule: None when it can run this GEMM, else the reason it cannot.

    Requirements: per-token activations x per-channel weights (scales in the epilogue), no fused
    activation quantization; qA [M, K] and qW [N, K] with contiguous rows whose byte stride is a
    multiple of 16 (K % 16 == 0 for contiguous 1-byte codes) and 16-byte aligned bases; the output
    row N * itemsize(out_dtype) a multiple of 16 bytes (N % 8 == 0 for bf16/fp16, N % 4 for fp32).
    Hardware (sm90+) is checked separately by :func:`tma_hardware_ok`.
    """
    if act_granularity != "per_token" or weight_granularity != "per_channel":
        return f"scales {act_granularity} x {weight_granularity} (TMA kernel: per_token x per_channel only)"
    if fuse_quant:
        return "fused activation quantization"
    if out_dtype not in _OUT_KIND:
        return f"output dtype {out_dtype}"
    for name, t in (("activation", qa), ("weight", qw)):
        why = _row_major_16b(t)
        if why is not None:
            return f"{name} {tuple(t.shape)}: {why}"
    n = qw.shape[0]
    out_row = n * out_dtype.itemsize
    if out_row % 16:
        return f"output row of N={n} {out_dtype} is {out_row} B, not a multiple of 16"
    return None


_SMS: dict[int, int] = {}


def _num_programs_cap(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRET_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def w8a8_gemm_tma(
    qa: torch.Tensor,  # [M, K] int8 | e4m3
    sa: torch.Tensor,  # [M, 1] fp32
    qw: torch.Tensor,  # [N, K] int8 | e4m3
    sw: torch.Tensor,  # [N, 1] fp32
    bias: torch.Tensor | None,  # [N]
    out_dtype: torch.dtype,
    config: dict | None = None,
    activation: str | None = None,
    amax_mode: str = "none",
    amax_out: torch.Tensor | None = None,
    residual: _em.ResidualArgs | None = None,
) -> torch.Tensor:
    """Run the persistent TMA GEMM (per-token x per-channel). The caller applies the shape rule.

    Args:
        config: fixed ``{"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPILOGUE_SUBTILE",
            "num_warps", "num_stages"}`` instead of autotuning (always used under the CPU
            interpreter, where autotuning is pointless; missing keys take interpreter defaults).
        activation: None, or "gelu_tanh": ``y = GELU_tanh(scaled GEMM + bias)`` in the epilogue.
        amax_mode: "none"; "partial": write the abs-max of each 128-column granule of the stored y
            into ``amax_out [M, ceil(N/128)]`` fp32 (needs stored widths that are multiples of 128,
            see :func:`tma_configs`); "atomic": atomic_max the row abs-max into ``amax_out [M, 1]``
            fp32, which the caller has zeroed. Both over exactly the values stored (rounded to
            ``out_dtype``), real rows and columns only. :mod:`.triton_gemm_epilogue` allocates the
            buffer and quantizes y from it. "pow2": the values, rounded to ``out_dtype``, are not
            stored; y is their FP8 e4m3 codes at a power-of-two scale per (row, 128 columns), with
            the granule maxima in ``amax_out [M, ceil(N/128)]`` as for "partial" (same width rule; N
            must be a multiple of 16). :func:`.triton_pow2.requant_pow2_triton` turns them into
            per-token codes. "rowscale": y is the FP8 codes of the rounded values at the power-of-two
            row scales given in ``amax_out [M, 1]`` (read only; :mod:`.triton_bound`; N % 16 == 0).
            "sumsq": y as with "none", and the fp32 sum of squares of each 128-column granule of the
            stored y (rounded to ``out_dtype``, squared and summed in fp32) into ``amax_out
            [M, ceil(N/128)]`` fp32, as for "partial" (same width rule); columns past N add nothing.
        amax_out: the buffer of ``amax_mode`` (None for "none"), written in place ("rowscale": read).
        residual: ``x + y·gate`` in the epilogue (see ``_epilogue_math.ResidualArgs``; ``x`` in
            ``out_dtype``, with ``load="tma"`` also a TMA-able tensor); y is rounded to ``out_dtype``
            first, as the plain GEMM stores it. Not combined with an activation or an amax.

    Returns y [M, N] in ``out_dtype`` (x_new with ``residual``; float8_e4m3fn codes for "pow2" and
    "rowscale"). With every option off the kernel is the plain GEMM as before.
    """
    m, k = qa.shape
    n, k2 = qw.shape
    if k != k2:
        raise ValueError(f"w8a8_gemm_tma: K mismatch, activation {tuple(qa.shape)} vs weight {tuple(qw.shape)}")
    if qa.dtype != qw.dtype or qa.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"w8a8_gemm_tma: codes must both be int8 or both float8_e4m3fn, got {qa.dtype}, {qw.dtype}")
    if tuple(sa.shape) != (m, 1) or tuple(sw.shape) != (n, 1):
        raise ValueError(f"w8a8_gemm_tma: scales must be [M, 1] and [N, 1], got {tuple(sa.shape)}, {tuple(sw.shape)}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"w8a8_gemm_tma: unknown activation '{activation}'; valid: None, {', '.join(ACTIVATIONS)}")
    _check_amax_out(amax_mode, amax_out, m, n, qa.device)
    why = tma_unsupported_reason(qa, qw, out_dtype, "per_token", "per_channel")
    if why is not None:
        raise ValueError(f"w8a8_gemm_tma: not a TMA shape ({why}); use w8a8_gemm_triton, which dispatches")
    _check_residual(residual, activation, amax_mode, m, n, out_dtype)
    codes = amax_mode in ("pow2", "rowscale")  # y holds FP8 codes
    if codes and n % 16:
        raise ValueError(f"w8a8_gemm_tma: amax_mode='{amax_mode}' stores 1-byte codes, so N must be a multiple of 16, "
                         f"got {n}")
    y = torch.empty((m, n), dtype=torch.float8_e4m3fn if codes else out_dtype, device=qa.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        if amax_mode == "rowscale":  # its callers take another route for K = 0 (triton_bound.gelu_quant_bound)
            raise ValueError("w8a8_gemm_tma: amax_mode='rowscale' needs K > 0")
        _degenerate_k0(y, bias, activation, amax_mode, amax_out, out_dtype)
        return y if residual is None else _em.residual_torch(y, residual)
    # Box shapes are placeholders here; the launch below (or the autotune pre-hook) sets them.
    a_desc = TensorDescriptor.from_tensor(qa, [64, 128])
    w_desc = TensorDescriptor.from_tensor(qw, [64, 128])
    y_desc = TensorDescriptor.from_tensor(y, [64, 64])
    nsm = _num_programs_cap(qa.device)
    mode_id = AMAX_MODE_IDS[amax_mode]
    act_id = 0 if activation is None else ACTIVATIONS[activation]
    res = residual
    r_desc = TensorDescriptor.from_tensor(res.x, [64, 64]) if res is not None and res.load == "tma" else None
    m_bucket = min(triton.next_power_of_2(m), 8192)
    args = (a_desc, w_desc, y_desc, sa, sw, bias if bias is not None else sw,
            amax_out if amax_out is not None else sw,
            m, n, k, m_bucket, sa.stride(0), sw.stride(0),
            amax_out.stride(0) if amax_out is not None else 0,
            r_desc, res.x if res is not None else sw,
            res.gate if res is not None and res.gate is not None else sw,
            res.L if res is not None else 1, res.x.stride(0) if res is not None else 0,
            res.stride_gb if res is not None else 0, res.stride_gl if res is not None else 0)
    # Explicit bf16 rounding under the interpreter only with an epilogue extension: the plain GEMM
    # keeps the interpreter's truncating cast, as the plain pointer kernel does (tests compare them).
    round_bf16 = triton_interpret() and out_dtype == torch.bfloat16 and (act_id != 0 or mode_id != 0)
    is_fp8 = qa.dtype == torch.float8_e4m3fn
    meta = dict(IS_FP8=is_fp8, FP8_PROMOTE=is_fp8 and FP8_PROMOTE, GELU_SHORT=GELU_CODES_SHORT,
                HAS_BIAS=bias is not None, OUT_KIND=_OUT_KIND[out_dtype], ACTIVATION=act_id, ROUND_BF16=round_bf16,
                NATIVE=_em.gelu_native(triton_interpret()),
                AMAX_MODE=mode_id, RESIDUAL=_residual_id(res), RES_TMA=r_desc is not None,
                GATE_MODE=0 if res is None else res.gate_mode,
                GRANULE=AMAX_GRANULE, NUM_SMS=nsm, FLATTEN=FLATTEN)
    if config is None and triton_interpret():
        config = {}
    if config is not None:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 4, "EPILOGUE_SUBTILE": True,
               "num_warps": 4, "num_stages": 1 if triton_interpret() else 3}
        if amax_mode in _GRANULE_MODES:  # defaults that store whole granules
            cfg.update(BLOCK_N=AMAX_GRANULE, EPILOGUE_SUBTILE=False)
        cfg.update(config)
        if amax_mode in _GRANULE_MODES and _store_width(cfg) % AMAX_GRANULE:
            raise ValueError(f"w8a8_gemm_tma: amax_mode='{amax_mode}' needs the stored tile width (BLOCK_N, or "
                             f"BLOCK_N // 2 with EPILOGUE_SUBTILE) to be a multiple of {AMAX_GRANULE}; config "
                             f"BLOCK_N={cfg['BLOCK_N']} EPILOGUE_SUBTILE={cfg['EPILOGUE_SUBTILE']} stores "
                             f"{_store_width(cfg)}")
        _set_block_shapes({"a_desc": a_desc, "w_desc": w_desc, "y_desc": y_desc, "r_desc": r_desc, **cfg})
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        _w8a8_gemm_tma_kernel[(min(nsm, tiles),)](*args, **meta, **cfg)
        return y

    def grid(c):
        return (min(nsm, triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"])),)

    partial = amax_mode in _GRANULE_MODES
    # Finer than the autotuner's key (its key values + every tensor argument's dtype), so a remembered
    # pick is the one the autotuner would return.
    key = (partial, m_bucket, n, k, qa.device, *meta.values(), qa.dtype, y.dtype, sa.dtype, sw.dtype,
           None if bias is None else bias.dtype, None if amax_out is None else amax_out.dtype,
           None if res is None else res.x.dtype, None if res is None or res.gate is None else res.gate.dtype)
    launch_tuned(_tuned_kernel(partial), key, grid, args, meta,
                 hook_args={"a_desc": a_desc, "w_desc": w_desc, "y_desc": y_desc, "r_desc": r_desc})
    return y


def _residual_id(res: _em.ResidualArgs | None) -> int:
    if res is None:
        return _em.RESIDUAL_IDS["none"]
    return _em.RESIDUAL_IDS["add" if res.gate is None else "gated"]


def _check_residual(res: _em.ResidualArgs | None, activation, amax_mode: str, m: int, n: int, out_dtype) -> None:
    if res is None:
        return
    if activation is not None or amax_mode != "none":
        raise ValueError("w8a8_gemm_tma: a residual epilogue takes no activation and no amax")
    if tuple(res.x.shape) != (m, n) or res.x.dtype != out_dtype or res.x.stride(1) != 1:
        raise ValueError(f"w8a8_gemm_tma: residual must be [{m}, {n}] {out_dtype} with unit column stride, got "
                         f"{list(res.x.shape)} {res.x.dtype} strides {res.x.stride()}")
    if res.load not in ("tma", "pointer"):
        raise ValueError(f"w8a8_gemm_tma: unknown residual load '{res.load}'; valid: tma, pointer")
    why = _row_major_16b(res.x) if res.load == "tma" else None
    if why is not None:
        raise ValueError(f"w8a8_gemm_tma: residual load 'tma' needs a TMA-able residual ({why}); use 'pointer'")


# amax modes that write one value per granule (maxima, or sums of squares for "sumsq"): stored widths must
# be whole granules
_GRANULE_MODES = ("partial", "pow2", "sumsq")


def _check_amax_out(amax_mode: str, amax_out: torch.Tensor | None, m: int, n: int, device) -> None:
    if amax_mode not in AMAX_MODE_IDS:
        raise ValueError(f"w8a8_gemm_tma: unknown amax_mode '{amax_mode}'; valid: {', '.join(AMAX_MODE_IDS)}")
    if amax_mode == "none":
        if amax_out is not None:
            raise ValueError("w8a8_gemm_tma: amax_out given with amax_mode='none'")
        return
    want = (m, triton.cdiv(n, AMAX_GRANULE)) if amax_mode in _GRANULE_MODES else (m, 1)
    if amax_out is None:
        raise ValueError(f"w8a8_gemm_tma: amax_mode='{amax_mode}' needs amax_out {list(want)} fp32")
    if (tuple(amax_out.shape) != want or amax_out.dtype != torch.float32 or amax_out.device != device
            or (want[1] > 1 and amax_out.stride(1) != 1)):
        raise ValueError(f"w8a8_gemm_tma: amax_out for amax_mode='{amax_mode}' must be a {list(want)} fp32 tensor "
                         f"on {device} with contiguous rows, got {list(amax_out.shape)} {amax_out.dtype} "
                         f"on {amax_out.device}")


def _degenerate_k0(y: torch.Tensor, bias, activation: str | None, amax_mode: str, amax_out,
                   out_dtype: torch.dtype) -> None:
    """K == 0: every row is act(bias) (or act(0)); the amax (or sumsq) contract is kept with torch ops."""
    m, n = y.shape
    v = bias.to(torch.float32) if bias is not None else torch.zeros(n, device=y.device)
    if activation == "gelu_tanh":
        v = torch.nn.functional.gelu(v, approximate="tanh")
    if amax_mode == "pow2":
        from turbocompile.kernels.w8a8.ref import quantize_pow2_granules_ref

        codes, gmax = quantize_pow2_granules_ref(v.to(out_dtype)[None, :])
        y.copy_(codes.expand(m, n))
        amax_out.copy_(gmax.expand_as(amax_out))
        return
    y.copy_(v.to(y.dtype).expand(m, n))
    if amax_mode == "none":
        return
    if amax_mode == "sumsq":
        from turbocompile.kernels.w8a8.ref import granule_sumsq_ref

        amax_out.copy_(granule_sumsq_ref(y[:1]).expand_as(amax_out))
        return
    row = y[0].float().abs()
    if amax_mode == "partial":
        g = amax_out.shape[1]
        gmax = torch.nn.functional.pad(row, (0, g * AMAX_GRANULE - n)).view(g, AMAX_GRANULE).amax(dim=1)
        amax_out.copy_(gmax.expand(m, g))
    else:
        amax_out.copy_(torch.maximum(amax_out, row.amax().expand(m, 1)))
