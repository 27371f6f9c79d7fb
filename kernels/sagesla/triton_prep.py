"""SageSLA pre-processing in two passes over [B, L, H, D] inputs (no transposes).

Pass A (`_pool_kernel`, grid (chunks, B*H)): per chunk of rows, pooled q means per query block,
raw k sums per key block (the smoothing mean and the pooled smoothed k follow from them) and,
when no linear-statistics kernel runs, the per-chunk |v| channel maxima. Reads q and k (and v).
Its outputs may instead be given (`prepare`'s ``pooled``): the q/k RMSNorm+RoPE kernels compute
them while writing q and k (`turbocompile::rmsnorm_rope_pool`), and pass A is not launched. When the
linear branch runs and nothing was given, the linear statistics kernel computes them (``lin_pool``)
and pass A is not launched either.

Between the passes: km = mean_L(k), pooled k̄ - km, the block scores q̄ k̄ᵀ and the V channel scales
(`_key_means_kernel`, one launch), then `_topk_lut_kernel` (Triton bisection top-k writing the
ascending LUT; 0.69 ms vs 1.50 ms for torch topk+sort at B1 H40 L75600). With ``topk="fused"`` all of
it is one launch (`block_map`). Dense mode (topk 1.0): no q pooling, no scores, no LUT (the
attention kernel iterates every key block).

Pass B (`_quant_kv_kernel`, grid (chunks, B*H)): reads k and v once more and writes INT8 K of
(k - km) per key block [B*H, Lpad, D] with its scales, V (FP8 e4m3 or fp16) D-major
[B*H, D, Lpad] zero-padded (and, as an option, the linear-branch statistics).

The linear-branch statistics φ(k)ᵀv, Σφ(k) run by default in their own kernel between the
passes (`linear_stats._linear_stats_kernel`, which can also take the |v| channel maxima): inside pass B their
[D, D] accumulator and the transpose of φ(k) made the quantization loop register-bound (H200:
pass B 0.79 ms quant-only vs 1.99 ms with the statistics at B1 H40 L75600). With the linear branch
that kernel also takes over pass A (``lin_pool``): q read once, k and v twice. Without it: q read
once (pass A), k and v twice. K/V written once at 1 byte (fp8) per element. On Hopper the statistics
run in the Gluon kernel `gluon_stats` where it covers the inputs (``lin_gluon``; same outputs, a TMA
ring and one program per SM: 0.173 -> 0.123 ms at Wan-1.3B on an H100), elsewhere in the Triton one.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .block_map import block_map, key_mean, topk_select, v_scale
from .pdl import pdl_active, pdl_enter, pdl_launch_kwargs

FP8_MAX = 448.0
EPS_SCALE = 1e-7

# Triton's CPU interpreter rounds fp32 -> e4m3 without carrying into the exponent (1.97 -> 1.0);
# under the interpreter we round to the e4m3 grid ourselves so the cast is exact.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def round_e4m3(x):
    """Round fp32 to the e4m3 grid (round half to even, as the GPU cast and torch; saturate at 448)."""
    ax = tl.abs(x)
    step = tl.maximum(tl.exp2(tl.floor(tl.log2(tl.maximum(ax, 1e-30))) - 3.0), 0.001953125)  # 2^-9: subnormal step
    y = ax / step  # exact (a power of two), < 16
    r = tl.minimum(((y + 12582912.0) - 12582912.0) * step, 448.0)  # 1.5·2^23 trick: rint, ties to even
    return tl.where(x < 0, -r, r)


@triton.jit
def feature_map(x, AXIS: tl.constexpr):
    """φ(x) of the linear branch: softmax over the head dim of an fp32 tile; the head dim is
    AXIS (1 for [rows, D] tiles, 0 for transposed [D, rows] tiles)."""
    e = tl.exp2((x - tl.expand_dims(tl.max(x, axis=AXIS), AXIS)) * 1.4426950408889634)
    return e * tl.expand_dims(1.0 / tl.sum(e, axis=AXIS), AXIS)


@triton.jit
def dot_acc(a, b, acc, F32: tl.constexpr):
    """acc + a @ b. F32 (interpreter only): upcast first; the interpreter multiplies the raw
    bits of bfloat16 operands."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _chunk_program(k_ptr, v_ptr, H, CHUNK: tl.constexpr, stride_kb, stride_kh, stride_vb, stride_vh):
    """Program (chunk c, head bh) of a grid (chunks, B*H): (c, bh, first row, k and v bases)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    return (c, bh, c * CHUNK, k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh,
            v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh)


@triton.jit
def _pool_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, L, H, D] each
    qpool_ptr,  # [B*H, Qb, D] fp32: mean of q rows per query block
    ksum_ptr,  # [B*H, Kb, D] fp32: sum of k rows per key block
    vmax_ptr,  # [B*H, NC, D] fp32: max |v| per channel over the chunk
    kv_ptr,  # [B*H, NC, D, D] fp32: per-chunk φ(k)ᵀ v (LINEAR)
    ks_ptr,  # [B*H, NC, D] fp32: per-chunk Σ φ(k) (LINEAR)
    H, L, Qb, Kb, NC,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_D: tl.constexpr,
    POOL_Q: tl.constexpr, LINEAR: tl.constexpr, EXACT_FP8: tl.constexpr, STAGES: tl.constexpr,
    READ_V: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    row0 = c * CHUNK
    offs_d = tl.arange(0, HEAD_D)
    if POOL_Q:
        offs_q = tl.arange(0, BLOCK_Q)
        qbase = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
        nq = tl.minimum(CHUNK // BLOCK_Q, Qb - c * (CHUNK // BLOCK_Q))
        for i in tl.range(nq, num_stages=STAGES):
            rows = row0 + i * BLOCK_Q + offs_q
            x = tl.load(qbase + rows[:, None].to(tl.int64) * stride_ql + offs_d[None, :] * stride_qd,
                        mask=rows[:, None] < L, other=0.0).to(tl.float32)
            cnt = tl.minimum(L - (row0 + i * BLOCK_Q), BLOCK_Q).to(tl.float32)
            blk = c * (CHUNK // BLOCK_Q) + i
            tl.store(qpool_ptr + (bh * Qb + blk).to(tl.int64) * HEAD_D + offs_d, tl.sum(x, axis=0) / cnt)
    offs_k = tl.arange(0, BLOCK_K)
    kbase = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    vbase = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
    vmax = tl.zeros([HEAD_D], dtype=tl.float32)
    kv = tl.zeros([HEAD_D, HEAD_D], dtype=tl.float32)
    ks = tl.zeros([HEAD_D], dtype=tl.float32)
    nk = tl.minimum(CHUNK // BLOCK_K, Kb - c * (CHUNK // BLOCK_K))
    for j in tl.range(nk, num_stages=STAGES):
        rows = row0 + j * BLOCK_K + offs_k
        m = rows[:, None] < L
        kx = tl.load(kbase + rows[:, None].to(tl.int64) * stride_kl + offs_d[None, :] * stride_kd,
                     mask=m, other=0.0)
        x = kx.to(tl.float32)
        blk = c * (CHUNK // BLOCK_K) + j
        tl.store(ksum_ptr + (bh * Kb + blk).to(tl.int64) * HEAD_D + offs_d, tl.sum(x, axis=0))
        if READ_V:
            vx = tl.load(vbase + rows[:, None].to(tl.int64) * stride_vl + offs_d[None, :] * stride_vd,
                         mask=m, other=0.0)
            vmax = tl.maximum(vmax, tl.max(tl.abs(vx.to(tl.float32)), axis=0))
            if LINEAR:
                # φ(k) = softmax over the head dim; padded rows contribute nothing.
                phi = tl.where(m, feature_map(x, 1), 0.0)
                ks += tl.sum(phi, axis=0)
                kv = dot_acc(tl.trans(phi.to(vx.dtype)), vx, kv, EXACT_FP8)
    if READ_V:
        tl.store(vmax_ptr + (bh * NC + c).to(tl.int64) * HEAD_D + offs_d, vmax)
    if LINEAR:
        base = (bh * NC + c).to(tl.int64)
        tl.store(ks_ptr + base * HEAD_D + offs_d, ks)
        tl.store(kv_ptr + base * HEAD_D * HEAD_D + offs_d[:, None] * HEAD_D + offs_d[None, :], kv)


@triton.jit
def permute_keys(p):
    """Columns (keys) of p [M, N] (N a multiple of 32) in the FP8 V operand's key order: within
    every 32, key c = 16h + 8j + 2q + e (h, j, e in {0, 1}, q in 0..3) moves to column
    16h + 4q + 2j + e, a swap of index digits done by reshapes (no data-dependent addressing).
    Why: the FP8 V^T operand is stored in this key order (`prepare`, v_perm), and with it the P
    tile of an sm90 wgmma accumulator (thread q of a quad holds columns 8n + 2q + {0, 1}) is
    already the register A operand of the FP8 PV wgmma (thread q holds k = 4q + {0..3} and
    16 + 4q + {0..3}): no shuffles between the softmax and the PV product. Kernels that keep P
    in key order apply this to P."""
    M: tl.constexpr = p.shape[0]
    N: tl.constexpr = p.shape[1]
    x = tl.reshape(p, [M, N // 32, 2, 2, 4, 2])
    return tl.reshape(tl.permute(x, (0, 1, 2, 4, 3, 5)), [M, N])


@triton.jit
def _quant_kv_kernel(
    k_ptr, v_ptr,  # [B, L, H, D] each
    km_ptr,  # [B*H, D] fp32: mean_L(k)
    vscale_ptr,  # [B*H, D] fp32: per-channel V scale (QUANT == 1)
    kq_ptr,  # [B*H, Lpad, D] int8: quantized k - km
    kscale_ptr,  # [B*H, Kb] fp32
    vq_ptr,  # [B*H, D, Lpad] e4m3 (QUANT == 1) or fp16 (QUANT == 2), zero padded
    kv_ptr,  # [B*H, NC, D, D] fp32: per-chunk φ(k)ᵀ v
    ks_ptr,  # [B*H, NC, D] fp32: per-chunk Σ φ(k)
    H, L, Lpad, Kb, NC,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_D: tl.constexpr,
    QUANT: tl.constexpr, LINEAR: tl.constexpr, EXACT_FP8: tl.constexpr, STAGES: tl.constexpr,
    VPERM: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    c, bh, row0, kbase, vbase = _chunk_program(k_ptr, v_ptr, H, CHUNK, stride_kb, stride_kh, stride_vb, stride_vh)
    offs_d = tl.arange(0, HEAD_D)
    offs_k = tl.arange(0, BLOCK_K)
    if QUANT != 0:
        km = tl.load(km_ptr + bh * HEAD_D + offs_d)
    if QUANT == 1:
        inv_vs = 1.0 / tl.load(vscale_ptr + bh * HEAD_D + offs_d)
    kv = tl.zeros([HEAD_D, HEAD_D], dtype=tl.float32)
    ks = tl.zeros([HEAD_D], dtype=tl.float32)
    nk = tl.minimum(CHUNK // BLOCK_K, Kb - c * (CHUNK // BLOCK_K))
    for j in tl.range(nk, num_stages=STAGES):
        r0 = row0 + j * BLOCK_K
        rows = r0 + offs_k
        m = rows[:, None] < L
        kx = tl.load(kbase + rows[:, None].to(tl.int64) * stride_kl + offs_d[None, :] * stride_kd,
                     mask=m, other=0.0)
        vx = tl.load(vbase + rows[:, None].to(tl.int64) * stride_vl + offs_d[None, :] * stride_vd,
                     mask=m, other=0.0)
        kf = kx.to(tl.float32)
        if QUANT != 0:
            # INT8 K of the smoothed k, one scale per key block; padded rows quantize to 0.
            ksm = tl.where(m, kf - km[None, :], 0.0)
            scale = tl.max(tl.max(tl.abs(ksm), axis=1), axis=0) / 127.0 + 1e-7
            y = ksm * (1.0 / scale)  # one division per block, not per element
            y = y + tl.where(y >= 0, 0.5, -0.5)  # int cast truncates: round half away from zero
            blk = c * (CHUNK // BLOCK_K) + j
            tl.store(kq_ptr + (bh.to(tl.int64) * Lpad + rows[:, None]) * HEAD_D + offs_d[None, :], y.to(tl.int8))
            tl.store(kscale_ptr + bh * Kb + blk, scale)
            # V, D-major: element (d, row) at d * Lpad + row (K-major operand of the PV dot); with
            # VPERM (FP8) the rows of the block are first put in `permute_keys` order, in registers,
            # so that the stores stay contiguous.
            vptrs = vq_ptr + (bh.to(tl.int64) * HEAD_D + offs_d[None, :]) * Lpad + rows[:, None]
            if QUANT == 1:
                vs = vx.to(tl.float32) * inv_vs[None, :]
                if EXACT_FP8:
                    vs = round_e4m3(vs)
                vs = tl.minimum(tl.maximum(vs, -448.0), 448.0).to(tl.float8e4nv)
                if VPERM:
                    vs = tl.trans(permute_keys(tl.trans(vs)))
                tl.store(vptrs, vs)
            else:
                tl.store(vptrs, vx.to(tl.float16))
        if LINEAR:
            # φ(k) = softmax over the head dim; padded rows contribute nothing.
            phi = tl.where(m, feature_map(kf, 1), 0.0)
            ks += tl.sum(phi, axis=0)
            kv = dot_acc(tl.trans(phi.to(vx.dtype)), vx, kv, EXACT_FP8)
    if LINEAR:
        base = (bh * NC + c).to(tl.int64)
        tl.store(ks_ptr + base * HEAD_D + offs_d, ks)
        tl.store(kv_ptr + base * HEAD_D * HEAD_D + offs_d[:, None] * HEAD_D + offs_d[None, :], kv)


@triton.jit
def _topk_lut_kernel(
    s_ptr,  # [NR, Kb] fp32 block scores (NR = B*H*Qb rows)
    lut_ptr,  # [NR, T] int32 out: the T selected key blocks of each row, ascending
    NR, Kb, T,
    ROWS: tl.constexpr, KBP: tl.constexpr, PDL: tl.constexpr,
):
    """Exact top-T per row (`block_map.topk_select`), written as ascending column indices."""
    pdl_enter(PDL)
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, KBP)
    valid = (r[:, None] < NR) & (cols[None, :] < Kb)
    x = tl.load(s_ptr + r[:, None].to(tl.int64) * Kb + cols[None, :], mask=valid, other=0.0)
    sel, pos = topk_select(x, valid, r < NR, T, ROWS, KBP)
    colv = cols[None, :] + tl.zeros([ROWS, KBP], dtype=tl.int32)
    tl.store(lut_ptr + r[:, None].to(tl.int64) * T + pos, colv, mask=sel)


@triton.jit
def _key_means_kernel(
    qpool_ptr, kblk_ptr, vmax_ptr, km_ptr, vscale_ptr, scores_ptr,
    L, Qb, Kb, NC, block_k, eps,
    HEAD_D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
    SCORES: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
):
    """Between passes A and B, per head (program (i, bh)): the key mean km = Σ kblk / L, the V scale
    max_c vmax / 448 + eps (program i = 0 stores both), and with SCORES the block scores
    q̄ k̄ᵀ of query blocks i·BQ.. against every key block, k̄ = kblk / rows(block) - km computed on the
    fly (PREC 0 fp32, 1 TF32, 2 bf16 operands: see `block_scores`). One launch instead of about ten
    small torch ops and a cuBLAS bmm."""
    pdl_enter(PDL)
    i = tl.program_id(0)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_D)
    kbase = kblk_ptr + bh.to(tl.int64) * Kb * HEAD_D
    km = key_mean(kbase, Kb, L, HEAD_D, BK, STAGES)
    if i == 0:
        tl.store(km_ptr + bh * HEAD_D + offs_d, km)
        tl.store(vscale_ptr + bh * HEAD_D + offs_d, v_scale(vmax_ptr, bh, NC, eps, HEAD_D, BC))
    if SCORES:
        qrows = i * BQ + tl.arange(0, BQ)
        qmask = qrows < Qb
        qp = tl.load(qpool_ptr + (bh.to(tl.int64) * Qb + qrows)[:, None] * HEAD_D + offs_d[None, :],
                     mask=qmask[:, None], other=0.0)
        for j0 in range(0, Kb, BK):
            rows = j0 + tl.arange(0, BK)
            kmask = rows < Kb
            cnt = tl.where(rows == Kb - 1, L - (Kb - 1) * block_k, block_k).to(tl.float32)
            kb = tl.load(kbase + rows[:, None] * HEAD_D + offs_d[None, :], mask=kmask[:, None], other=0.0)
            kbar = kb / cnt[:, None] - km[None, :]
            if PREC == 2:  # bf16 operands (TurboDiffusion's rounding): exact products, fp32 sums
                sc = tl.dot(qp.to(tl.bfloat16).to(tl.float32), tl.trans(kbar.to(tl.bfloat16).to(tl.float32)),
                            input_precision="ieee")
            elif PREC == 1:
                sc = tl.dot(qp, tl.trans(kbar), input_precision="tf32")
            else:
                sc = tl.dot(qp, tl.trans(kbar), input_precision="ieee")
            tl.store(scores_ptr + (bh.to(tl.int64) * Qb + qrows)[:, None] * Kb + rows[None, :], sc,
                     mask=qmask[:, None] & kmask[None, :])


def key_means(qpool: torch.Tensor, kblk: torch.Tensor, vmax: torch.Tensor, L: int, block_k: int,
              scores: str | None, stages: int = 1, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor | None]:
    """(km [BH, D], vscale [BH, D], block scores [BH, Qb, Kb] or None) from pass A's outputs in one
    launch (`_key_means_kernel`); ``scores``: None (dense: no block map) or a `block_scores` precision;
    ``stages``: software-pipelining depth of the key-mean loop (1: none); ``pdl``: launch as a chained
    kernel (`pdl`)."""
    BH, Kb, D = kblk.shape
    NC = vmax.shape[1]
    dev = kblk.device
    km = torch.empty(BH, D, device=dev, dtype=torch.float32)
    vscale = torch.empty(BH, D, device=dev, dtype=torch.float32)
    prec = {None: 0, "fp32": 0, "tf32": 1, "bf16": 2}
    if scores not in prec:
        raise ValueError(f"scores precision {scores!r}; valid: 'fp32', 'tf32', 'bf16'")
    Qb = qpool.shape[1] if scores is not None else 1
    out = torch.empty(BH, Qb, Kb, device=dev, dtype=torch.float32) if scores is not None else km
    # TF32 runs on the tensor cores; the fp32 ("ieee") products are FMAs and need small tiles (sm90,
    # D = 128: 216 registers at 64 x 32 for TF32; at 64 x 32 the FMA product spilled 6.5 KB, at 32 x 16
    # 124 bytes)
    BQ, BK = (64, 32) if prec[scores] == 1 else (32, 16)
    grid = (triton.cdiv(Qb, BQ) if scores is not None else 1, BH)
    _key_means_kernel[grid](qpool if scores is not None else km, kblk, vmax, km, vscale, out, L, Qb, Kb, NC, block_k,
                            EPS_SCALE, HEAD_D=D, BQ=BQ, BK=BK, BC=16, SCORES=scores is not None,
                            PREC=prec[scores], STAGES=stages, PDL=pdl, num_warps=4, **pdl_launch_kwargs(pdl))
    return km, vscale, (out if scores is not None else None)


def topk_lut(scores: torch.Tensor, T: int, rows: int = 0, num_warps: int = 4, pdl: bool = False) -> torch.Tensor:
    """[..., Kb] fp32 scores -> [..., T] int32 ascending column indices of a top-T (Triton).
    rows: score rows per program (0: as many as fit 4096 lanes, at most 16); pdl: launch as a chained
    kernel (`pdl`)."""
    Kb = scores.shape[-1]
    s2 = scores.reshape(-1, Kb).contiguous()
    NR = s2.shape[0]
    lut = torch.empty(NR, T, device=scores.device, dtype=torch.int32)
    KBP = max(16, triton.next_power_of_2(Kb))
    ROWS = rows or max(1, min(16, 4096 // KBP))
    _topk_lut_kernel[(triton.cdiv(NR, ROWS),)](s2, lut, NR, Kb, T, ROWS=ROWS, KBP=KBP, PDL=pdl, num_warps=num_warps,
                                               **pdl_launch_kwargs(pdl))
    return lut.view(*scores.shape[:-1], T)


def block_scores(qpool: torch.Tensor, kbar: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Block scores q̄ k̄ᵀ [BH, Qb, Kb] in fp32 from fp32 pooled means. precision "fp32" (exact
    fp32 products), "tf32" (tensor-core TF32 on CUDA: 10-bit mantissas, still finer than
    TurboDiffusion's scores, which pool into the input dtype, bf16, before the product) or
    "bf16" (TurboDiffusion's rounding). Only near-ties can select differently."""
    if precision == "bf16":
        return torch.bmm(qpool.to(torch.bfloat16), kbar.to(torch.bfloat16).transpose(1, 2)).float()
    if precision == "tf32" and qpool.is_cuda:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return torch.bmm(qpool, kbar.transpose(1, 2))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    if precision not in ("fp32", "tf32"):
        raise ValueError(f"scores precision {precision!r}; valid: 'fp32', 'tf32', 'bf16'")
    return torch.bmm(qpool, kbar.transpose(1, 2))


