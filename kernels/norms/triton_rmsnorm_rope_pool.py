"""Triton kernel: q/k RMSNorm + interleaved RoPE that also pools its own output per head and block.

SageSLA's block map needs, per (batch·head, block of rows), the mean of q rows (query blocks), the
sum of k rows (key blocks) and the |v| channel maxima (the FP8 V scales). Pass A of its prep
(`kernels/sagesla/triton_prep._pool_kernel`) re-reads q, k and v for them; here the q and k
RMSNorm+RoPE kernels, which read z and write exactly those rows, accumulate them on the way
(and the k kernel also reads v's rows of the same block), so pass A disappears.

Layout and math per row are `triton_rmsnorm_rope._rmsnorm_rope_pairs_kernel`'s: the row is read
as pair-words (elements 2w and 2w+1 of a row live in word w: int32 for 16-bit dtypes, int64 for
fp32), in the same one or two column tiles, normalized, weighted, rotated and stored with the same
operations. Only the fp32 sum of squares of a row may be reduced in another order on the GPU (its
register layout follows the warps per row and the pipelined loads): on the H200 (session 12,
`benchmarks/probe_attn_pooling.py`) ``out`` was bit-identical to `rmsnorm_rope_triton`'s at Wan-1.3B
(2 warps, the default) but not at Wan-14B (no launch config was; the SageSLA output computed from
either was still bit-identical there). On the CPU interpreter it is bit-identical.

Grid (blocks, B): one program per block of ``pool_rows`` consecutive tokens of one batch element
(blocks never straddle batch elements; the last one of each element may be partial). It loops over
the block in sub-tiles of SUB rows (a pipelined ``tl.range``), keeps fp32 column sums of the
*stored* (rounded to z.dtype) values (and the |v| maxima) in registers, one accumulator per
even/odd lane set of each column tile, and writes the pooled rows once at the end. Pair-word w
holds channels 2w, 2w+1, both in head h = 2w // head_dim (head_dim is even), at in-head index
2w % head_dim (and + 1): the pooled row of (b, h, block j) starts at ((b·H + h)·NBLK + j)·head_dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbocompile.kernels.norms._launch import row_config, split_tiles
from turbocompile.kernels.norms.triton_rmsnorm_rope import _TL, _pack, _unpack, _words
from turbocompile.kernels.norms.triton_rounding import rnd

__all__ = ["rmsnorm_rope_pool_triton", "pool_config"]


@triton.jit
def _pool_tile(w_ptr, cos_ptr, sin_ptr, out_ptr, v_ptr, zw, rstd, li, out_rows, voff, row_mask, pairs,
               acc_a, acc_b, vm_a, vm_b, stride_cl, NP,
               DT: tl.constexpr, WDT: tl.constexpr, VDT: tl.constexpr, HALF: tl.constexpr,
               HAS_ROPE: tl.constexpr, ROUND_AFTER_W: tl.constexpr, NATIVE: tl.constexpr, HAS_V: tl.constexpr):
    """One [SUB, tile] of pair-words: normalize, weight, rotate and store exactly as `_rms_tile`
    does, then add the stored values of the valid rows to the column sums (acc_a: even channels,
    acc_b: odd) and, with HAS_V, fold the |v| of the same words into vm_a / vm_b."""
    pmask = pairs < NP
    mask = row_mask[:, None] & pmask[None, :]
    a, b = _unpack(zw, DT)
    wa, wb = _unpack(tl.load(w_ptr + pairs, mask=pmask, other=0), WDT)
    a = rnd(a * rstd[:, None], DT, NATIVE) * wa[None, :]
    b = rnd(b * rstd[:, None], DT, NATIVE) * wb[None, :]
    if ROUND_AFTER_W:
        a = rnd(a, DT, NATIVE)
        b = rnd(b, DT, NATIVE)
    if HAS_ROPE:
        t_off = li[:, None] * stride_cl + (pairs % HALF)[None, :]  # HALF is a power of two: an AND
        c = tl.load(cos_ptr + t_off, mask=mask, other=0.0)
        s = tl.load(sin_ptr + t_off, mask=mask, other=0.0)
        a, b = a * c - b * s, a * s + b * c
    word = _pack(a, b, DT, NATIVE)
    tl.store(out_ptr + out_rows[:, None] * NP + pairs[None, :], word, mask=mask)
    # Pool the stored bits themselves (unpacking the word is exact), not the fp32 values before the
    # rounding. Rows past L are excluded explicitly (with eps = 0 they would be 0·inf = NaN).
    sa, sb = _unpack(word, DT)
    acc_a += tl.sum(tl.where(row_mask[:, None], sa, 0.0), axis=0)
    acc_b += tl.sum(tl.where(row_mask[:, None], sb, 0.0), axis=0)
    if HAS_V:
        va, vb = _unpack(tl.load(v_ptr + voff + pairs[None, :], mask=mask, other=0), VDT)  # masked: 0
        vm_a = tl.maximum(vm_a, tl.max(tl.abs(va), axis=0))
        vm_b = tl.maximum(vm_b, tl.max(tl.abs(vb), axis=0))
    return acc_a, acc_b, vm_a, vm_b


@triton.jit
def _store_pooled(ptr, acc_a, acc_b, scale, j, bi, H, NBLK, D, C0: tl.constexpr, BLOCK_P: tl.constexpr,
                  HEAD_D: tl.constexpr):
    """Store the (even, odd) column accumulators of the tile whose first channel is C0 (times
    ``scale``) into the pooled rows [B*H, NBLK, HEAD_D]: channel c goes to head c // HEAD_D."""
    vals = tl.reshape(tl.join(acc_a, acc_b), [2 * BLOCK_P]) * scale  # element 2w + lane: channel order
    ch = C0 + tl.arange(0, 2 * BLOCK_P)
    row = (bi * H + ch // HEAD_D).to(tl.int64) * NBLK + j
    tl.store(ptr + row * HEAD_D + ch % HEAD_D, vals, mask=ch < D)


@triton.jit
def _rmsnorm_rope_pool_kernel(
    z_ptr, w_ptr, cos_ptr, sin_ptr, v_ptr,  # z, w, v (and out) viewed as pair-words; cos/sin [L, HALF] fp32
    out_ptr,  # [B*L, NP] words, contiguous
    pool_ptr,  # [B*H, NBLK, HEAD_D] fp32: per-block sums (MEAN: means) of the stored out values
    vmax_ptr,  # [B*H, NBLK, HEAD_D] fp32: per-block max |v| per channel (HAS_V)
    L, NP, D, H, NBLK, eps,  # NP = D / 2 words per row
    stride_zb, stride_zl, stride_vb, stride_vl, stride_cl,  # z, v strides in words
    DT: tl.constexpr, WDT: tl.constexpr, VDT: tl.constexpr, HALF: tl.constexpr, HEAD_D: tl.constexpr,
    HAS_ROPE: tl.constexpr, ROUND_AFTER_W: tl.constexpr, HAS_V: tl.constexpr, MEAN: tl.constexpr,
    POOL: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_P2: tl.constexpr,
    NATIVE: tl.constexpr, STAGES: tl.constexpr,
):
    j = tl.program_id(0)  # block of POOL rows within the batch element
    bi = tl.program_id(1)  # batch element
    row0 = j * POOL
    n = tl.minimum(L - row0, POOL)  # rows of this block (the last one may be partial)
    zb = z_ptr + bi.to(tl.int64) * stride_zb
    vb = v_ptr + bi.to(tl.int64) * stride_vb
    offs = tl.arange(0, SUB)
    p1 = tl.arange(0, BLOCK_P)
    acc1a = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc1b = tl.zeros([BLOCK_P], dtype=tl.float32)
    vm1a = tl.zeros([BLOCK_P], dtype=tl.float32)  # |v| >= 0: 0 is the identity of the max
    vm1b = tl.zeros([BLOCK_P], dtype=tl.float32)
    if BLOCK_P2 > 0:
        p2 = BLOCK_P + tl.arange(0, BLOCK_P2)
        acc2a = tl.zeros([BLOCK_P2], dtype=tl.float32)
        acc2b = tl.zeros([BLOCK_P2], dtype=tl.float32)
        vm2a = tl.zeros([BLOCK_P2], dtype=tl.float32)
        vm2b = tl.zeros([BLOCK_P2], dtype=tl.float32)
    for i in tl.range(0, tl.cdiv(n, SUB), num_stages=STAGES):
        li = row0 + i * SUB + offs  # SUB divides POOL: a sub-tile never crosses into the next block
        row_mask = li < L
        li64 = li.to(tl.int64)
        zoff = (li64 * stride_zl)[:, None]
        voff = (li64 * stride_vl)[:, None]
        out_rows = bi.to(tl.int64) * L + li64
        # the row's sum of squares over both tiles, as the plain kernel takes it
        z1 = tl.load(zb + zoff + p1[None, :], mask=row_mask[:, None] & (p1 < NP)[None, :], other=0)
        a, b = _unpack(z1, DT)
        ss = tl.sum(a * a + b * b, axis=1)
        if BLOCK_P2 > 0:
            z2 = tl.load(zb + zoff + p2[None, :], mask=row_mask[:, None] & (p2 < NP)[None, :], other=0)
            a2, b2 = _unpack(z2, DT)
            ss += tl.sum(a2 * a2 + b2 * b2, axis=1)
        rstd = tl.rsqrt(ss / D + eps)
        acc1a, acc1b, vm1a, vm1b = _pool_tile(
            w_ptr, cos_ptr, sin_ptr, out_ptr, vb, z1, rstd, li64, out_rows, voff, row_mask, p1,
            acc1a, acc1b, vm1a, vm1b, stride_cl, NP, DT, WDT, VDT, HALF, HAS_ROPE, ROUND_AFTER_W, NATIVE, HAS_V)
        if BLOCK_P2 > 0:
            acc2a, acc2b, vm2a, vm2b = _pool_tile(
                w_ptr, cos_ptr, sin_ptr, out_ptr, vb, z2, rstd, li64, out_rows, voff, row_mask, p2,
                acc2a, acc2b, vm2a, vm2b, stride_cl, NP, DT, WDT, VDT, HALF, HAS_ROPE, ROUND_AFTER_W, NATIVE, HAS_V)
    if MEAN:
        scale = 1.0 / n.to(tl.float32)
    else:
        scale = 1.0
    _store_pooled(pool_ptr, acc1a, acc1b, scale, j, bi, H, NBLK, D, 0, BLOCK_P, HEAD_D)
    if BLOCK_P2 > 0:
        _store_pooled(pool_ptr, acc2a, acc2b, scale, j, bi, H, NBLK, D, 2 * BLOCK_P, BLOCK_P2, HEAD_D)
    if HAS_V:
        _store_pooled(vmax_ptr, vm1a, vm1b, 1.0, j, bi, H, NBLK, D, 0, BLOCK_P, HEAD_D)
        if BLOCK_P2 > 0:
            _store_pooled(vmax_ptr, vm2a, vm2b, 1.0, j, bi, H, NBLK, D, 2 * BLOCK_P, BLOCK_P2, HEAD_D)


def pool_config(NP: int, pool_rows: int, override: dict | None = None) -> dict:
    """Launch configuration for rows of NP pair-words pooled in blocks of ``pool_rows``.

    Keys: ``sub`` (rows per loop step, a power of two dividing pool_rows), ``num_warps``,
    ``stages`` (num_stages of the row loop), ``split`` (two column tiles, as the plain kernel).
    Defaults: the plain kernel's warps per row (`row_config(NP, "rms")`) and its rows per program
    (at most 16) as ``sub`` for narrow rows; wide rows (one row per program there) step 2 rows at a
    time, with 3 pipeline stages. H200 session 12 sweep (`benchmarks/probe_attn_pooling.py`, q + k
    with v): Wan-1.3B (768 words, 2 warps) sub 2 / 3 stages 0.168 ms vs 0.237 ms with 2 stages and
    0.153 ms for the plain kernels; Wan-14B (2560 words, 4 warps) 1.250 vs 1.276 ms. The grid has
    one program per block of rows (a few hundred at 1.3B), so deeper pipelining, not more programs,
    keeps enough loads in flight.
    ``override`` (benchmarks, tests) replaces any key; these are the GPU tuning knobs."""
    rc = row_config(NP, "rms")
    cfg = {"sub": min(rc["block_m"], 16) if rc["block_m"] > 1 else 2, "num_warps": rc["num_warps"], "stages": 3,
           "split": rc["split"]}
    if override:
        unknown = sorted(set(override) - set(cfg))
        if unknown:
            raise ValueError(f"pool config: unknown key {unknown[0]!r}; valid: {', '.join(sorted(cfg))}")
        cfg.update(override)
    sub = int(cfg["sub"])
    if sub < 1 or sub & (sub - 1):
        raise ValueError(f"pool config: sub={sub} must be a power of two >= 1")
    while pool_rows % sub:  # a sub-tile must not cross a block boundary
        sub //= 2
    cfg["sub"] = sub
    return cfg


def rmsnorm_rope_pool_triton(z, weight, cos, sin, num_heads, eps, pool_rows, mean, v=None, config=None):
    """RMSNorm(z)·w (+ interleaved RoPE) for z [B, L, D] (rows may be strided), pooled per head.

    Returns ``(out, pooled, vmax)``: ``out`` [B, L, D] contiguous in z.dtype, the same values as
    `rmsnorm_rope_triton`; ``pooled`` [B*H, ceil(L/pool_rows), D/H] fp32, per head and block of
    ``pool_rows`` tokens of one batch element, the sum (``mean`` False) or the mean over the
    block's actual rows (``mean`` True) of the stored ``out`` values; ``vmax`` the same shape, the
    max |v| per channel per block of v [B, L, D] (any row strides), or None without v.

    Only the pair-word layout is supported (even head dim; z, w and v viewable as words; with RoPE
    a power-of-two d/2); anything else is a ValueError. ``config`` overrides :func:`pool_config`.
    """
    if z.dim() != 3:
        raise ValueError(f"z must be [B, L, D], got shape {tuple(z.shape)}")
    if z.dtype not in _TL:
        raise ValueError(f"z dtype {z.dtype} not supported (float32, bfloat16, float16)")
    B, L, D = z.shape
    if num_heads <= 0 or D % num_heads or (D // num_heads) % 2:
        raise ValueError(f"D={D} must split into num_heads={num_heads} heads of even size")
    if pool_rows < 1:
        raise ValueError(f"pool_rows must be >= 1, got {pool_rows}")
    if v is not None and (v.shape != z.shape or v.dtype not in _TL):
        raise ValueError(f"v must be [B, L, D] = {tuple(z.shape)} float32/bfloat16/float16, got "
                         f"{tuple(v.shape)} {v.dtype}")
    hd = D // num_heads
    half = hd // 2
    if cos is not None and half & (half - 1):
        raise ValueError(f"head dim {hd}: the pooling kernel needs a power-of-two d/2 with RoPE")
    if z.stride(2) != 1:
        z = z.contiguous()
    if v is not None and v.stride(2) != 1:
        v = v.contiguous()
    w = weight.contiguous()
    nblk = -(-L // pool_rows)
    dev = z.device
    out = torch.empty(B, L, D, device=dev, dtype=z.dtype)
    pooled = torch.empty(B * num_heads, nblk, hd, device=dev, dtype=torch.float32)
    vmax = torch.empty(B * num_heads, nblk, hd, device=dev, dtype=torch.float32) if v is not None else None
    if B * L == 0:
        return out, pooled, vmax
    zw, ww, ow = _words(z), _words(w), _words(out)
    vw = _words(v) if v is not None else None
    if zw is None or ww is None or ow is None or (v is not None and vw is None):
        raise ValueError("the pooling kernel reads z, weight and v as pair-words: their strides and offsets "
                         "must be even (in elements)")
    if cos is not None:
        c = cos.reshape(L, half).float().contiguous()
        s = sin.reshape(L, half).float().contiguous()
    else:
        c = s = w  # never dereferenced
    NP = D // 2
    cfg = pool_config(NP, pool_rows, config)
    if cfg["split"]:
        bp, bp2 = split_tiles(NP)
    else:
        bp, bp2 = max(16, triton.next_power_of_2(NP)), 0
    vw_ = vw if vw is not None else zw
    _rmsnorm_rope_pool_kernel[(nblk, B)](
        zw, ww, c, s, vw_, ow, pooled, vmax if vmax is not None else pooled,
        L, NP, D, num_heads, nblk, float(eps),
        zw.stride(0), zw.stride(1), vw_.stride(0), vw_.stride(1), half,
        DT=_TL[z.dtype], WDT=_TL[w.dtype], VDT=_TL[(v if v is not None else z).dtype],
        HALF=half if cos is not None else 1, HEAD_D=hd,
        HAS_ROPE=cos is not None, ROUND_AFTER_W=(w.dtype != torch.float32), HAS_V=v is not None, MEAN=bool(mean),
        POOL=pool_rows, SUB=cfg["sub"], BLOCK_P=bp, BLOCK_P2=bp2, NATIVE=dev.type == "cuda", STAGES=cfg["stages"],
        num_warps=cfg["num_warps"])
    return out, pooled, vmax
