"""Triton kernel: (gated residual +) LayerNorm + AdaLN modulate (+ W8A8 quantization epilogue).

* ``_ln_rows_kernel``: blocks of BLOCK_M rows; each row is held in registers as one or two
  power-of-two column tiles (5120 = 4096 + 1024: no masked lanes), so x (and y) are read once
  and x_new / h (or q and a per-row scale) are written once: 4 B/elt for bf16 ln_modulate,
  8 B/elt with the residual, 3 B/elt + scales for the per-token quant epilogue (amax taken from
  the registers). Per-sample gate/shift/scale are loaded once per block ([1, D]). Optional
  persistent grid with a register-prefetched next block (measured slower at D=5120; kept for
  other shapes). On the GPU the dtype roundings use the hardware casts (NATIVE).
* BOUND (FP8 per-token codes feeding the FFN's GELU GEMM with "bound" output scales): the block
  also sums each row's squared codes, still in registers, and stores the GEMM's power-of-two row
  scale ``2^e`` (``kernels/w8a8/triton_bound.py``: :func:`bound_row_scale`) beside the per-token
  scale: 4 B more per row, instead of a separate kernel re-reading the M×D codes.
* block128 (TurboDiffusion's 128×128 activation scale blocks) is not fused: a scale block needs
  the statistics of its whole 128-row band before any tile can be quantized, so a fused kernel
  reads x twice; it measured 1.14 ms vs 0.72 ms for this LN kernel followed by the W8A8
  block-128 quantizer (H200, B1 L75600 D5120, INT8), which is what ``quant=(fmt, "block128")``
  runs.

Quantizer (must match ``turbocompile::quantize_activation``): h is rounded to x.dtype first;
amax = max(1e-8, max|h|); INT8 q = rint(h·(128/amax)) saturated to [-128, 127], scale amax/128;
FP8 q = e4m3_rn(clamp(h·(448/amax), ±448)), scale amax/448. Divisions use div_rn (IEEE), and the
round-half-to-even is done with the 1.5·2^23 trick (exact for |v| ≤ 2^22; see ``_quantize``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbocompile.kernels.norms._launch import as_rows, bcast_rows, row_config, sm_count, split_tiles
from turbocompile.kernels.norms.ref import round_ln_output
from turbocompile.kernels.norms.triton_rounding import rnd, round_e4m3, to_dt
from turbocompile.kernels.w8a8.triton_bound import bound_row_scale

__all__ = ["ln_modulate_triton", "residual_ln_modulate_triton"]

_OUT_FLOAT, _OUT_INT8, _OUT_FP8 = 0, 1, 2
LAST_KERNEL: dict = {}  # the last compiled launch and its registers / spills (GPU; read by benchmarks)


@triton.jit
def _residual(x, y, gate_ptr, xnew_ptr, g_off, g_mask, xn_off, mask,
              HAS_GATE: tl.constexpr, NATIVE: tl.constexpr):
    """x_new = x + y * gate.to(dt), rounded like the eager dt ops; stores x_new, returns it in fp32.
    x, y: fp32 tiles (y already loaded); gate is read at g_off (a [1, N] vector or [M, N] rows). For dt
    fp32, `rnd` is the identity and a GPU build fuses x + y·g into one FMA (the product unrounded)."""
    dt = xnew_ptr.dtype.element_ty
    if HAS_GATE:
        g = rnd(tl.load(gate_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32), dt, NATIVE)
        y = rnd(y * g, dt, NATIVE)  # bf16·bf16 is exact in fp32: one rounding to dt
    xn = rnd(x + y, dt, NATIVE)
    tl.store(xnew_ptr + xn_off, xn.to(dt), mask=mask)
    return xn


@triton.jit
def _affine_modulate(h, w_ptr, b_ptr, shift_ptr, scale_ptr, cols, col_mask, shift_off, scale_off, v_mask,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     HAS_SCALE: tl.constexpr, ROUND_LN: tl.constexpr, RDT: tl.constexpr, NATIVE: tl.constexpr):
    """(h·w + b)·(1 + scale) + shift in fp32; w/b are [D], shift/scale are read at shift_off /
    scale_off with v_mask (a [1, N] per-sample vector shared by the block's rows, or [M, N]).

    ROUND_LN: round the (affine) LN output to RDT before the modulation, as the eager model and
    TurboDiffusion do (``LN(x).type_as(x)``, then the fp32 modulation).
    """
    if HAS_W:
        h = h * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        h = h + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if ROUND_LN:
        h = rnd(h, RDT, NATIVE)
    if HAS_SCALE:
        h = h * (1.0 + tl.load(scale_ptr + scale_off, mask=v_mask, other=0.0).to(tl.float32))
    if HAS_SHIFT:
        h = h + tl.load(shift_ptr + shift_off, mask=v_mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _quantize(hq, amax, OUT_MODE: tl.constexpr, NATIVE: tl.constexpr, QV: tl.constexpr):
    """hq: fp32 tile (already rounded to x.dtype); amax: its group amax, broadcastable to hq.
    Returns (q tile, scale shaped like amax).

    QV selects the instruction sequence (same codes): 0 clamps to the full range, rounds with
    the 1.5·2^23 add/subtract and converts with a float->int cvt; 1 ("lean") uses that
    |hq·128/amax| <= 128·(1 + 2^-23), so only the +128 end needs a clamp, and reads the int8
    code straight from the low byte of bits(v + 1.5·2^23) (= 0x4B400000 + rint(v)), with no
    subtract and no conversion instruction; for FP8 on the GPU the saturating cvt needs no
    clamp either (|v| <= 448·(1 + 2^-23) rounds to 448 in any case). QV 2 is QV 1 with the row amax
    taken before the rounding to x.dtype and rounded once (see ``_ln_block``; measured slower on the
    H200: 0.452 vs 0.398 ms for INT8 at B1 L75600 D5120)."""
    amax = tl.maximum(amax, 1e-8)
    if OUT_MODE == 1:
        inv = tl.math.div_rn(tl.zeros_like(amax) + 128.0, amax)
        v = hq * inv
        if QV >= 1:
            q = (tl.minimum(v, 127.0) + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)
        else:
            v = tl.minimum(tl.maximum(v, -128.0), 127.0)
            q = ((v + 12582912.0) - 12582912.0).to(tl.int8)  # 1.5·2^23 trick: rint, ties to even
        s = amax * 0.0078125  # amax / 128, exact
    else:
        inv = tl.math.div_rn(tl.zeros_like(amax) + 448.0, amax)
        s = tl.math.div_rn(amax, tl.zeros_like(amax) + 448.0)
        if NATIVE:
            if QV >= 1:
                q = (hq * inv).to(tl.float8e4nv)
            else:
                q = tl.minimum(tl.maximum(hq * inv, -448.0), 448.0).to(tl.float8e4nv)  # cvt.rn.satfinite: RNE
        else:
            q = round_e4m3(tl.minimum(tl.maximum(hq * inv, -448.0), 448.0)).to(tl.float8e4nv)
    return q, s


@triton.jit
def _sum_sq_codes(q):
    """[BLOCK_M, 1] fp32 sums of the squared codes of a tile (as ``ref.row_bound_scale_ref`` reads qa:
    each code exact in fp32, squared and summed in fp32; masked lanes hold code 0)."""
    qf = q.to(tl.float32)
    return tl.sum(qf * qf, axis=1, keep_dims=True)


@triton.jit
def _store_bound_scales(n2, s, wb_ptr, bscale_ptr, rows64, row_mask):
    """Store the "bound" row scales ``2^e`` of the GELU GEMM that reads this kernel's FP8 codes
    (``ref.row_bound_scale_ref(q, s, [C, b])``): n2 the rows' sums of squared codes, s their stored
    per-token scales ([BLOCK_M, 1] each). Saves that GEMM's separate row-bound kernel a re-read of q.
    The squares are summed in tile order, not torch's: the exponent can differ from the reference's only
    where the bound lies within a few fp32 ulps of a power-of-two multiple of 448."""
    c = tl.load(wb_ptr)
    b = tl.load(wb_ptr + 1)
    tl.store(bscale_ptr + rows64[:, None], bound_row_scale(n2, s, c, b), mask=row_mask[:, None])


@triton.jit
def _load_rows(src_ptr, blk, M, stride_m, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_D2: tl.constexpr, D, EVEN: tl.constexpr):
    """Raw (storage dtype) tiles of BLOCK_M rows: columns [0, BLOCK_D) and [BLOCK_D, BLOCK_D +
    BLOCK_D2). Rows past M are masked, so a block past the end moves no bytes."""
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    roff = rows.to(tl.int64) * stride_m
    cols = tl.arange(0, BLOCK_D)
    if EVEN:  # the tiles cover the row exactly: row masks only
        a = tl.load(src_ptr + roff[:, None] + cols[None, :], mask=rmask[:, None], other=0.0)
    else:
        a = tl.load(src_ptr + roff[:, None] + cols[None, :], mask=rmask[:, None] & (cols < D)[None, :], other=0.0)
    if BLOCK_D2 > 0:
        cols2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        if EVEN:
            b = tl.load(src_ptr + roff[:, None] + cols2[None, :], mask=rmask[:, None], other=0.0)
        else:
            b = tl.load(src_ptr + roff[:, None] + cols2[None, :], mask=rmask[:, None] & (cols2 < D)[None, :],
                        other=0.0)
    else:
        b = a  # placeholder, never used
    return a, b


@triton.jit
def _vec_offsets(rows64, bi, li, cols, row_mask, col_mask, stride_b, stride_l, b0, VEC_SHARED: tl.constexpr):
    """Offsets and mask of a per-row vector (gate/shift/scale): one [1, N] vector for the whole
    block when VEC_SHARED (all its rows share the sample b0 and the vector is per sample), else
    one row per row."""
    if VEC_SHARED:
        return (b0 * stride_b + cols)[None, :], col_mask[None, :]
    else:
        return (bi * stride_b + li * stride_l)[:, None] + cols[None, :], row_mask[:, None] & col_mask[None, :]


@triton.jit
def _ln_block(
    blk, xa, xb, ya, yb,
    gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, xnew_ptr, out_ptr, qscale_ptr, wb_ptr, bscale_ptr,
    M, L, D, eps,
    stride_gb, stride_gl, stride_sb, stride_sl, stride_cb, stride_cl,
    XDT: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, OUT_MODE: tl.constexpr, ROUND_LN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    VEC_SHARED: tl.constexpr, NATIVE: tl.constexpr, EVEN: tl.constexpr, QV: tl.constexpr,
    x_ptr, stride_xm, STATS: tl.constexpr, BOUND: tl.constexpr,
):
    """Everything after the loads for one block of rows: residual, statistics, normalize,
    affine/modulate, store (or quantize and store; BOUND: also the "bound" row scales of the GELU
    GEMM reading the FP8 codes, see :func:`_store_bound_scales`).

    STATS 0: two-pass statistics (mean, then Σ(x - mean)²: two reductions in sequence).
    STATS 1: one pass over x - c with c = the row's first input element, Σd and Σd² reduced
    together (var = E[d²] - E[d]²; the shift keeps E[d] within a few standard deviations,
    so the cancellation costs a few bits of fp32 at most): one reduction round fewer."""
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    bi = rows64 // L
    li = rows64 % L
    b0 = (blk * BLOCK_M) // L  # sample of the block's first row (VEC_SHARED; small, int32 is fine)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = row_mask[:, None] & cmask[None, :]
    xa = xa.to(tl.float32)
    if HAS_RES:
        g_off, g_m = _vec_offsets(rows64, bi, li, cols, row_mask, cmask, stride_gb, stride_gl, b0, VEC_SHARED)
        xa = _residual(xa, ya.to(tl.float32), gate_ptr, xnew_ptr, g_off, g_m,
                       rows64[:, None] * D + cols[None, :], mask, HAS_GATE, NATIVE)
    if STATS == 1:
        c = tl.load(x_ptr + rows64 * stride_xm, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        if EVEN:
            da = xa - c
        else:
            da = tl.where(mask, xa - c, 0.0)
        s1 = tl.sum(da, axis=1)
        s2 = tl.sum(da * da, axis=1)
    else:
        total = tl.sum(xa, axis=1)
    if BLOCK_D2 > 0:
        cols2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        cmask2 = cols2 < D
        mask2 = row_mask[:, None] & cmask2[None, :]
        xb = xb.to(tl.float32)
        if HAS_RES:
            g_off2, g_m2 = _vec_offsets(rows64, bi, li, cols2, row_mask, cmask2, stride_gb, stride_gl, b0,
                                        VEC_SHARED)
            xb = _residual(xb, yb.to(tl.float32), gate_ptr, xnew_ptr, g_off2, g_m2,
                           rows64[:, None] * D + cols2[None, :], mask2, HAS_GATE, NATIVE)
        if STATS == 1:
            if EVEN:
                db = xb - c
            else:
                db = tl.where(mask2, xb - c, 0.0)
            s1 += tl.sum(db, axis=1)
            s2 += tl.sum(db * db, axis=1)
        else:
            total += tl.sum(xb, axis=1)
    if STATS == 1:
        md = s1 / D  # mean - c
        rstd = tl.rsqrt(tl.maximum(s2 / D - md * md, 0.0) + eps)
        da = da - md[:, None]
        if BLOCK_D2 > 0:
            db = db - md[:, None]
        if not EVEN:
            da = tl.where(mask, da, 0.0)
            if BLOCK_D2 > 0:
                db = tl.where(mask2, db, 0.0)
    else:
        # IEEE division (a compiled `/` is approximate): a constant row's mean is then exact, its LN exactly 0
        mean = tl.math.div_rn(total, tl.zeros_like(total) + D)
        if EVEN:  # masked rows are zeros: their (unused) statistics stay finite without selects
            da = xa - mean[:, None]
        else:
            da = tl.where(mask, xa - mean[:, None], 0.0)
        m2 = tl.sum(da * da, axis=1)
        if BLOCK_D2 > 0:
            if EVEN:
                db = xb - mean[:, None]
            else:
                db = tl.where(mask2, xb - mean[:, None], 0.0)
            m2 += tl.sum(db * db, axis=1)
        rstd = tl.rsqrt(m2 / D + eps)

    sh_off, v_m = _vec_offsets(rows64, bi, li, cols, row_mask, cmask, stride_sb, stride_sl, b0, VEC_SHARED)
    sc_off, _ = _vec_offsets(rows64, bi, li, cols, row_mask, cmask, stride_cb, stride_cl, b0, VEC_SHARED)
    ha = _affine_modulate(da * rstd[:, None], w_ptr, b_ptr, shift_ptr, scale_ptr, cols, cmask, sh_off, sc_off,
                          v_m, HAS_W, HAS_B, HAS_SHIFT, HAS_SCALE, ROUND_LN, XDT, NATIVE)
    if BLOCK_D2 > 0:
        sh_off2, v_m2 = _vec_offsets(rows64, bi, li, cols2, row_mask, cmask2, stride_sb, stride_sl, b0, VEC_SHARED)
        sc_off2, _ = _vec_offsets(rows64, bi, li, cols2, row_mask, cmask2, stride_cb, stride_cl, b0, VEC_SHARED)
        hb = _affine_modulate(db * rstd[:, None], w_ptr, b_ptr, shift_ptr, scale_ptr, cols2, cmask2, sh_off2,
                              sc_off2, v_m2, HAS_W, HAS_B, HAS_SHIFT, HAS_SCALE, ROUND_LN, XDT, NATIVE)

    out_dt = out_ptr.dtype.element_ty
    if OUT_MODE == 0:
        tl.store(out_ptr + rows64[:, None] * D + cols[None, :], to_dt(ha, out_dt, NATIVE), mask=mask)
        if BLOCK_D2 > 0:
            tl.store(out_ptr + rows64[:, None] * D + cols2[None, :], to_dt(hb, out_dt, NATIVE), mask=mask2)
    else:
        # amax straight from the registers: the row is never re-read
        if EVEN:  # a row's amax only sees its own row: masked rows need no select
            hqa = rnd(ha, XDT, NATIVE)
        else:
            hqa = tl.where(mask, rnd(ha, XDT, NATIVE), 0.0)
        if QV == 2:  # max|rnd(h)| = rnd(max|h|) (RNE is monotone and odd): no wait on the roundings
            amax = tl.max(tl.abs(tl.where(mask, ha, 0.0) if not EVEN else ha), axis=1, keep_dims=True)
        else:
            amax = tl.max(tl.abs(hqa), axis=1, keep_dims=True)  # [BLOCK_M, 1]
        if BLOCK_D2 > 0:
            if EVEN:
                hqb = rnd(hb, XDT, NATIVE)
            else:
                hqb = tl.where(mask2, rnd(hb, XDT, NATIVE), 0.0)
            if QV == 2:
                amax = tl.maximum(amax, tl.max(tl.abs(tl.where(mask2, hb, 0.0) if not EVEN else hb), axis=1,
                                               keep_dims=True))
            else:
                amax = tl.maximum(amax, tl.max(tl.abs(hqb), axis=1, keep_dims=True))
        if QV == 2:
            amax = rnd(amax, XDT, NATIVE)
        qa, s = _quantize(hqa, amax, OUT_MODE, NATIVE, QV)
        tl.store(out_ptr + rows64[:, None] * D + cols[None, :], qa, mask=mask)
        if BOUND:
            n2 = _sum_sq_codes(qa)
        if BLOCK_D2 > 0:
            qb, _ = _quantize(hqb, amax, OUT_MODE, NATIVE, QV)
            tl.store(out_ptr + rows64[:, None] * D + cols2[None, :], qb, mask=mask2)
            if BOUND:
                n2 += _sum_sq_codes(qb)
        tl.store(qscale_ptr + rows64[:, None], s, mask=row_mask[:, None])
        if BOUND:
            _store_bound_scales(n2, s, wb_ptr, bscale_ptr, rows64, row_mask)


@triton.jit
def _ln_rows_kernel(
    x_ptr, y_ptr, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr,  # x,y [M,D] rows; w,b [D]; gate/shift/scale per (b,l)
    xnew_ptr, out_ptr, qscale_ptr,  # outputs: x_new [M,D], h or q [M,D], per-row scale [M,1]
    wb_ptr, bscale_ptr,  # BOUND: [2] fp32 [C, b] of the GELU GEMM reading q (in); its row scales [M,1] (out)
    M, L, D, eps,
    stride_xm, stride_ym, stride_gb, stride_gl, stride_sb, stride_sl, stride_cb, stride_cl,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, OUT_MODE: tl.constexpr, ROUND_LN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    VEC_SHARED: tl.constexpr, PERSIST: tl.constexpr, PREFETCH: tl.constexpr, NUM_STAGES: tl.constexpr,
    NATIVE: tl.constexpr, EVEN: tl.constexpr, QV: tl.constexpr, STATS: tl.constexpr, BOUND: tl.constexpr,
):
    """Blocks of BLOCK_M rows, each row held in registers as one or two column tiles (BLOCK_D,
    BLOCK_D2). PERSIST: a grid of a few programs per SM walks the blocks; with PREFETCH the
    next block's x (and y) is loaded before this block is computed (register double buffer),
    so each program keeps a load in flight while it reduces and stores."""
    pid = tl.program_id(0)
    if PERSIST:
        nprog = tl.num_programs(0)
        n_blk = tl.cdiv(M, BLOCK_M)
        if PREFETCH:
            xa, xb = _load_rows(x_ptr, pid, M, stride_xm, BLOCK_M, BLOCK_D, BLOCK_D2, D, EVEN)
            ya, yb = xa, xb
            if HAS_RES:
                ya, yb = _load_rows(y_ptr, pid, M, stride_ym, BLOCK_M, BLOCK_D, BLOCK_D2, D, EVEN)
            for blk in tl.range(pid, n_blk, nprog):
                nxa, nxb = _load_rows(x_ptr, blk + nprog, M, stride_xm, BLOCK_M, BLOCK_D, BLOCK_D2, D, EVEN)
                nya, nyb = nxa, nxb
                if HAS_RES:
                    nya, nyb = _load_rows(y_ptr, blk + nprog, M, stride_ym, BLOCK_M, BLOCK_D, BLOCK_D2, D, EVEN)
                _ln_block(blk, xa, xb, ya, yb, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, xnew_ptr, out_ptr,
                          qscale_ptr, wb_ptr, bscale_ptr, M, L, D, eps, stride_gb, stride_gl, stride_sb, stride_sl,
                          stride_cb, stride_cl, x_ptr.dtype.element_ty, HAS_RES, HAS_GATE, HAS_W, HAS_B, HAS_SHIFT,
                          HAS_SCALE, OUT_MODE, ROUND_LN, BLOCK_M, BLOCK_D, BLOCK_D2, VEC_SHARED, NATIVE, EVEN, QV,
                          x_ptr, stride_xm, STATS, BOUND)
                xa, xb, ya, yb = nxa, nxb, nya, nyb
        else:
            for blk in tl.range(pid, n_blk, nprog, num_stages=NUM_STAGES):
                xa, xb = _load_rows(x_ptr, blk, M, stride_xm, BLOCK_M, BLOCK_D, BLOCK_D2, D, EVEN)
                ya, yb = xa, xb
                if HAS_RES:
                    ya, yb = _load_rows(y_ptr, blk, M, stride_ym, BLOCK_M, BLOCK_D, BLOCK_D2, D, EVEN)
                _ln_block(blk, xa, xb, ya, yb, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, xnew_ptr, out_ptr,
                          qscale_ptr, wb_ptr, bscale_ptr, M, L, D, eps, stride_gb, stride_gl, stride_sb, stride_sl,
                          stride_cb, stride_cl, x_ptr.dtype.element_ty, HAS_RES, HAS_GATE, HAS_W, HAS_B, HAS_SHIFT,
                          HAS_SCALE, OUT_MODE, ROUND_LN, BLOCK_M, BLOCK_D, BLOCK_D2, VEC_SHARED, NATIVE, EVEN, QV,
                          x_ptr, stride_xm, STATS, BOUND)
    else:
        xa, xb = _load_rows(x_ptr, pid, M, stride_xm, BLOCK_M, BLOCK_D, BLOCK_D2, D, EVEN)
        ya, yb = xa, xb
        if HAS_RES:
            ya, yb = _load_rows(y_ptr, pid, M, stride_ym, BLOCK_M, BLOCK_D, BLOCK_D2, D, EVEN)
        _ln_block(pid, xa, xb, ya, yb, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, xnew_ptr, out_ptr,
                  qscale_ptr, wb_ptr, bscale_ptr, M, L, D, eps, stride_gb, stride_gl, stride_sb, stride_sl,
                  stride_cb, stride_cl, x_ptr.dtype.element_ty, HAS_RES, HAS_GATE, HAS_W, HAS_B, HAS_SHIFT,
                  HAS_SCALE, OUT_MODE, ROUND_LN, BLOCK_M, BLOCK_D, BLOCK_D2, VEC_SHARED, NATIVE, EVEN, QV,
                  x_ptr, stride_xm, STATS, BOUND)


def _check_wbound(wbound, quant, device) -> None:
    """The "bound" row scales need FP8 per-token codes and the GELU GEMM's [2] fp32 [C, b] on x's device."""
    if quant != ("fp8", "per_token"):
        raise ValueError(f"wbound (the bound row scales) needs quant ('fp8', 'per_token'), got {quant}")
    if tuple(wbound.shape) != (2,) or wbound.dtype != torch.float32 or wbound.device != device:
        raise ValueError(f"wbound must be the [2] float32 [C, b] on {device}, got {wbound.dtype} "
                         f"{list(wbound.shape)} on {wbound.device}")


def _launch(x, y, gate, weight, bias, shift, scale, eps, out_dtype, quant, config=None, wbound=None):
    """Validate, allocate, launch. quant: None | (format, granularity); wbound: None | the [2] fp32 [C, b]
    (FP8 per-token quant only). Returns (x_new, out, qscale, bound_scale), None for what is not computed."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x dtype {x.dtype} not supported (float32, bfloat16, float16)")
    if wbound is not None:
        _check_wbound(wbound, quant, x.device)
    if quant is not None and quant[1] == "block128":  # composed, see the module docstring
        from turbocompile.kernels.w8a8.triton_quant import quantize_triton

        x_new, h, _, _ = _launch(x, y, gate, weight, bias, shift, scale, eps, x.dtype, None, config)
        q, qscale = quantize_triton(h, quant[0], "block128")
        return x_new, q, qscale, None
    D = x.shape[-1]
    x2, B, L = as_rows(x)  # [M, D]
    M = x2.shape[0]
    dummy = x2  # stands in for absent tensors; never dereferenced (its HAS_* flag is False)
    y2 = None
    if y is not None:
        if y.shape != x.shape or y.dtype != x.dtype:
            raise ValueError(f"y {tuple(y.shape)} {y.dtype} must match x {tuple(x.shape)} {x.dtype}")
        y2, _, _ = as_rows(y)
    g, sgb, sgl = bcast_rows(gate, B, L, D, "gate") if gate is not None else (dummy, 0, 0)
    sh, ssb, ssl = bcast_rows(shift, B, L, D, "shift") if shift is not None else (dummy, 0, 0)
    sc, scb, scl = bcast_rows(scale, B, L, D, "scale") if scale is not None else (dummy, 0, 0)
    w = weight.contiguous() if weight is not None else dummy
    b = bias.contiguous() if bias is not None else dummy

    x_new = torch.empty_like(x2, memory_format=torch.contiguous_format) if y is not None else None
    mode, gran = _OUT_FLOAT, None
    if quant is not None:
        fmt, gran = quant
        mode = _OUT_INT8 if fmt == "int8" else _OUT_FP8
        qdt = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
        out = torch.empty(M, D, device=x.device, dtype=qdt)
        qscale = torch.empty(M, 1, device=x.device, dtype=torch.float32)  # per_token (block128 returned above)
    else:
        out = torch.empty(M, D, device=x.device, dtype=out_dtype)
        qscale = None
    bscale = torch.empty(M, 1, device=x.device, dtype=torch.float32) if wbound is not None else None
    if M == 0 or D == 0:
        return x_new, out, qscale, bscale
    round_ln = round_ln_output(x.dtype, out_dtype if quant is None else x.dtype, shift is not None or scale is not None)

    args = (x2, y2 if y2 is not None else dummy, g, w, b, sh, sc,
            x_new if x_new is not None else dummy, out, qscale if qscale is not None else dummy,
            wbound.contiguous() if wbound is not None else dummy, bscale if bscale is not None else dummy,
            M, L, D, float(eps),
            x2.stride(0), y2.stride(0) if y2 is not None else 0, sgb, sgl, ssb, ssl, scb, scl)
    flags = dict(HAS_RES=y is not None, HAS_GATE=gate is not None, HAS_W=weight is not None,
                 HAS_B=bias is not None, HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
                 OUT_MODE=mode, ROUND_LN=round_ln, BOUND=wbound is not None)
    native = x.device.type == "cuda"
    kind = ("quant" if quant is not None else "ln") + ("_res" if y is not None else "")
    if kind == "quant_res" and mode == _OUT_INT8:
        kind = "quant_res_int8"
    cfg = row_config(D, kind, config)
    if cfg["split"]:
        block_d, block_d2 = split_tiles(D)
    else:
        block_d, block_d2 = max(16, triton.next_power_of_2(D)), 0
    block_m = cfg["block_m"]
    # one [1, D] gate/shift/scale load serves the whole block when they are per sample and
    # every block lies inside one sample
    vec_shared = (sgl == 0 and ssl == 0 and scl == 0 and (B == 1 or L % block_m == 0))
    n_blk = triton.cdiv(M, block_m)
    extra = {"maxnreg": cfg["maxnreg"]} if cfg["maxnreg"] and native else {}
    grid = min(n_blk, cfg["persist"] * sm_count(x.device)) if cfg["persist"] else n_blk
    kernel = _ln_rows_kernel[(grid,)](*args, **flags, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_D2=block_d2,
                             VEC_SHARED=vec_shared, PERSIST=bool(cfg["persist"]),
                             PREFETCH=bool(cfg["prefetch"]), NUM_STAGES=cfg["stages"], NATIVE=native,
                             QV=cfg["qv"], STATS=cfg["stats"],
                             EVEN=(block_d + block_d2 == D),
                             num_warps=cfg["num_warps"], **extra)
    LAST_KERNEL["kernel"] = kernel
    LAST_KERNEL["n_regs"] = getattr(kernel, "n_regs", None)
    LAST_KERNEL["n_spills"] = getattr(kernel, "n_spills", None)
    return x_new, out, qscale, bscale


