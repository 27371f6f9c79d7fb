"""SageSLA's block map in one launch: from pass A's outputs (q means per query block, k sums per key
block, |v| channel maxima per chunk) to the LUT of kept key blocks, plus what pass B needs (the key
mean km and the V scales).

`prepare` otherwise runs two kernels here: `_key_means_kernel` (km, V scales and the block scores,
each program first summing every k block of its head for km) and `_topk_lut_kernel` (one row per
program). Both are small and latency-bound: 0.018 and 0.022 ms at Wan-1.3B on an H100 (RESULTS.md,
session 17), next to about 0.23 ms of memory-bound passes. `_block_map_kernel` does the same work in
one grid:

  * the last program of each head computes km and the V scales (nobody else needs km here);
  * every other program scores ROWS query blocks against every key block and selects their top-T
    right away, from a scratch row it has just written (a CTA barrier orders the two).

The scores are centred on the first key block's mean instead of km. Subtracting any vector c from
every k̄_j changes the scores of query block i by the constant q̄_i·(km − c), so each row's ranking,
and with it the selection, is that of q̄·(k̄ − km) (up to rounding at near-ties, as with TF32). c only
has to be a typical block mean, so that the products are rounded relative to the spread of the block
means, as with km; and the scores no longer wait for km.

`prepare` uses it with ``tune={"topk": "fused"}``; it is not the default until a GPU run shows that it
pays (`benchmarks/probe_prep_chain.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_enter, pdl_launch_kwargs


@triton.jit
def topk_select(x, valid, row_ok, T, ROWS: tl.constexpr, KBP: tl.constexpr):
    """Exact top-T of each row of an fp32 [ROWS, KBP] tile (entries outside ``valid`` never kept; rows
    outside ``row_ok`` skipped): returns (sel, pos), the kept entries and their rank in ascending
    column order (0..T-1). A bisection for the T-th largest order-preserving int32 key, then a cumsum
    compaction; ties at the threshold go to the lowest columns (any choice is a valid top-T)."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 order == float order
    # Invariant: count(key >= lo) >= T > count(key >= hi); int64 bounds, int32 compares.
    # Stops early once every row has count(key >= lo) == T exactly (then key >= lo is the
    # selection; typically ~17 of the 32 steps for Wan-size rows).
    lo = tl.full([ROWS], -2147483648, dtype=tl.int64)
    hi = tl.full([ROWS], 2147483648, dtype=tl.int64)
    cnt_lo = tl.sum(valid.to(tl.int32), axis=1)
    cnt_lo = tl.where(row_ok, cnt_lo, T)  # rows past the end are done
    it = 0
    while (it < 32) & (tl.sum((cnt_lo != T).to(tl.int32), axis=0) > 0):
        mid = (lo + hi) >> 1
        cnt = tl.sum((valid & (key >= mid.to(tl.int32)[:, None])).to(tl.int32), axis=1)
        ok = cnt >= T
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
        cnt_lo = tl.where(ok, cnt, cnt_lo)
        it += 1
    thr = lo.to(tl.int32)[:, None]
    gt = valid & (key > thr)
    eq = valid & (key == thr)
    need = T - tl.sum(gt.to(tl.int32), axis=1)
    sel = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=1) <= need[:, None]))
    pos = tl.cumsum(sel.to(tl.int32), axis=1) - 1
    return sel, pos


