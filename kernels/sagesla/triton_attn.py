"""SageSLA sparse forward with the linear branch fused into the epilogue.

Grid (Qb', B*H); query tile fastest so programs running together share one head's K/V in L2.
Each program:
  1. loads its q tile [BLOCK_M, D] straight from [B, L, H, D] and quantizes it to INT8 in
     registers, one scale per QGROUP (= block_q) rows. BLOCK_M is block_q in sparse mode (the
     tile is one query block of the block map) and may be a multiple of it in dense mode
     (e.g. 128 rows over 8 warps = two warpgroups, each owning one 64-row quantization group);
  2. loops over the selected key blocks: the LUT row in sparse mode, every key block in DENSE
     mode (no LUT at all). Blocks are ascending, so only the last can be the partial tail
     block: the loop is peeled and only the last iteration is masked.
     Per key block: the INT8 dot's int32 result is converted to fp32 (MAGIC_CVT: the exact
     add-0x4B400000 bit trick instead of I2F; measured 1-2% slower on the H200, so off by
     default); the row max is taken on the raw scores and scaled afterwards; p = exp2(s·c − m)
     is ONE FMA + EX2 per element, with c = q_scale·k_scale·log2e/√D per row and, for FP8,
     log2(448) folded into
     m so that p comes out already multiplied by the static 448 P scale (l is kept in the
     same units, so the 448s cancel in o = acc / l);
     pv = dot(P̃_e4m3, V_fp8) into a fresh fp32 tile, acc = acc·α + pv (two-level accumulation:
     the sm90 fp8 MMA accumulates at reduced precision, spec §4.3).
  3. epilogue: o_s = acc · v_scale / l, plus the linear branch φ(q)·KV / (1e-5 + φ(q)·ksum) →
     proj_l → bias, with proj_l folded into KVW = KV·Wᵀ (one product per row tile): by default
     parked in the output rows beforehand, by this kernel's prologue in sparse mode (LIN_PRO) or
     by `_linear_out_kernel` in dense mode, and added here (ADD_OUT; computing it in the
     epilogue, LINEAR, made the main loop spill); written to [B, L, H, D], or (QOUT) as the o
     projection's FP8 codes [B*L, H*D] at the sample's scale bound_b / 448 with the tokens' scales
     (head-0 programs), the output first rounded to the model dtype as it would be stored (`quant_out`).
QUANT: 0 = plain bf16/fp16 SLA (K, V read from the inputs), 1 = int8-fp8, 2 = int8-fp16.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..norms.triton_rounding import round_to
from .gluon_attn import DEFAULT_STAGES, gluon_supported, launch_gluon
from .linear_fold import fold_linear
from .quant_out import fp8_codes, sample_bound
from .side_streams import join
from .triton_prep import INTERPRET, dot_acc, feature_map, permute_keys, prepare, round_e4m3

LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)  # the same, usable inside kernels
LOG2_448 = tl.constexpr(8.807354922057604)  # log2(448): P̃ = 448·p = exp2(s − m + log2 448)


MAGIC = tl.constexpr(12582912.0)  # 1.5·2^23: floats in [2^23, 2^24) have ulp 1
MAGIC_BITS = tl.constexpr(0x4B400000)  # bits of MAGIC


@triton.jit
def exp2_fma(x):
    """2^x on the FMA pipe (no MUFU): x = j + f with j = rint(x) by the 1.5·2^23 trick,
    2^f on [-0.5, 0.5] by a degree-3 minimax polynomial (max rel. error 1.0e-4), and 2^j
    added into the exponent field. bits(x + MAGIC) = MAGIC_BITS + j, and MAGIC_BITS << 23
    vanishes mod 2^32, so (bits << 23) is j << 23. x is clamped to >= -125 (2^-125 is
    below anything P or its FP8 cast can hold; -inf maps there too)."""
    x = tl.maximum(x, -125.0)
    t = x + MAGIC
    f = x - (t - MAGIC)
    p = 1.0 + f * (0.69328276 + f * (0.24221099 + f * 0.05500976))
    return (p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _exp2_p(x, EXPM: tl.constexpr):
    """The softmax numerator exponent. EXPM 0: MUFU ex2 for every element; 1: the FMA-pipe
    polynomial for every element; 2: half and half (odd columns on the FMA pipe) so both
    pipes share the work; 9: no exponent at all (timing ablation only, wrong numbers)."""
    if EXPM == 0:
        return tl.exp2(x)
    elif EXPM == 1:
        return exp2_fma(x)
    elif EXPM == 2:
        xa, xb = tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))
        return tl.reshape(tl.join(tl.exp2(xa), exp2_fma(xb)), [x.shape[0], x.shape[1]])
    else:
        return tl.maximum(x + 9.0, 0.0)


@triton.jit
def _to_e4m3(p, P8: tl.constexpr):
    """P̃ (fp32, 0 <= P̃ <= 448) to e4m3. P8 0: the hardware cvt (RNE); 1: integer bit
    arithmetic (round half up on the 4th mantissa bit; P̃ < 2^-6 flushes to 0)."""
    if P8 == 0:
        return p.to(tl.float8e4nv)
    else:
        code = ((p.to(tl.int32, bitcast=True) + 0x80000) >> 20) - 960  # rebias 127 -> 7, keep 3 mantissa bits
        code = tl.where(code < 8, 0, tl.minimum(code, 126))
        return code.to(tl.int8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _attn_step(
    acc, m_i, l_i, q, c_row, j, L,
    kbase, vbase, kscale_ptr, stride_kl, stride_kd, stride_vl, stride_vd,
    offs_n, offs_d,
    BLOCK_N: tl.constexpr, QUANT: tl.constexpr, TAIL: tl.constexpr, EXACT_FP8: tl.constexpr,
    CVT: tl.constexpr, EXPM: tl.constexpr, P8: tl.constexpr, NOPV: tl.constexpr,
    kdesc, vdesc, krow0, vrow0, TMA: tl.constexpr, VPERM: tl.constexpr,
):
    cols = j * BLOCK_N + offs_n
    kptrs = kbase + cols[:, None].to(tl.int64) * stride_kl + offs_d[None, :] * stride_kd
    vptrs = vbase + cols[:, None].to(tl.int64) * stride_vl + offs_d[None, :] * stride_vd
    if TMA:  # Hopper TMA: K rows [krow0 + j·BLOCK_N, +BLOCK_N), V^T columns of head rows vrow0..+D
        kt = kdesc.load([krow0 + j * BLOCK_N, 0])
        vt = tl.trans(vdesc.load([vrow0, j * BLOCK_N]))
    elif TAIL and QUANT == 0:  # quantized K/V are zero padded to Lpad; raw inputs are not
        kt = tl.load(kptrs, mask=cols[:, None] < L, other=0.0)
        vt = tl.load(vptrs, mask=cols[:, None] < L, other=0.0)
    else:
        kt = tl.load(kptrs)
        vt = tl.load(vptrs)
    # s·c - bias is the exponent (log2 units) of the softmax numerator; the max is taken on s.
    if QUANT == 0:
        s = dot_acc(q, tl.trans(kt), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), EXACT_FP8)
        c = c_row
        off = tl.zeros_like(c)
    else:
        si = tl.dot(q, tl.trans(kt))  # int32, |si| <= 127*127*D < 2**21
        c = c_row * tl.load(kscale_ptr + j)
        off = tl.zeros_like(c)
        if CVT == 2:
            # No conversion instruction at all: bits(MAGIC) + si reads as the float MAGIC + si
            # (exact), and the - MAGIC is folded into the per-row bias of the exponent FMA below.
            s = (si + MAGIC_BITS).to(tl.float32, bitcast=True)
            off = MAGIC * c
        elif CVT == 1:
            s = (si + MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC
        else:
            s = si.to(tl.float32)
    if TAIL:
        s = tl.where(cols[None, :] < L, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * c - off)  # c > 0: max commutes with the scaling
    alpha = tl.exp2(m_i - m_new)
    if QUANT == 1:
        bias = off + m_new - LOG2_448  # P̃ = 448 · softmax numerator
    else:
        bias = off + m_new
    p = _exp2_p(s * c[:, None] - bias[:, None], EXPM)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if NOPV:  # timing ablation only
        acc = acc * alpha[:, None] + tl.sum(p, axis=1)[:, None]
    else:
        if QUANT == 1:
            if EXACT_FP8:
                p = round_e4m3(p)
            p8 = _to_e4m3(p, P8)
            if VPERM:  # V's keys are stored in `permute_keys` order: order P's columns alike
                p8 = permute_keys(p8)
            if BLOCK_N < 32:  # an FP8 MMA needs K >= 32 on the GPU: e4m3 values are exact in fp16
                pv = tl.dot(p8.to(tl.float16), vt.to(tl.float16))
            else:
                pv = tl.dot(p8, vt)
        else:
            pv = dot_acc(p.to(vt.dtype), vt, tl.zeros(acc.shape, dtype=tl.float32), EXACT_FP8)
        acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _sagesla_fwd_kernel(
    q_ptr,  # [B, L, H, D] bf16/fp16
    k_ptr,  # QUANT: [B*H, Lpad, D] int8 | raw k [B, L, H, D]
    v_ptr,  # QUANT 1/2: [B*H, D, Lpad] e4m3/fp16 | raw v [B, L, H, D]
    kscale_ptr,  # [B*H, Kb] fp32
    vscale_ptr,  # [B*H, D] fp32 (QUANT == 1)
    lut_ptr,  # [B*H, Qb, T] int32, ascending (unused when DENSE)
    kvw_ptr,  # [B*H, D, D] q dtype  (φ(k)ᵀ v)·proj_lᵀ
    ksum_ptr,  # [B*H, D] fp32     Σ φ(k)
    bias_ptr,  # [D] fp32
    o_ptr,  # [B, L, H, D]
    H, L, Qb, Kb, T, qk_scale,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    BLOCK_M: tl.constexpr, QGROUP: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    QUANT: tl.constexpr, LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, EXACT_FP8: tl.constexpr,
    DENSE: tl.constexpr, WS: tl.constexpr, ADD_OUT: tl.constexpr,
    CVT: tl.constexpr, EXPM: tl.constexpr, P8: tl.constexpr, NOPV: tl.constexpr,
    kdesc, vdesc, Lpad, TMA: tl.constexpr, LIN_PRO: tl.constexpr, VPERM: tl.constexpr,
    codes_ptr,  # QOUT: [B*L, H*D] e4m3, contiguous
    scale_ptr,  # QOUT: [B*L] fp32 per-token scales (written by the head-0 programs)
    bound_ptr,  # QOUT: [3, B] fp32 per-sample bound, 448 / bound, bound / 448 (`quant_out.sample_bound`)
    QOUT: tl.constexpr,
):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m[:, None] < L
    qptrs = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh \
        + offs_m[:, None].to(tl.int64) * stride_ql + offs_d[None, :] * stride_qd
    qx = tl.load(qptrs, mask=row_ok, other=0.0)
    if QUANT == 0:
        q = qx
        c_row = tl.zeros([BLOCK_M], dtype=tl.float32) + qk_scale
    else:
        qf = qx.to(tl.float32)
        ramax = tl.max(tl.abs(qf), axis=1)  # [BLOCK_M]
        if BLOCK_M == QGROUP:
            q_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + (tl.max(ramax, axis=0) / 127.0 + 1e-7)
        else:  # several quantization groups of QGROUP rows in one tile
            g = tl.max(tl.reshape(ramax, [BLOCK_M // QGROUP, QGROUP]), axis=1) / 127.0 + 1e-7
            q_scale = tl.reshape(tl.broadcast_to(g[:, None], [BLOCK_M // QGROUP, QGROUP]), [BLOCK_M])
        y = qf / q_scale[:, None]
        q = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int8)
        c_row = qk_scale * q_scale

    if QUANT == 0:
        kbase = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
        vbase = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
    else:
        kbase = k_ptr + bh.to(tl.int64) * stride_kh
        vbase = v_ptr + bh.to(tl.int64) * stride_vh
    kscale_base = kscale_ptr + bh * Kb
    optrs = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh \
        + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :] * stride_od
    if LIN_PRO:
        # The linear branch (+ proj_l folded into KVW, + bias) from the q tile already in
        # registers, parked in the output rows; the epilogue (ADD_OUT) adds the sparse branch.
        # Its registers are dead before the main loop starts.
        phi = feature_map(qx.to(tl.float32), 1)
        kvw = tl.load(kvw_ptr + bh.to(tl.int64) * HEAD_D * HEAD_D + offs_d[:, None] * HEAD_D + offs_d[None, :])
        ksv = tl.load(ksum_ptr + bh * HEAD_D + offs_d)
        num = dot_acc(phi.to(qx.dtype), kvw, tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32), EXACT_FP8)
        ol = num * (1.0 / (1e-5 + tl.sum(phi * ksv[None, :], axis=1)))[:, None]
        if HAS_BIAS:
            ol += tl.load(bias_ptr + offs_d)[None, :]
        tl.store(optrs, ol.to(o_ptr.dtype.element_ty), mask=row_ok)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    if DENSE:
        for j in tl.range(0, Kb - 1, warp_specialize=WS):
            acc, m_i, l_i = _attn_step(
                acc, m_i, l_i, q, c_row, j, L, kbase, vbase, kscale_base,
                stride_kl, stride_kd, stride_vl, stride_vd, offs_n, offs_d,
                BLOCK_N, QUANT, False, EXACT_FP8, CVT, EXPM, P8, NOPV,
                kdesc, vdesc, bh * Lpad, bh * HEAD_D, TMA, VPERM)
        j = Kb - 1
    else:
        lut_base = lut_ptr + (bh * Qb + i).to(tl.int64) * T
        for t in tl.range(0, T - 1, warp_specialize=WS):
            j = tl.load(lut_base + t)
            acc, m_i, l_i = _attn_step(
                acc, m_i, l_i, q, c_row, j, L, kbase, vbase, kscale_base,
                stride_kl, stride_kd, stride_vl, stride_vd, offs_n, offs_d,
                BLOCK_N, QUANT, False, EXACT_FP8, CVT, EXPM, P8, NOPV,
                kdesc, vdesc, bh * Lpad, bh * HEAD_D, TMA, VPERM)
        j = tl.load(lut_base + T - 1)  # the largest selected block: the only one that may be partial
    acc, m_i, l_i = _attn_step(
        acc, m_i, l_i, q, c_row, j, L, kbase, vbase, kscale_base,
        stride_kl, stride_kd, stride_vl, stride_vd, offs_n, offs_d,
        BLOCK_N, QUANT, True, EXACT_FP8, CVT, EXPM, P8, NOPV,
        kdesc, vdesc, bh * Lpad, bh * HEAD_D, TMA, VPERM)

    inv_l = 1.0 / l_i  # one reciprocal per row, then products
    if QUANT == 1:
        vs = tl.load(vscale_ptr + bh * HEAD_D + offs_d)
        o = acc * vs[None, :] * inv_l[:, None]  # P̃ and l both carry the 448
    else:
        o = acc * inv_l[:, None]

    if LINEAR:
        # φ(q) = e / Σe with e = exp(q - max q) over the head dim of the (unquantized) q tile; proj_l is
        # folded into KVW = KV·Wᵀ, so o_l·Wᵀ = φ(q)·KVW / (1e-5 + φ(q)·Σφ(k)) is one product. The 1/Σe
        # cancels: e·KVW / (1e-5·Σe + e·Σφ(k)), so φ(q) is never normalized (e, not φ, is rounded to the
        # model dtype for the product: the same relative rounding).
        qf2 = tl.load(qptrs, mask=row_ok, other=0.0).to(tl.float32)
        e = tl.exp2(qf2 * LOG2E_C - (tl.max(qf2, axis=1) * LOG2E_C)[:, None])
        kvw = tl.load(kvw_ptr + bh.to(tl.int64) * HEAD_D * HEAD_D + offs_d[:, None] * HEAD_D + offs_d[None, :])
        ks = tl.load(ksum_ptr + bh * HEAD_D + offs_d)
        num = dot_acc(e.to(qx.dtype), kvw, tl.zeros(o.shape, dtype=tl.float32), EXACT_FP8)
        den = 1e-5 * tl.sum(e, axis=1) + tl.sum(e * ks[None, :], axis=1)
        o += num * (1.0 / den)[:, None]
    if HAS_BIAS and not LIN_PRO:
        o += tl.load(bias_ptr + offs_d)[None, :]
    if ADD_OUT:  # the linear branch (+ proj_l, bias) was written there by _linear_out_kernel
        if LIN_PRO:
            tl.debug_barrier()  # rows parked by other threads of this program
        o += tl.load(optrs, mask=row_ok, other=0.0).to(tl.float32)
    if QOUT:  # the o projection's FP8 input instead of the output rows (o_ptr then only parks the linear branch)
        _store_codes(o, codes_ptr, scale_ptr, bound_ptr, b, h, H, L, offs_m, offs_d, q_ptr.dtype.element_ty,
                     EXACT_FP8, HEAD_D)
    elif EXACT_FP8:  # the interpreter's own 16-bit cast truncates: round to nearest even first, as the GPU
        tl.store(optrs, round_to(o, o_ptr.dtype.element_ty).to(o_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.store(optrs, o.to(o_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _store_codes(o, codes_ptr, scale_ptr, bound_ptr, b, h, H, L, offs_m, offs_d, dt: tl.constexpr,
                 EXACT: tl.constexpr, HEAD_D: tl.constexpr):
    """FP8 codes of the output tile o [BLOCK_M, HEAD_D] (rows offs_m of sample b, head h) at sample b's scale
    bound / 448, into codes [B*L, H*HEAD_D]; head 0 also writes the rows' scales. ``bound_ptr``: [3, B], the
    bounds, 448 / bound (the quantizer's correctly rounded reciprocal) and bound / 448."""
    row_ok = offs_m < L
    tok = b.to(tl.int64) * L + offs_m
    nb = tl.num_programs(1) // H  # B
    codes = fp8_codes(o, tl.load(bound_ptr + nb + b), dt, EXACT)
    tl.store(codes_ptr + (tok * H + h)[:, None] * HEAD_D + offs_d[None, :], codes, mask=row_ok[:, None])
    if h == 0:
        tl.store(scale_ptr + tok, tl.zeros([offs_m.shape[0]], tl.float32) + tl.load(bound_ptr + 2 * nb + b),
                 mask=row_ok)


@triton.jit
def _linear_out_kernel(
    q_ptr, kvw_ptr, ksum_ptr, bias_ptr, o_ptr, H, L, n_tiles, tiles_per_prog,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_ob, stride_ol, stride_oh, stride_od,
    BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, HAS_BIAS: tl.constexpr, EXACT_FP8: tl.constexpr,
    STAGES: tl.constexpr,
):
    """o = φ(q)·KVW / (1e-5 + φ(q)·ksum) (+ bias) = proj_l(linear branch), written to o_ptr in its
    dtype; the attention kernel (ADD_OUT) adds the sparse branch. Grid (programs per head, B*H):
    each program loads its head's KVW = (φ(k)ᵀv)·proj_lᵀ and Σφ(k) once and walks
    `tiles_per_prog` consecutive BLOCK_M-row tiles. Kept out of the attention epilogue, whose
    extra registers made the main loop spill (255 regs, 28 spills at 64×128)."""
    p = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, HEAD_D)
    offs_r = tl.arange(0, BLOCK_M)
    kvw = tl.load(kvw_ptr + bh.to(tl.int64) * HEAD_D * HEAD_D + offs_d[:, None] * HEAD_D + offs_d[None, :])
    ks = tl.load(ksum_ptr + bh * HEAD_D + offs_d)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d)
    qbase = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    obase = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh
    t0 = p * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, n_tiles)
    for t in tl.range(t0, t1, num_stages=STAGES):
        offs_m = t * BLOCK_M + offs_r
        row_ok = offs_m[:, None] < L
        qx = tl.load(qbase + offs_m[:, None].to(tl.int64) * stride_ql + offs_d[None, :] * stride_qd,
                     mask=row_ok, other=0.0)
        phi = feature_map(qx.to(tl.float32), 1)
        num = dot_acc(phi.to(qx.dtype), kvw, tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32), EXACT_FP8)
        den = 1e-5 + tl.sum(phi * ks[None, :], axis=1)
        o = num * (1.0 / den)[:, None]
        if HAS_BIAS:
            o += bias[None, :]
        tl.store(obase + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :] * stride_od,
                 o.to(o_ptr.dtype.element_ty), mask=row_ok)