def _chunk_rows(L: int, BH: int, blk: int, target_programs: int = 1024) -> int:
    per_head = max(1, target_programs // BH)
    rows = math.ceil(L / per_head)
    return max(blk, math.ceil(rows / blk) * blk)


# Tuning knobs (the benchmark sweeps them): programs per pass, warps per pass, where the linear
# statistics are computed ("a": pass A, so pass B is one key block per program; "b": pass B;
# "c": their own kernel, `_linear_stats_kernel`, with rows per step, warps, pipeline stages,
# programs and the transposed-k load of that kernel; lin_vmax: that kernel also takes the V
# channel maxima, so pass A reads only q and k), the block-score precision (see `block_scores`), and
# the top-k implementation ("triton" | "torch") with its rows per program and warps. Same sweep at
# B1 H40 L75600: TF32 block scores (the fp32 bmm took 0.22 ms; prep 3.13 -> 3.01 ms), one score row per top-k
# program 0.52 -> 0.41 ms (both: prep 2.92 ms); pass B without the statistics at 4 warps
# (warps_bq; 8 before) 0.80 -> 0.64 ms (prep 2.90 -> 2.76 ms). warps_b: pass B with them ("b").
# H200 session 5: pass A over 2048 programs with a 2-stage row loop: pool kernel 0.158 -> 0.100 ms at
# B1 H12 L32760 (Wan2.1-1.3B; prep 0.512 -> 0.454 ms) and 0.751 -> 0.696 ms at B1 H40 L75600.
# H200 session 4, B1 H40 L75600 (prep total): statistics kernel at 4 warps 0.75 ms (8 warps 1.35 ms;
# inside pass B they cost 1.2 ms of its 2.0 ms); the V maxima there slow it to 1.25 ms while pass A
# saves only 0.23 ms (3.41 vs 3.14 ms in all), so they stay in pass A (at 1.3B: 0.50 vs 0.55 ms).
# glue: key means, V scales and block scores in one kernel (`key_means`) instead of torch ops + bmm;
# km_stages: its key-mean loop software-pipelined. topk "fused": `block_map.block_map` instead of
# `key_means` + `topk_lut` (one launch; map_rows query blocks per program, map_warps, map_stages).
# pdl: the chain from the statistics kernel to the attention kernel launched with programmatic dependent
# launch (`pdl`; sm90+ CUDA only).
# H200 session 8: the statistics kernel accumulating vᵀφ(k) (lin_vt, vᵀ loaded as the dot's A tile)
# 0.154 -> 0.149 ms at 1.3B, 0.737 -> 0.700 ms at 14B, same kv; at 8 warps (no spills) 0.19 / 1.31 ms.
# H100 session 14 (statistics kernel alone): 528 programs 0.135 vs 0.153 ms (1024) at 1.3B, 0.669 vs 0.714 ms
# at 14B; 264 programs with 3 stages 0.120 at 1.3B but 0.84 at 14B. Fewer programs also leave fewer
# partials for `linear_fold` to sum. H200 session 14: Σφ(k) as 8 thread-local partial sums (lin_ks8; ncu had
# 40% of the stalls on the per-iteration cross-warp reduction) 0.135 -> 0.107 ms at 1.3B, 0.666 -> 0.465 ms at
# 14B (with 264 programs and 3 stages 0.087 / 0.608). H200 session 15: pass A's outputs inside the statistics
# kernel (lin_pool): prep 0.347 -> 0.294 ms at 1.3B, 2.334 -> 2.156 ms at 14B (32 rows per step: 0.309 / 2.107).
# H100 session 17: the Gluon statistics kernel (lin_gluon, ring depth lin_gstages) with pooling 0.173 -> 0.123 ms
# at 1.3B and 1.03 -> 0.855 ms at 14B; without pooling (the e2e path) 0.117 -> 0.085 and 0.571 -> 0.567 ms.
DEFAULT_TUNE = {"progs_a": 2048, "progs_b": 1024, "warps_a": 4, "warps_b": 8, "warps_bq": 4, "linear_in": "c", "topk": "triton",
                "stages_a": 2, "stages_b": 1, "progs_l": 528, "lin_block": 64, "lin_warps": 4, "lin_stages": 2,
                "lin_kt": 0, "lin_vt": 1, "lin_ks8": 1, "lin_vmax": 0, "lin_pool": 1, "scores": "tf32", "topk_rows": 1, "topk_warps": 4,
                "v_perm": 1, "glue": 1, "lin_gluon": 1, "lin_gstages": 3, "km_stages": 1, "map_rows": 16, "map_warps": 4,
                "map_stages": 2, "pdl": 0}


def prepare(q, k, v, topk: float, block_q: int, block_k: int, quant: str, linear: bool, tune=None, pooled=None,
            fold=None):
    """Run passes A and B. q, k, v [B, L, H, D]. Returns a dict of kernel operands.

    Keys: dense (every key block kept: no LUT), lut [B*H, Qb, T] int32 ascending (None when
    dense), T, kq, kscale, vq, vscale, v_perm (vq's keys in `permute_keys` order); with ``linear``
    kv_parts [B*H, NC, D, D] and ks_parts [B*H, NC, D], per-chunk partials of φ(k)ᵀv and Σφ(k).

    ``pooled``: (qpool [B*H, Qb, D] or None, kblk [B*H, Kb, D], vmax [B*H, NC, D]), fp32, pass A's
    outputs computed elsewhere (q means per query block, k sums per key block, |v| channel maxima
    over any NC >= 1 row chunks): pass A is not launched and these are used in its place (qpool may
    be None only when dense; the linear statistics kernel then leaves the V maxima alone). Not
    with ``linear_in="a"``, which computes the linear statistics inside pass A.

    ``fold``: (proj_weight, dtype) with ``linear``: proj_l is folded into the statistics as soon as they
    exist, on a side stream beside the rest of this preparation (`linear_fold.fold_linear_beside`);
    the result is ``folded`` = (proj_weight, kvw, ksum, event), which `launch_attn` uses.

    ``side_events``: events of work queued on side streams (`side_streams`; today the fold); a consumer's
    stream must wait on them (`side_streams.join`, as `launch_attn` does) before it reads ``folded``.
    """
    tn = dict(DEFAULT_TUNE, **(tune or {}))
    B, L, H, D = q.shape
    BH = B * H
    Qb, Kb = math.ceil(L / block_q), math.ceil(L / block_k)
    Lpad = Kb * block_k
    T = max(1, min(Kb, int(topk * Kb)))
    dense = T == Kb
    qnt = {"none": 0, "int8-fp8": 1, "int8-fp16": 2}[quant]
    if tn["linear_in"] not in ("a", "b", "c"):
        raise ValueError(f"linear_in={tn['linear_in']!r}; valid: 'a', 'b', 'c'")
    if tn["topk"] not in ("triton", "torch", "fused"):
        raise ValueError(f"topk={tn['topk']!r}; valid: 'triton', 'torch', 'fused'")
    if tn["topk"] == "fused" and (not tn["glue"] or tn["scores"] == "bf16"):
        raise ValueError("topk='fused' (`block_map`) is one kernel with scores centred on the first key block; "
                         "glue=0 and scores='bf16' (TurboDiffusion's km-centred rounding) need topk 'triton' or 'torch'")
    lin_a = linear and tn["linear_in"] == "a"
    lin_b = linear and tn["linear_in"] == "b"
    lin_c = linear and tn["linear_in"] == "c"
    vmax_in_c = lin_c and bool(tn["lin_vmax"])
    lb = tn["lin_block"]
    ks8 = bool(tn["lin_ks8"]) and bool(tn["lin_vt"]) and lb % 8 == 0
    # The statistics kernel also computes pass A's outputs (pass A is then not launched).
    pool_in_c = (lin_c and pooled is None and bool(tn["lin_pool"]) and ks8 and lb >= 16
                 and block_q % lb == 0 and block_k % lb == 0)
    dev = q.device
    f32 = torch.float32
    pdl = pdl_active(tn["pdl"], q)  # chained launches (`pdl`): each kernel's start overlaps the previous one's end
    if pool_in_c:  # outputs of pass A, filled by the statistics kernel below
        qpool = torch.empty(BH, Qb, D, device=dev, dtype=f32) if not dense else torch.empty(1, device=dev)
        kblk = torch.empty(BH, Kb, D, device=dev, dtype=f32)
        vmax_in_c = True
    elif pooled is not None:  # pass A's outputs were computed elsewhere (the q/k norm kernels)
        if lin_a:
            raise ValueError("linear_in='a' computes the linear statistics in pass A, which precomputed pooling "
                             "skips; valid with pooled: 'b', 'c'")
        qpool, kblk, vmax = pooled
        if qpool is None and not dense:
            raise ValueError("pooled: qpool is needed unless every key block is kept (dense)")
        qpool = qpool.contiguous() if not dense else torch.empty(1, device=dev)
        kblk, vmax = kblk.contiguous(), vmax.contiguous()
        vmax_in_c = False  # the V maxima are given
        kvp = ksp = vmax  # placeholders until the statistics kernel fills them (linear only)
    else:
        chunk = _chunk_rows(L, BH, max(block_q, block_k), tn["progs_a"])
        NC = math.ceil(L / chunk)
        qpool = torch.empty(BH, Qb, D, device=dev, dtype=f32) if not dense else torch.empty(1, device=dev)
        kblk = torch.empty(BH, Kb, D, device=dev, dtype=f32)
        vmax = torch.empty(BH, NC, D, device=dev, dtype=f32)
        kvp = torch.empty(BH, NC, D, D, device=dev, dtype=f32) if lin_a else vmax
        ksp = torch.empty(BH, NC, D, device=dev, dtype=f32) if lin_a else vmax
        _pool_kernel[(NC, BH)](
            q, k, v, qpool, kblk, vmax, kvp, ksp, H, L, Qb, Kb, NC,
            *q.stride(), *k.stride(), *v.stride(),
            CHUNK=chunk, BLOCK_Q=block_q, BLOCK_K=block_k, HEAD_D=D, POOL_Q=not dense,
            LINEAR=lin_a, EXACT_FP8=INTERPRET, STAGES=tn["stages_a"], READ_V=not vmax_in_c, num_warps=tn["warps_a"],
        )
    if lin_c:  # before pass B, which needs the V scales when the maxima come from here
        from . import gluon_stats  # it imports this module's helpers
        from .linear_stats import _linear_stats_kernel

        # Hopper: the Gluon kernel (TMA ring, one program per SM) where it covers the inputs, and the
        # V maxima come with the pooling or not at all (lin_vmax alone is a Triton-only ablation)
        use_gluon = (bool(tn["lin_gluon"]) and (pool_in_c or not vmax_in_c)
                     and gluon_stats.stats_supported(q, k, v, block_q, block_k))
        # with pass A's outputs here, chunks hold whole query and key blocks (block sizes: powers of two)
        if use_gluon:
            sms = gluon_stats.sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
            chunk_l = gluon_stats.chunk_rows(L, BH, max(gluon_stats.ROWS, block_q, block_k), sms)
        else:
            chunk_l = _chunk_rows(L, BH, max(lb, block_q, block_k) if pool_in_c else lb, tn["progs_l"])
        NCL = math.ceil(L / chunk_l)
        kvp = torch.empty(BH, NCL, D, D, device=dev, dtype=f32)
        ksp = torch.empty(BH, NCL, D, device=dev, dtype=f32)
        if vmax_in_c:
            vmax = torch.empty(BH, NCL, D, device=dev, dtype=f32)
        if use_gluon:
            unused = ksp  # POOL / POOL_Q off: the kernel never touches these arguments
            gluon_stats.launch_stats(q, k, v, kvp, ksp, vmax if pool_in_c else unused, qpool if pool_in_c else unused,
                                     kblk if pool_in_c else unused, chunk_l, Qb, Kb, block_q, block_k, pool_in_c,
                                     pool_in_c and not dense, tn["lin_gstages"], pdl)
        else:
            pool_args = {}
            if pool_in_c:
                pool_args = dict(q_ptr=q, qpool_ptr=qpool, kblk_ptr=kblk, Qb=Qb, Kb=Kb, stride_qb=q.stride(0),
                                 stride_ql=q.stride(1), stride_qh=q.stride(2), stride_qd=q.stride(3), POOL=True,
                                 POOL_Q=not dense, BLOCK_Q=block_q, BLOCK_K=block_k)
            _linear_stats_kernel[(NCL, BH)](
                k, v, kvp, ksp, vmax, H, L, NCL, *k.stride(), *v.stride(),
                CHUNK=chunk_l, BLOCK=lb, HEAD_D=D, KT=bool(tn["lin_kt"]), EXACT_FP8=INTERPRET,
                STAGES=tn["lin_stages"], VMAX=vmax_in_c, VT=bool(tn["lin_vt"]), KS8=ks8, num_warps=tn["lin_warps"],
                **pool_args,
            )
    folded = None
    if linear and fold is not None and lin_c:  # the fold overlaps the rest of the preparation
        folded = _fold_beside(kvp, ksp, fold)
    fused = tn["topk"] == "fused" and not dense
    if fused:  # key means, V scales, block scores and the top-k LUT in one launch
        km, vscale, lut = block_map(qpool, kblk, vmax, L, block_k, T, EPS_SCALE, tn["scores"], tn["map_rows"],
                                    tn["map_warps"], tn["map_stages"], pdl)
    elif tn["glue"]:  # key means, V scales and block scores in one kernel
        km, vscale, scores = key_means(qpool, kblk, vmax, L, block_k, None if dense else tn["scores"], tn["km_stages"],
                                       pdl)
    else:  # the same with torch ops (session-8 path, kept for the ablation benchmark)
        km = kblk.sum(1) / L  # [BH, D]
        scores = None
        if not dense:
            cnt = torch.full((Kb,), float(block_k), device=dev, dtype=f32)
            cnt[-1:].fill_(L - (Kb - 1) * block_k)  # no 0-dim setitem: H2D copy, not capturable
            kbar = kblk / cnt[:, None] - km[:, None, :]
            scores = block_scores(qpool, kbar, tn["scores"])  # [BH, Qb, Kb]
        vscale = vmax.amax(1) / FP8_MAX + EPS_SCALE  # [BH, D]
    if dense:
        lut = None  # the kernel iterates every key block directly
    elif fused:
        pass  # the LUT came with the key means
    elif tn["topk"] == "triton":
        lut = topk_lut(scores, T, tn["topk_rows"], tn["topk_warps"], pdl)
    else:
        idx = torch.topk(scores, T, dim=-1, sorted=False).indices
        lut = torch.sort(idx.to(torch.int32), dim=-1).values.contiguous()
    if qnt:
        kq = torch.empty(BH, Lpad, D, device=dev, dtype=torch.int8)
        kscale = torch.empty(BH, Kb, device=dev, dtype=f32)
        vq = torch.empty(BH, D, Lpad, device=dev, dtype=torch.float8_e4m3fn if qnt == 1 else torch.float16)
    else:
        kq = kscale = vq = vscale  # unused placeholders
    v_perm = qnt == 1 and block_k % 32 == 0 and bool(tn["v_perm"])  # FP8 V in `permute_keys` order
    if qnt or lin_b:
        chunk_b = block_k if not lin_b else _chunk_rows(L, BH, block_k, tn["progs_b"])
        NCB = math.ceil(L / chunk_b)
        if lin_b:
            kvp = torch.empty(BH, NCB, D, D, device=dev, dtype=f32)
            ksp = torch.empty(BH, NCB, D, device=dev, dtype=f32)
        _quant_kv_kernel[(NCB, BH)](
            k, v, km, vscale, kq, kscale, vq, kvp, ksp, H, L, Lpad, Kb, NCB,
            *k.stride(), *v.stride(),
            CHUNK=chunk_b, BLOCK_K=block_k, HEAD_D=D, QUANT=qnt, LINEAR=lin_b, EXACT_FP8=INTERPRET, STAGES=tn["stages_b"],
            VPERM=v_perm, PDL=pdl,
            num_warps=tn["warps_b"] if lin_b else tn["warps_bq"], **pdl_launch_kwargs(pdl),
        )
    out = {"lut": lut, "T": T, "Qb": Qb, "Kb": Kb, "Lpad": Lpad, "quant": qnt, "dense": dense,
           "kq": kq, "kscale": kscale, "vq": vq, "vscale": vscale, "v_perm": v_perm, "side_events": [], "pdl": pdl}
    if linear:  # summed (and proj_l folded in) by `linear_fold.fold_linear`; `linear_state` sums them alone
        out["kv_parts"], out["ks_parts"] = kvp, ksp
        if fold is not None:
            out["folded"] = folded if folded is not None else _fold_beside(kvp, ksp, fold)
            out["side_events"].append(out["folded"][3])
    return out


def _fold_beside(kvp, ksp, fold):
    from .linear_fold import fold_linear_beside  # linear_fold imports this module

    weight, dtype = fold
    return (weight, *fold_linear_beside({"kv_parts": kvp, "ks_parts": ksp}, weight, dtype))