@triton.jit
def key_mean(kbase, Kb, L, HEAD_D: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    """km [HEAD_D] = Σ of a head's Kb key-block sums (rows of HEAD_D at ``kbase``) / L; STAGES > 1
    software-pipelines the loads. The division is IEEE-rounded (`div_rn`; a compiled `/` is approximate to
    a few ulps), as are the fused block map's block means: blocks with equal means then tie exactly."""
    offs_d = tl.arange(0, HEAD_D)
    acc = tl.zeros([BK, HEAD_D], tl.float32)
    for j0 in tl.range(0, Kb, BK, num_stages=STAGES):
        rows = j0 + tl.arange(0, BK)
        acc += tl.load(kbase + rows[:, None] * HEAD_D + offs_d[None, :], mask=(rows < Kb)[:, None], other=0.0)
    return tl.math.div_rn(tl.sum(acc, axis=0), tl.zeros([HEAD_D], tl.float32) + L)


@triton.jit
def v_scale(vmax_ptr, bh, NC, eps, HEAD_D: tl.constexpr, BC: tl.constexpr):
    """Head bh's FP8 V scale [HEAD_D]: the max over its NC chunk maxima of |v| / 448 + eps."""
    offs_d = tl.arange(0, HEAD_D)
    vm = tl.zeros([BC, HEAD_D], tl.float32)  # maxima of |v| are >= 0
    for c0 in range(0, NC, BC):
        c = c0 + tl.arange(0, BC)
        vm = tl.maximum(vm, tl.load(vmax_ptr + (bh * NC + c)[:, None].to(tl.int64) * HEAD_D + offs_d[None, :],
                                    mask=(c < NC)[:, None], other=0.0))
    return tl.math.div_rn(tl.max(vm, axis=0), tl.full([HEAD_D], 448.0, tl.float32)) + eps


@triton.jit
def _block_map_kernel(
    qpool_ptr,  # [BH, Qb, D] fp32 q means per query block
    kblk_ptr,  # [BH, Kb, D] fp32 k sums per key block
    vmax_ptr,  # [BH, NC, D] fp32 |v| channel maxima per chunk
    km_ptr, vscale_ptr,  # [BH, D] fp32 out: key mean, V scale (max |v| / 448 + eps)
    scores_ptr,  # [BH, Qb, Kb] fp32 scratch: each program's score rows
    lut_ptr,  # [BH, Qb, T] int32 out: kept key blocks per query block, ascending
    L, Qb, Kb, NC, T, block_k, eps,
    HEAD_D: tl.constexpr, ROWS: tl.constexpr, TOPK_ROWS: tl.constexpr, BK: tl.constexpr, KBP: tl.constexpr,
    BC: tl.constexpr, TF32: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    i = tl.program_id(0)
    bh = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_D)
    kbase = kblk_ptr + bh.to(tl.int64) * Kb * HEAD_D
    if i == tl.num_programs(0) - 1:  # km and the V scale of head bh
        tl.store(km_ptr + bh * HEAD_D + offs_d, key_mean(kbase, Kb, L, HEAD_D, BK, STAGES))
        tl.store(vscale_ptr + bh * HEAD_D + offs_d, v_scale(vmax_ptr, bh, NC, eps, HEAD_D, BC))
    else:  # ROWS query blocks: scores against every key block, then their top-T
        qrows = i * ROWS + tl.arange(0, ROWS)
        qmask = qrows < Qb
        srow = (bh.to(tl.int64) * Qb + qrows) * Kb
        qp = tl.load(qpool_ptr + (bh.to(tl.int64) * Qb + qrows)[:, None] * HEAD_D + offs_d[None, :],
                     mask=qmask[:, None], other=0.0)
        # the first block's mean
        centre = tl.math.div_rn(tl.load(kbase + offs_d), tl.zeros([HEAD_D], tl.float32) + tl.minimum(L, block_k))
        for j0 in tl.range(0, Kb, BK, num_stages=STAGES):
            rows = j0 + tl.arange(0, BK)
            kmask = rows < Kb
            cnt = tl.where(rows == Kb - 1, L - (Kb - 1) * block_k, block_k).to(tl.float32)
            kb = tl.load(kbase + rows[:, None] * HEAD_D + offs_d[None, :], mask=kmask[:, None], other=0.0)
            kbar = tl.math.div_rn(kb, tl.broadcast_to(cnt[:, None], (BK, HEAD_D))) - centre[None, :]
            if TF32:
                sc = tl.dot(qp, tl.trans(kbar), input_precision="tf32")
            else:
                sc = tl.dot(qp, tl.trans(kbar), input_precision="ieee")
            tl.store(scores_ptr + srow[:, None] + rows[None, :], sc, mask=qmask[:, None] & kmask[None, :])
        tl.debug_barrier()  # the rows just written, by every thread of the program, are visible to all
        cols = tl.arange(0, KBP)
        for g in range(0, ROWS // TOPK_ROWS):  # TOPK_ROWS rows at a time: a bounded register tile
            r = i * ROWS + g * TOPK_ROWS + tl.arange(0, TOPK_ROWS)
            rok = r < Qb
            grow = bh.to(tl.int64) * Qb + r
            valid = rok[:, None] & (cols[None, :] < Kb)
            x = tl.load(scores_ptr + grow[:, None] * Kb + cols[None, :], mask=valid, other=0.0)
            sel, pos = topk_select(x, valid, rok, T, TOPK_ROWS, KBP)
            colv = cols[None, :] + tl.zeros([TOPK_ROWS, KBP], dtype=tl.int32)
            tl.store(lut_ptr + grow[:, None] * T + pos, colv, mask=sel)


def block_map(qpool: torch.Tensor, kblk: torch.Tensor, vmax: torch.Tensor, L: int, block_k: int, T: int,
              eps: float, precision: str = "tf32", rows: int = 16, num_warps: int = 4, stages: int = 2,
              pdl: bool = False):
    """(km [BH, D], vscale [BH, D], lut [BH, Qb, T] int32 ascending) from pass A's outputs in one
    launch (`_block_map_kernel`). ``precision``: the block scores' products, "fp32" or "tf32" (see
    `triton_prep.block_scores`; TurboDiffusion's "bf16" rounding needs the km-centred scores of
    `key_means`). ``rows``: query blocks per program, whose top-T is taken a few rows at a time (at
    most 4096 scores per step); ``stages``: software-pipelining depth of the loops over the key
    blocks; ``pdl``: launch as a chained kernel (`pdl`)."""
    if precision not in ("fp32", "tf32"):
        raise ValueError(f"block_map scores precision {precision!r}; valid: 'fp32', 'tf32'")
    BH, Kb, D = kblk.shape
    Qb, NC = qpool.shape[1], vmax.shape[1]
    dev = kblk.device
    km = torch.empty(BH, D, device=dev, dtype=torch.float32)
    vscale = torch.empty(BH, D, device=dev, dtype=torch.float32)
    scores = torch.empty(BH, Qb, Kb, device=dev, dtype=torch.float32)
    lut = torch.empty(BH, Qb, T, device=dev, dtype=torch.int32)
    rows = max(16, triton.next_power_of_2(rows))  # tl.dot needs at least 16 rows
    KBP = max(16, triton.next_power_of_2(Kb))
    BK = 32 if D <= 64 or precision == "tf32" else 16  # sm90: fp32 FMA products need small tiles
    grid = (triton.cdiv(Qb, rows) + 1, BH)
    _block_map_kernel[grid](qpool, kblk, vmax, km, vscale, scores, lut, L, Qb, Kb, NC, T, block_k, eps, HEAD_D=D,
                            ROWS=rows, TOPK_ROWS=max(1, min(rows, 4096 // KBP)), BK=BK, KBP=KBP, BC=16,
                            TF32=precision == "tf32", STAGES=stages, PDL=pdl, num_warps=num_warps,
                            **pdl_launch_kwargs(pdl))
    return km, vscale, lut