def ln_modulate_triton(x, weight, bias, shift, scale, eps, out_dtype, quant=None, config=None, wbound=None):
    """LN (+affine) (+modulate) of x [B,L,D] or [M,D] -> h (x's shape, out_dtype); with
    quant=(format, granularity) -> (q [M, D], scale). ``config`` overrides :func:`row_config` keys.
    ``wbound`` ([2] fp32 ``[C, b]``, quant ("fp8", "per_token") only): also the GELU GEMM's "bound" row
    scales from the codes, -> (q, scale, bound_scale [M, 1]) (``ref.ln_modulate_quant_bound_ref``)."""
    _, out, qscale, bscale = _launch(x, None, None, weight, bias, shift, scale, eps, out_dtype, quant, config,
                                     wbound)
    if wbound is not None:
        return out, qscale, bscale
    if quant is not None:
        return out, qscale
    return out.reshape(x.shape)


def residual_ln_modulate_triton(x, y, gate, weight, bias, shift, scale, eps, out_dtype, quant=None, config=None,
                                wbound=None):
    """x_new = x + y·gate (eager rounding) and LN-modulate(x_new) in one pass -> (x_new, h);
    with quant -> (x_new, q [M, D], scale); with wbound too -> (x_new, q, scale, bound_scale)."""
    x_new, out, qscale, bscale = _launch(x, y, gate, weight, bias, shift, scale, eps, out_dtype, quant, config,
                                         wbound)
    x_new = x_new.reshape(x.shape)
    if wbound is not None:
        return x_new, out, qscale, bscale
    if quant is not None:
        return x_new, out, qscale
    return x_new, out.reshape(x.shape)