def linear_out_grid(L: int, BH: int, block_m: int, sms: int, waves: int = 4) -> tuple[int, int]:
    """(programs per head, tiles per program) for `_linear_out_kernel`: about `waves` programs per
    SM in all, each walking consecutive row tiles of one head."""
    n_tiles = triton.cdiv(L, block_m)
    per_head = max(1, min(n_tiles, triton.cdiv(waves * sms, BH)))
    tiles = triton.cdiv(n_tiles, per_head)
    return triton.cdiv(n_tiles, tiles), tiles


def sagesla_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: float,
    proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None,
    block_q: int, block_k: int, quant: str,
    num_warps: int | None = None, num_stages: int | None = None, pooled=None, fp8_out: bool = False,
):
    """Prep passes + sparse forward. q, k, v [B, L, H, D] with any strides (passed to the
    kernels, never copied). ``pooled``: precomputed pass-A statistics (q_pool or None when dense,
    k_blocksum, v_absmax), see :func:`prepare`. Inputs are assumed validated by the op. Returns the
    output [B, L, H, D], or with ``fp8_out`` the o projection's FP8 input (codes, scales): see
    :func:`launch_attn`."""
    prep = prepare(q, k, v, topk, block_q, block_k, quant, proj_weight is not None, pooled=pooled,
                   fold=(proj_weight, q.dtype) if proj_weight is not None else None)
    return launch_attn(q, k, v, prep, proj_weight, proj_bias, block_q, block_k, num_warps, num_stages,
                       fp8_out=fp8_out)


