"""The linear branch's statistics, φ(k)ᵀv and Σφ(k) per chunk of rows (`prepare`'s ``linear_in="c"``, the
default), in one pipelined kernel that keeps only the [D, D] accumulator live.

Also, by default (``lin_pool``), pass A's outputs: the q means per query block, the k sums per key block and
the |v| channel maxima, so that q, k and v are read once for both. `linear_fold` then sums the partials and
folds proj_l in.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_prep import _chunk_program, dot_acc, feature_map


@triton.jit
def col_sums(sel, x, acc, F32: tl.constexpr):
    """acc + sel @ x on the tensor cores, sel a 0/1 tile: exact products, fp32 sums. F32 (interpreter
    only): upcast first and multiply in ieee fp32 (the interpreter's default rounds to tf32)."""
    if F32:
        return tl.dot(sel.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(sel.to(x.dtype), x, acc)


@triton.jit
def _linear_stats_kernel(
    k_ptr, v_ptr,  # [B, L, H, D] each
    kv_ptr,  # [B*H, NC, D, D] fp32: per-chunk φ(k)ᵀ v
    ks_ptr,  # [B*H, NC, D] fp32: per-chunk Σ φ(k)
    vmax_ptr,  # [B*H, NC, D] fp32: per-chunk max |v| per channel (VMAX)
    H, L, NC,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, HEAD_D: tl.constexpr, KT: tl.constexpr,
    EXACT_FP8: tl.constexpr, STAGES: tl.constexpr, VMAX: tl.constexpr, VT: tl.constexpr = False,
    KS8: tl.constexpr = False,
    # POOL (VT and KS8 only): pass A's outputs too, so that pass A is not launched
    q_ptr=None, qpool_ptr=None, kblk_ptr=None, Qb=1, Kb=1,
    stride_qb=0, stride_ql=0, stride_qh=0, stride_qd=0,
    POOL: tl.constexpr = False, POOL_Q: tl.constexpr = False, BLOCK_Q: tl.constexpr = 64,
    BLOCK_K: tl.constexpr = 128,
):
    """The linear branch's statistics alone (`linear_in="c"`): a pipelined loop over the rows
    of one chunk that keeps only the [D, D] accumulator live, so the quantization pass stays
    register-light. KT: load k as a [D, BLOCK] tile (φ over axis 0) so φ(k)ᵀ is the dot's A
    operand as computed, with no register transpose. VMAX: also the V channel maxima (for the
    FP8 V scales), so pass A need not read v at all. VT: accumulate the transpose, vᵀφ(k), with
    vᵀ loaded as a [D, BLOCK] tile (the dot's A operand straight from the pipelined load, no
    register transpose) and φ(k) computed row-wise as the B operand; stored transposed back (VT
    takes precedence over KT). KS8 (VT only): Σφ(k) accumulated as 8 row-interleaved partial sums
    ([8, D]: rows 8a + b add into partial b, thread-local in the blocked row layouts) and reduced
    across warps once at the end, instead of a cross-warp reduction in every iteration.
    POOL (VT, KS8; CHUNK a multiple of BLOCK_Q and BLOCK_K, both multiples of BLOCK): also pass A's
    outputs, the k sums per key block, the q means per query block (POOL_Q) and the V maxima (VMAX, as
    8 row-interleaved partial maxima), so pass A is not launched and q, k, v are read once here. The
    block sums are column sums on the tensor cores (a ones row times the tile: exact products, fp32
    sums), which keeps the per-step cross-warp reductions out of the loop."""
    c, bh, row0, kbase, vbase = _chunk_program(k_ptr, v_ptr, H, CHUNK, stride_kb, stride_kh, stride_vb, stride_vh)
    offs_d = tl.arange(0, HEAD_D)
    offs_r = tl.arange(0, BLOCK)
    kv = tl.zeros([HEAD_D, HEAD_D], dtype=tl.float32)
    ks = tl.zeros([HEAD_D], dtype=tl.float32)
    ks8 = tl.zeros([8, HEAD_D], dtype=tl.float32)
    vmax = tl.zeros([HEAD_D], dtype=tl.float32)
    vmax8 = tl.zeros([HEAD_D, 8], dtype=tl.float32)  # maxima of |v| are >= 0
    # POOL: a [16, BLOCK] tile whose first row is ones (the dot's smallest M); its products are column sums
    sel = (tl.arange(0, 16)[:, None] == 0) & (offs_r[None, :] >= 0)
    ksum = tl.zeros([16, HEAD_D], dtype=tl.float32)
    qsum = tl.zeros([16, HEAD_D], dtype=tl.float32)
    if POOL_Q:
        qbase = q_ptr + (bh // H).to(tl.int64) * stride_qb + (bh % H) * stride_qh
    nt = tl.cdiv(tl.minimum(L - row0, CHUNK), BLOCK)
    for j in tl.range(nt, num_stages=STAGES):
        rows = row0 + j * BLOCK + offs_r
        ok = rows < L
        if VT:
            vxt = tl.load(vbase + rows[None, :].to(tl.int64) * stride_vl + offs_d[:, None] * stride_vd,
                          mask=ok[None, :], other=0.0)  # [D, BLOCK]
            if VMAX:
                if POOL:  # rows 8a + b into partial b: thread-local in the [D, BLOCK] load layout
                    vmax8 = tl.maximum(vmax8, tl.max(tl.reshape(tl.abs(vxt.to(tl.float32)), [HEAD_D, BLOCK // 8, 8]),
                                                     axis=1))
                else:
                    vmax = tl.maximum(vmax, tl.max(tl.abs(vxt.to(tl.float32)), axis=1))
            kx = tl.load(kbase + rows[:, None].to(tl.int64) * stride_kl + offs_d[None, :] * stride_kd,
                         mask=ok[:, None], other=0.0)
            if POOL:
                r0 = row0 + j * BLOCK  # first row of this step; blocks end where the next step starts a block
                last = (j == nt - 1)
                ksum = col_sums(sel, kx, ksum, EXACT_FP8)
                if ((r0 + BLOCK) % BLOCK_K == 0) | last:
                    tl.store(kblk_ptr + (bh * Kb + r0 // BLOCK_K).to(tl.int64) * HEAD_D + offs_d, tl.sum(ksum, axis=0))
                    ksum = tl.zeros([16, HEAD_D], dtype=tl.float32)
                if POOL_Q:
                    qx = tl.load(qbase + rows[:, None].to(tl.int64) * stride_ql + offs_d[None, :] * stride_qd,
                                 mask=ok[:, None], other=0.0)
                    qsum = col_sums(sel, qx, qsum, EXACT_FP8)
                    if ((r0 + BLOCK) % BLOCK_Q == 0) | last:
                        qb0 = r0 // BLOCK_Q * BLOCK_Q
                        cnt = tl.minimum(L - qb0, BLOCK_Q).to(tl.float32)
                        tl.store(qpool_ptr + (bh * Qb + r0 // BLOCK_Q).to(tl.int64) * HEAD_D + offs_d,
                                 tl.sum(qsum, axis=0) / cnt)
                        qsum = tl.zeros([16, HEAD_D], dtype=tl.float32)
            phi = tl.where(ok[:, None], feature_map(kx.to(tl.float32), 1), 0.0)  # [BLOCK, D]
            if KS8:
                ks8 += tl.sum(tl.reshape(phi, [BLOCK // 8, 8, HEAD_D]), axis=0)
            else:
                ks += tl.sum(phi, axis=0)
            kv = dot_acc(vxt, phi.to(vxt.dtype), kv, EXACT_FP8)  # kv[dv, dk]
        else:
            vx = tl.load(vbase + rows[:, None].to(tl.int64) * stride_vl + offs_d[None, :] * stride_vd,
                         mask=ok[:, None], other=0.0)
            if VMAX:
                vmax = tl.maximum(vmax, tl.max(tl.abs(vx.to(tl.float32)), axis=0))
            if KT:
                kx = tl.load(kbase + rows[None, :].to(tl.int64) * stride_kl + offs_d[:, None] * stride_kd,
                             mask=ok[None, :], other=0.0)
                phit = tl.where(ok[None, :], feature_map(kx.to(tl.float32), 0), 0.0)  # [D, BLOCK]
                ks += tl.sum(phit, axis=1)
                kv = dot_acc(phit.to(vx.dtype), vx, kv, EXACT_FP8)
            else:
                kx = tl.load(kbase + rows[:, None].to(tl.int64) * stride_kl + offs_d[None, :] * stride_kd,
                             mask=ok[:, None], other=0.0)
                phi = tl.where(ok[:, None], feature_map(kx.to(tl.float32), 1), 0.0)  # [BLOCK, D]
                ks += tl.sum(phi, axis=0)
                kv = dot_acc(tl.trans(phi.to(vx.dtype)), vx, kv, EXACT_FP8)
    base = (bh * NC + c).to(tl.int64)
    if KS8:
        ks = tl.sum(ks8, axis=0)
    tl.store(ks_ptr + base * HEAD_D + offs_d, ks)
    if VT:  # kv holds the transpose: kv[dv, dk] goes to (dk, dv)
        tl.store(kv_ptr + base * HEAD_D * HEAD_D + offs_d[None, :] * HEAD_D + offs_d[:, None], kv)
    else:
        tl.store(kv_ptr + base * HEAD_D * HEAD_D + offs_d[:, None] * HEAD_D + offs_d[None, :], kv)
    if VMAX:
        if POOL:
            vmax = tl.max(vmax8, axis=1)
        tl.store(vmax_ptr + base * HEAD_D + offs_d, vmax)
