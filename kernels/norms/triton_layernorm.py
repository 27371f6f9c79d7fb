"""Triton kernels: (gated residual +) LayerNorm + AdaLN modulate (+ W8A8 quantization epilogue).

Two kernels:

* ``_ln_rows_kernel``: one tile of BLOCK_M rows × next_pow2(D) columns per program. The row
  stays in registers, so x (and y) are read once and x_new / h (or q and a per-row scale) are
  written once: 4 B/elt for bf16 ln_modulate, 8 B/elt with the residual, 3 B/elt + scales
  for the per-token quant epilogue.
* ``_ln_block128_kernel``: the block128 quant epilogue (scale per 128 rows × 128 columns).
  One program owns a 128-row band: pass 1 walks the 128-wide column tiles once for the row
  statistics (Chan's merge of per-tile mean/M2, as stable as two-pass), pass 2 walks them again
  to normalize, take each tile's amax and quantize. The band (128·D elements) does not fit in
  registers, so x is read twice: 5 B/elt instead of 3.

Quantizer (must match ``turbocompile::quantize_activation``): h is rounded to x.dtype first;
amax = max(1e-8, max|h|); INT8 q = rint(h·(128/amax)) saturated to [-128, 127], scale amax/128;
FP8 q = e4m3_rn(clamp(h·(448/amax), ±448)), scale amax/448. Divisions use div_rn (IEEE), and the
round-half-to-even is done with the 1.5·2^23 trick (exact for |v| ≤ 2^22, v is clamped first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbocompile.kernels.norms._launch import as_rows, bcast_rows, row_tiling
from turbocompile.kernels.norms.ref import round_ln_output
from turbocompile.kernels.norms.triton_rounding import round_e4m3, round_to

__all__ = ["ln_modulate_triton", "residual_ln_modulate_triton"]

_OUT_FLOAT, _OUT_INT8, _OUT_FP8 = 0, 1, 2


@triton.jit
def _residual(x, y_ptr, gate_ptr, xnew_ptr, y_off, g_off, xn_off, mask, HAS_GATE: tl.constexpr):
    """x_new = x + y * gate.to(dt), rounded like the eager dt ops; stores x_new, returns it in fp32."""
    dt = xnew_ptr.dtype.element_ty
    y = tl.load(y_ptr + y_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = round_to(tl.load(gate_ptr + g_off, mask=mask, other=0.0).to(tl.float32), dt)
        y = round_to(y * g, dt)  # bf16·bf16 is exact in fp32: one rounding to dt
    xn = round_to(x + y, dt)
    tl.store(xnew_ptr + xn_off, xn.to(dt), mask=mask)
    return xn


@triton.jit
def _affine_modulate(h, w_ptr, b_ptr, shift_ptr, scale_ptr, cols, col_mask, shift_off, scale_off, mask,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, ROUND_LN: tl.constexpr, RDT: tl.constexpr):
    """(h·w + b)·(1 + scale) + shift in fp32; w/b are [D], shift/scale are per row (offsets given).

    ROUND_LN: round the (affine) LN output to RDT before the modulation, as the eager model and
    TurboDiffusion do (``LN(x).type_as(x)``, then the fp32 modulation).
    """
    if HAS_W:
        h = h * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        h = h + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if ROUND_LN:
        h = round_to(h, RDT)
    if HAS_SCALE:
        h = h * (1.0 + tl.load(scale_ptr + scale_off, mask=mask, other=0.0).to(tl.float32))
    if HAS_SHIFT:
        h = h + tl.load(shift_ptr + shift_off, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _quantize(hq, amax, OUT_MODE: tl.constexpr):
    """hq: fp32 tile (already rounded to x.dtype); amax: its group amax, broadcastable to hq.
    Returns (q tile, scale shaped like amax)."""
    amax = tl.maximum(amax, 1e-8)
    if OUT_MODE == 1:
        inv = tl.math.div_rn(tl.zeros_like(amax) + 128.0, amax)
        v = hq * inv
        v = tl.minimum(tl.maximum(v, -128.0), 127.0)
        q = ((v + 12582912.0) - 12582912.0).to(tl.int8)  # 1.5·2^23 trick: rint, ties to even
        s = amax * 0.0078125  # amax / 128, exact
    else:
        inv = tl.math.div_rn(tl.zeros_like(amax) + 448.0, amax)
        v = tl.minimum(tl.maximum(hq * inv, -448.0), 448.0)
        s = tl.math.div_rn(amax, tl.zeros_like(amax) + 448.0)
        q = round_e4m3(v).to(tl.float8e4nv)
    return q, s


@triton.jit
def _ln_rows_kernel(
    x_ptr, y_ptr, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr,  # x,y [M,D] rows; w,b [D]; gate/shift/scale per (b,l)
    xnew_ptr, out_ptr, qscale_ptr,  # outputs: x_new [M,D], h or q [M,D], per-row scale [M,1]
    M, L, D, eps,
    stride_xm, stride_ym, stride_gb, stride_gl, stride_sb, stride_sl, stride_cb, stride_cl,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, OUT_MODE: tl.constexpr, ROUND_LN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # flattened (b, l) rows
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    bi = rows64 // L
    li = rows64 % L
    offs_out = rows64[:, None] * D + cols[None, :]  # outputs are contiguous [M, D]

    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = _residual(x, y_ptr, gate_ptr, xnew_ptr,
                      rows64[:, None] * stride_ym + cols[None, :],
                      (bi * stride_gb + li * stride_gl)[:, None] + cols[None, :],
                      offs_out, mask, HAS_GATE)

    mean = tl.sum(x, axis=1) / D
    diff = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(diff * diff, axis=1) / D + eps)
    h = _affine_modulate(diff * rstd[:, None], w_ptr, b_ptr, shift_ptr, scale_ptr, cols, col_mask,
                         (bi * stride_sb + li * stride_sl)[:, None] + cols[None, :],
                         (bi * stride_cb + li * stride_cl)[:, None] + cols[None, :], mask,
                         HAS_W, HAS_B, HAS_SHIFT, HAS_SCALE, ROUND_LN, x_ptr.dtype.element_ty)

    if OUT_MODE == 0:
        tl.store(out_ptr + offs_out, round_to(h, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        hq = tl.where(mask, round_to(h, x_ptr.dtype.element_ty), 0.0)
        amax = tl.max(tl.abs(hq), axis=1, keep_dims=True)  # [BLOCK_M, 1]
        q, s = _quantize(hq, amax, OUT_MODE)
        tl.store(out_ptr + offs_out, q, mask=mask)
        tl.store(qscale_ptr + rows64[:, None], s, mask=row_mask[:, None])


@triton.jit
def _ln_block128_kernel(
    x_ptr, y_ptr, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr,  # as in _ln_rows_kernel
    xnew_ptr, q_ptr, qscale_ptr,  # outputs: x_new [M,D], q [M,D], scale [ceil(M/128), ceil(D/128)]
    M, L, D, eps,
    stride_xm, stride_ym, stride_gb, stride_gl, stride_sb, stride_sl, stride_cb, stride_cl,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, OUT_MODE: tl.constexpr, ROUND_LN: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_cb = tl.cdiv(D, QBLOCK)
    rows = pid * QBLOCK + tl.arange(0, QBLOCK)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    bi = rows64 // L
    li = rows64 % L

    # Pass 1: per-row mean and M2 over the whole row, merged tile by tile (Chan et al.).
    mean = tl.zeros([QBLOCK], dtype=tl.float32)
    m2 = tl.zeros([QBLOCK], dtype=tl.float32)
    for cb in range(0, n_cb):
        cols = cb * QBLOCK + tl.arange(0, QBLOCK)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            x = _residual(x, y_ptr, gate_ptr, xnew_ptr,
                          rows64[:, None] * stride_ym + cols[None, :],
                          (bi * stride_gb + li * stride_gl)[:, None] + cols[None, :],
                          rows64[:, None] * D + cols[None, :], mask, HAS_GATE)
        n_a = (cb * QBLOCK) * 1.0
        n_b = tl.minimum(D - cb * QBLOCK, QBLOCK) * 1.0
        t_mean = tl.sum(x, axis=1) / n_b
        t_diff = tl.where(mask, x - t_mean[:, None], 0.0)
        t_m2 = tl.sum(t_diff * t_diff, axis=1)
        delta = t_mean - mean
        n = n_a + n_b
        mean = mean + delta * (n_b / n)
        m2 = m2 + t_m2 + delta * delta * (n_a * n_b / n)
    rstd = tl.rsqrt(m2 / D + eps)
    if HAS_RES:
        tl.debug_barrier()  # pass 2 reads the x_new this program stored in pass 1

    # Pass 2: normalize, modulate, round to x.dtype, quantize each 128×128 tile.
    for cb in range(0, n_cb):
        cols = cb * QBLOCK + tl.arange(0, QBLOCK)
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        if HAS_RES:
            x = tl.load(xnew_ptr + rows64[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.where(mask, x - mean[:, None], 0.0) * rstd[:, None]
        h = _affine_modulate(h, w_ptr, b_ptr, shift_ptr, scale_ptr, cols, col_mask,
                             (bi * stride_sb + li * stride_sl)[:, None] + cols[None, :],
                             (bi * stride_cb + li * stride_cl)[:, None] + cols[None, :], mask,
                             HAS_W, HAS_B, HAS_SHIFT, HAS_SCALE, ROUND_LN, x_ptr.dtype.element_ty)
        hq = tl.where(mask, round_to(h, x_ptr.dtype.element_ty), 0.0)
        amax = tl.max(tl.max(tl.abs(hq), axis=1, keep_dims=True), axis=0, keep_dims=True)  # [1, 1]
        q, s = _quantize(hq, amax, OUT_MODE)
        tl.store(q_ptr + rows64[:, None] * D + cols[None, :], q, mask=mask)
        tl.store(qscale_ptr + (pid * n_cb + cb) + tl.zeros([1, 1], dtype=tl.int32), s)


def _launch(x, y, gate, weight, bias, shift, scale, eps, out_dtype, quant):
    """Validate, allocate, launch. quant: None | (format, granularity). Returns (x_new, out, qscale)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x dtype {x.dtype} not supported (float32, bfloat16, float16)")
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
        if gran == "per_token":
            qscale = torch.empty(M, 1, device=x.device, dtype=torch.float32)
        else:
            qscale = torch.empty(triton.cdiv(M, 128), triton.cdiv(D, 128), device=x.device, dtype=torch.float32)
    else:
        out = torch.empty(M, D, device=x.device, dtype=out_dtype)
        qscale = None
    if M == 0 or D == 0:
        return x_new, out, qscale
    round_ln = round_ln_output(x.dtype, out_dtype if quant is None else x.dtype, shift is not None or scale is not None)

    args = (x2, y2 if y2 is not None else dummy, g, w, b, sh, sc,
            x_new if x_new is not None else dummy, out, qscale if qscale is not None else dummy,
            M, L, D, float(eps),
            x2.stride(0), y2.stride(0) if y2 is not None else 0, sgb, sgl, ssb, ssl, scb, scl)
    flags = dict(HAS_RES=y is not None, HAS_GATE=gate is not None, HAS_W=weight is not None,
                 HAS_B=bias is not None, HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
                 OUT_MODE=mode, ROUND_LN=round_ln)
    if gran == "block128":
        _ln_block128_kernel[(triton.cdiv(M, 128),)](*args, **flags, QBLOCK=128, num_warps=8)
    else:
        block_m, block_d, num_warps = row_tiling(D)
        _ln_rows_kernel[(triton.cdiv(M, block_m),)](*args, **flags, BLOCK_M=block_m, BLOCK_D=block_d,
                                                    num_warps=num_warps)
    return x_new, out, qscale


def ln_modulate_triton(x, weight, bias, shift, scale, eps, out_dtype, quant=None):
    """LN (+affine) (+modulate) of x [B,L,D] or [M,D] -> h (x's shape, out_dtype); with
    quant=(format, granularity) -> (q [M, D], scale)."""
    _, out, qscale = _launch(x, None, None, weight, bias, shift, scale, eps, out_dtype, quant)
    if quant is not None:
        return out, qscale
    return out.reshape(x.shape)


def residual_ln_modulate_triton(x, y, gate, weight, bias, shift, scale, eps, out_dtype, quant=None):
    """x_new = x + y·gate (eager rounding) and LN-modulate(x_new) in one pass -> (x_new, h);
    with quant -> (x_new, q [M, D], scale)."""
    x_new, out, qscale = _launch(x, y, gate, weight, bias, shift, scale, eps, out_dtype, quant)
    x_new = x_new.reshape(x.shape)
    if quant is not None:
        return x_new, out, qscale
    return x_new, out.reshape(x.shape)