# H200 (RESULTS.md, SageSLA round 3): cvt 2 is 8.6% faster than I2F dense at 1.3B and 1.4% sparse
# at 14B; TMA K/V loads a further 4-6%; expm 1/2 and p8 1 are slower. tma None = on sm90+.
# kernel: "triton" (this file), "gluon" (`gluon_attn.py`: explicit TMA ring + async wgmma, sm90,
# int8-fp8 only) or "auto" (gluon where `gluon_supported`, else triton).
DEFAULT_VARIANT = {"cvt": 2, "expm": 0, "p8": 0, "tma": None, "kernel": "auto"}
# The linear branch: where it runs ("kernel": `_linear_out_kernel` first, the attention kernel adding
# to its rows; "prologue": the Triton attention kernel's prologue, from the q tile it loads anyway;
# "epilogue": fused into the attention kernel's epilogue (the Gluon kernel's sparse-mode choice);
# "auto": sparse mode prologue (Triton) / epilogue (Gluon), dense mode kernel) and the split
# kernel's rows per tile, warps, pipeline stages and programs per SM.
# H200 session 4 (branch cost = attention with proj_l minus without): sparse top-k 0.1, prologue
# 0.60 vs kernel 0.96 ms at B1 H40 L75600 and 0.127 vs 0.165 ms at B1 H12 L32760; dense at
# B1 H12 L32760 the prologue made the whole op slower (9.38 vs 9.15 ms).
DEFAULT_LINEAR_OUT = {"where": "auto", "block_m": 64, "warps": 4, "stages": 2, "waves": 4}


def default_block_m(block_q: int, dense: bool) -> int:
    """Query rows per program: block_q (one block-map row). Dense mode may use a multiple of it
    (block_m=128, 8 warps: two warpgroups, one quantization group each), but on the H200 that
    measured 184 ms vs 174 ms for 64 rows × 4 warps at B1 H40 L75600 (see RESULTS.md)."""
    return block_q


def _launch_linear_out(q, kvw, ksum, bias, out, has_bias: bool, lc: dict):
    """The linear branch φ(q)·KVW / den (+ bias) into `out`, where the attention kernel adds to it."""
    B, L, H, D = q.shape
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    per_head, tiles = linear_out_grid(L, B * H, lc["block_m"], sms, lc["waves"])
    _linear_out_kernel[(per_head, B * H)](
        q, kvw, ksum, bias, out, H, L, triton.cdiv(L, lc["block_m"]), tiles, *q.stride(), *out.stride(),
        BLOCK_M=lc["block_m"], HEAD_D=D, HAS_BIAS=has_bias, EXACT_FP8=INTERPRET,
        STAGES=lc["stages"], num_warps=lc["warps"])


def launch_attn(q, k, v, prep, proj_weight, proj_bias, block_q, block_k, num_warps=None, num_stages=None,
                block_m=None, magic_cvt=False, warp_specialize=False, split_linear=True, return_kernel=False,
                cvt=None, expm=None, p8=None, nopv=False, tma=None, linear_cfg=None, kernel=None, stages=None,
                fp8_out=False):
    """The sparse forward alone, on the operands made by :func:`prepare`.

    ``fp8_out``: return ``(codes [B*L, H*D] e4m3, scales [B*L, 1] fp32)`` instead of the output: the o
    projection's FP8 input at each sample's scale bound / 448 (`quant_out`; ``ref.sagesla_quant_ref``),
    written by the attention kernel's epilogue (one more small launch computes the bounds).

    Inner-loop variants (benchmark knobs; defaults in DEFAULT_VARIANT): ``cvt`` int32 -> fp32 of the
    INT8 scores (0 I2F, 1 add/sub bit trick, 2 bit trick folded into the exponent FMA), ``expm`` the
    softmax exponent (0 MUFU, 1 FMA polynomial, 2 half/half), ``p8`` the P -> e4m3 cast (0 cvt,
    1 integer bits), ``nopv`` (ablation: no PV product), ``tma`` (K/V tiles through Hopper TMA
    descriptors instead of pointer loads; quantized modes only). ``linear_cfg`` overrides keys of
    DEFAULT_LINEAR_OUT (the split linear-branch kernel's launch). ``kernel`` picks the attention
    kernel (see DEFAULT_VARIANT; "gluon" raises where `gluon_supported` says no) and ``stages`` the
    Gluon kernel's shared-memory ring depth."""
    var = dict(DEFAULT_VARIANT)
    if magic_cvt:
        var["cvt"] = 1
    for key, val in (("cvt", cvt), ("expm", expm), ("p8", p8), ("tma", tma), ("kernel", kernel)):
        if val is not None:
            var[key] = val
    B, L, H, D = q.shape
    linear = proj_weight is not None
    join(q.device, prep.get("side_events", ()))  # the fold of proj_l may come from a side stream
    qnt = prep["quant"]
    dense = prep["dense"]
    if block_m is None:
        block_m = default_block_m(block_q, dense)
    if block_m != block_q and (not dense or block_m % block_q):
        raise ValueError(f"block_m={block_m} must equal block_q={block_q} (sparse) or be a multiple of it (dense)")
    kdesc = vdesc = None
    Lpad = prep["Lpad"]
    use_tma = var["tma"]
    if use_tma is None:  # Hopper and newer, compiled (the interpreter runs TMA too, but only on request)
        use_tma = q.is_cuda and not INTERPRET and torch.cuda.get_device_capability(q.device)[0] >= 9
    use_tma = bool(use_tma) and qnt != 0
    if var["kernel"] not in ("triton", "gluon", "auto"):
        raise ValueError(f"kernel={var['kernel']!r}; valid: 'triton', 'gluon', 'auto'")
    use_gluon = var["kernel"] != "triton" and gluon_supported(q, qnt, block_q, block_k) and block_m == block_q \
        and not nopv and (var["cvt"], var["expm"], var["p8"]) == (2, 0, 0)
    if var["kernel"] == "gluon" and not use_gluon:
        raise ValueError("kernel='gluon' needs an sm90 CUDA device, quant int8-fp8, block_q 64, block_k 128 "
                         "and D 64/128 (with Triton's Gluon); use kernel='triton' or 'auto'")
    use_tma = use_tma and not use_gluon  # the Gluon kernel builds its own descriptors
    if qnt:
        kq, vq = prep["kq"], prep["vq"]
        kstr = (0, Lpad * D, D, 1)
        vstr = (0, D * Lpad, 1, Lpad)
        if use_tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            k2, v2 = kq.view(-1, D), vq.view(-1, Lpad)
            kdesc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [block_k, D])
            vdesc = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [D, block_k])
    else:
        kq, vq = k, v
        kstr = (k.stride(0), k.stride(2), k.stride(1), k.stride(3))
        vstr = (v.stride(0), v.stride(2), v.stride(1), v.stride(3))
    lc = dict(DEFAULT_LINEAR_OUT, **(linear_cfg or {}))
    if lc["where"] not in ("auto", "kernel", "prologue", "epilogue"):
        raise ValueError(f"linear_cfg where={lc['where']!r}; valid: 'auto', 'kernel', 'prologue', 'epilogue'")
    folded = prep.get("folded")
    if linear and folded is not None and folded[0] is proj_weight:  # folded beside the preparation
        _, kvw, ksum, _ = folded  # its event is among the side events joined above
    elif linear:
        kvw, ksum = fold_linear(prep, proj_weight, q.dtype)
    else:
        kvw = ksum = prep["vscale"]
    bias = proj_bias.float().contiguous() if proj_bias is not None else prep["vscale"]
    # The linear branch is parked in output rows that the attention kernel adds to: by `_linear_out_kernel`
    # (Gluon: where="kernel", or "auto" in dense mode; Triton: split, not in the prologue) or by the Triton
    # kernel's own prologue (LIN_PRO). With fp8_out those rows are a scratch buffer, allocated only then.
    own = use_gluon and linear and (lc["where"] == "kernel" or (lc["where"] == "auto" and dense))
    split = not use_gluon and linear and split_linear and lc["where"] != "epilogue"  # "epilogue": fused here
    pro = split and (lc["where"] == "prologue" or (lc["where"] == "auto" and not dense))
    out = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype) if not fp8_out or own or split \
        else q.new_empty((1, 1, 1, 1))  # never read or written
    qout = _fp8_out_buffers(q, prep, proj_weight, proj_bias) if fp8_out else None
    result = qout[:2] if fp8_out else out
    if use_gluon:
        # The linear branch (+ bias) runs in the Gluon kernel's epilogue, or (own) in `_linear_out_kernel`
        # first, the Gluon kernel adding to its rows.
        if own:
            _launch_linear_out(q, kvw, ksum, bias, out, proj_bias is not None, lc)
        kern = launch_gluon(q, out, prep, block_q, block_k, kvw if linear and not own else None,
                            ksum if linear and not own else None,
                            bias if proj_bias is not None and not own else None, stages or DEFAULT_STAGES,
                            add_out=own, qout=qout)
        return (result, kern) if return_kernel else result
    if split and not pro:
        _launch_linear_out(q, kvw, ksum, bias, out, proj_bias is not None, lc)
    if num_warps is None:
        num_warps = 4 if block_m <= 64 else 8
    if num_stages is None:
        num_stages = 3
    lut = prep["lut"] if prep["lut"] is not None else prep["vscale"]
    grid = (triton.cdiv(L, block_m), B * H)
    kern = _sagesla_fwd_kernel[grid](
        q, kq, vq, prep["kscale"], prep["vscale"], lut, kvw, ksum, bias, out,
        H, L, prep["Qb"], prep["Kb"], prep["T"], LOG2E / math.sqrt(D),
        *q.stride(), *kstr, *vstr, *out.stride(),
        BLOCK_M=block_m, QGROUP=block_q, BLOCK_N=block_k, HEAD_D=D,
        QUANT=qnt, LINEAR=linear and not split, HAS_BIAS=proj_bias is not None and (not split or pro),
        EXACT_FP8=INTERPRET, DENSE=dense, WS=warp_specialize, ADD_OUT=split,
        CVT=var["cvt"], EXPM=var["expm"], P8=var["p8"], NOPV=nopv,
        kdesc=kdesc, vdesc=vdesc, Lpad=Lpad, TMA=use_tma, LIN_PRO=pro, VPERM=bool(prep.get("v_perm", False)),
        codes_ptr=qout[0] if fp8_out else out, scale_ptr=qout[1] if fp8_out else out,
        bound_ptr=qout[2] if fp8_out else out, QOUT=fp8_out,
        num_warps=num_warps, num_stages=num_stages,
    )
    if return_kernel:
        return result, kern
    return result


def _fp8_out_buffers(q, prep, proj_weight, proj_bias):
    """(codes [B*L, H*D] e4m3, scales [B*L, 1] fp32, [3, B] fp32 bounds with 448 / bound and bound / 448) for an
    fp8_out launch; the bounds are computed here (`quant_out.sample_bound`, chained like `prepare`'s kernels
    when it used PDL)."""
    B, L, H, D = q.shape
    codes = torch.empty(B * L, H * D, device=q.device, dtype=torch.float8_e4m3fn)
    scales = torch.empty(B * L, 1, device=q.device, dtype=torch.float32)
    bound = sample_bound(prep["vscale"], B, proj_weight, proj_bias, bool(prep.get("pdl")))
    return codes, scales, bound
