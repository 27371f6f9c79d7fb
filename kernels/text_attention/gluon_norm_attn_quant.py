"""Wan's fused cross-attention (q RMSNorm -> attention over the text keys -> FP8 codes) for Hopper, in Gluon.

Same contract and arithmetic as `triton_norm_attn_quant._attn_quant_kernel` (the rstd pass or the q GEMM's
granule sums give each row's RMSNorm statistic; the merged key tail; codes at the sample's bound), except that
the output rows are scaled by one reciprocal of the softmax sum per row instead of a division per element (the
codes may then differ from the Triton kernel's in rare last-bit roundings). What this kernel changes is the
schedule, for a problem whose work per tile is small (a 64 × d query tile meets one or two 64-key blocks when
the prompt's padding is merged), so that latency and instruction count, not bytes, set its time:

* persistent: ``P`` programs (two per SM) each take a contiguous run of (batch·head, 64-row) tiles, ordered
  head-major, so a program stays on one head for many tiles;
* the query tile arrives by TMA into a two-slot shared-memory ring, the next tile's copy issued as soon as
  the current one is in registers: the HBM read of tile k + 1 runs under tile k's products;
* the head's key/value blocks sit in NRES shared-memory slots: when the head has at most NRES blocks (a
  merged short prompt) they are loaded once per head, not once per tile; otherwise they stream through the
  same slots, NRES blocks ahead;
* q·Kᵀ and P·V are bf16/fp16 wgmmas with the normalized q and P as register A operands (P goes from the
  score accumulator to the A layout in registers: 16-bit operands need no shuffle);
* the codes leave through a coalescing layout conversion (16-byte stores instead of 2-byte ones);
* per-head scalars (tail start, bound) are loaded when the head changes and each tile's row statistics one tile
  ahead; the tail bias and the dead-key mask touch only the last key block (the loop is peeled); block 0 starts
  the accumulator.

Per tile (rows r of sample b, head h; the Triton kernel's NATIVE expressions)::

    qn = round(round(z · rstd) · w)            o = round(softmax(qn · Kᵀ / √d [+ tail]) · V)
    codes = e4m3(clamp(o · (448 / bound_b), ±448)),   scale = bound_b / 448 (head 0 writes it)

Layouts (`gluon_supported`): z ``[B, L, D]`` read through the flat ``[B·L, D]`` view (rows of a tile past L
belong to the next sample or are TMA zero fill: computed, never stored); k, v ``[B, Lk, H, d]`` through
``[B·Lk, H·d]`` (key rows past the live ones get probability 0). Gluon kernels do not run under
TRITON_INTERPRET: on the CPU the Triton kernel is what runs; `tests/kernels/test_norm_attention_quant_gluon.py`
compiles this one for sm90 and the GPU tests compare it with the reference and the Triton kernel.
"""

from __future__ import annotations

import torch
import triton

from turbocompile.kernels.sagesla.gluon_attn import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    from turbocompile.kernels.sagesla.gluon_attn import _cta_barrier, _tma_load

__all__ = ["BLOCK_M", "BLOCK_N", "NRES", "gluon_supported", "norm_attention_quant_gluon"]

BLOCK_M = 64  # query rows per tile: one warpgroup's wgmma M
BLOCK_N = 64  # keys per block
NRES = 2  # key/value slots: a merged prompt of up to 127 real tokens stays resident per head
PROGRAMS_PER_SM = 2  # each takes 104 KB of shared memory (and 164 registers, Triton 3.6)

if HAS_GLUON:

    @gluon.jit
    def _issue_kv(kdesc, vdesc, kbufs, vbufs, bars, slot, krow, col, pred):
        """TMA of one key block (K rows and V rows from row ``krow``, head columns from ``col``) into ``slot``."""
        bar = bars.index(slot)
        mbarrier.expect(bar, kdesc.block_type.nbytes + vdesc.block_type.nbytes, pred=pred)
        _tma_load(kdesc, [krow, col], bar, kbufs.index(slot), pred=pred)
        _tma_load(vdesc, [krow, col], bar, vbufs.index(slot), pred=pred)

    @gluon.jit
    def _issue_z(zdesc, zbufs, zbars, slot, t, tiles_m, L, H, DH: gl.constexpr, BLOCK_M: gl.constexpr, pred):
        """TMA of tile t's query rows (head-major tile order) into z slot ``slot``."""
        bh = t // tiles_m
        bar = zbars.index(slot)
        mbarrier.expect(bar, zdesc.block_type.nbytes, pred=pred)
        _tma_load(zdesc, [(bh // H) * L + (t % tiles_m) * BLOCK_M, (bh % H) * DH], bar, zbufs.index(slot), pred=pred)

    @gluon.jit
    def _key_block(qn, kdesc, vdesc, kbufs, vbufs, kvbars, c, j, nblk, krow, col, qk_scale, n_tail, tail_bias, kv_end,
                   m_i, l_i, acc, s_zero, kcols0, p_op: gl.constexpr, o_layout: gl.constexpr, BLOCK_N: gl.constexpr,
                   NRES: gl.constexpr, LAST: gl.constexpr, HAS_TAIL: gl.constexpr):
        """Key block j (copy number c: slot c % NRES): S = qn·Kᵀ, the online-softmax update, O += P·V (block 0 starts
        O: alpha is 0 there); LAST: the tail bias and the dead-key mask. Streaming (nblk > NRES): the slot is refilled
        with block j + NRES once every warp is past this block's products."""
        slot = c % NRES
        mbarrier.wait(kvbars.index(slot), (c // NRES) & 1)
        sc = warpgroup_mma(qn, kbufs.index(slot).permute((1, 0)), s_zero, use_acc=False) * qk_scale
        if LAST:
            cols = j * BLOCK_N + kcols0
            if HAS_TAIL:
                sc = sc + gl.expand_dims(gl.where(cols == n_tail, tail_bias, 0.0), 0)
            sc = gl.where(gl.expand_dims(cols < kv_end, 0), sc, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(sc, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(sc - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(qn.dtype), p_op), vbufs.index(slot), acc, use_acc=j > 0)
        if nblk > NRES:
            _cta_barrier()
            _issue_kv(kdesc, vdesc, kbufs, vbufs, kvbars, slot, krow + (j + NRES) * BLOCK_N, col, j + NRES < nblk)
        return m_new, l_i, acc

    @gluon.jit
    def _tile_rstd(rstd_ptr, t, tiles_m, L, H, rows0, BLOCK_M: gl.constexpr, pred):
        """The rstd of tile t's rows (0 where past L, or everywhere without ``pred``)."""
        rows = (t % tiles_m) * BLOCK_M + rows0
        ok = (rows < L) & pred
        return gl.load(rstd_ptr + ((t // tiles_m) // H).to(gl.int64) * L + rows, mask=ok, other=0.0)

    @gluon.jit
    def _text_attn_gluon(
        zdesc, kdesc, vdesc,  # z [B*L, D], k and v [B*Lk, D] (row strides as given), boxes [BLOCK_M|BLOCK_N, DH]
        rstd_ptr,  # [B*L] fp32 (without HAS_SSQ), else a dummy
        ssq_ptr,  # [B*L, G] fp32 granule sums of squares of z's rows (HAS_SSQ), else a dummy
        w_ptr,  # [D] RMSNorm weight (z's dtype or fp32)
        n_ptr,  # int32 [B, H] tail starts (HAS_TAIL), else a dummy
        bound_ptr,  # [B] fp32: max |v| per sample
        codes_ptr,  # [B*L, D] e4m3, contiguous
        scale_ptr,  # [B*L] fp32
        L, LK, H, D, qk_scale, G, stride_ssq, eps, n_tiles, tiles_m, chunk,
        HAS_TAIL: gl.constexpr, HAS_SSQ: gl.constexpr, BLOCK_G: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, DH: gl.constexpr, NRES: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        dt: gl.constexpr = zdesc.dtype
        t0 = gl.program_id(0) * chunk
        n_my = gl.minimum(n_tiles - t0, chunk)

        # S = qn·Kᵀ [BLOCK_M, BLOCK_N] and O [BLOCK_M, DH] wgmma accumulators (16-bit operands: k16); qn and P
        # as register A operands; a row-major blocked layout for the codes' 16-byte stores.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, DH, 16])
        q_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        st_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[32 * 16 // DH, DH // 16],
                                                   warps_per_cta=[num_warps, 1], order=[1, 0])

        zbufs = gl.allocate_shared_memory(dt, [2, BLOCK_M, DH], zdesc.layout)
        kbufs = gl.allocate_shared_memory(dt, [NRES, BLOCK_N, DH], kdesc.layout)
        vbufs = gl.allocate_shared_memory(dt, [NRES, BLOCK_N, DH], vdesc.layout)
        zbars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        kvbars = gl.allocate_shared_memory(gl.int64, [NRES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(zbars.index(i), count=1)
        for i in gl.static_range(NRES):
            mbarrier.init(kvbars.index(i), count=1)
        fence_async_shared()
        _issue_z(zdesc, zbufs, zbars, 0, t0, tiles_m, L, H, DH, BLOCK_M, n_my > 0)

        rows0 = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_op))
        dcols = gl.arange(0, DH, layout=gl.SliceLayout(0, q_op))
        kcols0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        srows0 = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, st_layout))
        scols = gl.arange(0, DH, layout=gl.SliceLayout(0, st_layout))
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        cur_bh = gl.to_tensor(-1)  # the batch·head whose key blocks the slots hold (none yet)
        loads = gl.to_tensor(0)  # key-block copies issued so far (slot = count % NRES, in issue order)
        # per-head scalars, loaded when the program moves to a new head (a few times per program): their latency is
        # not paid at every tile (the head's weights are reloaded per tile: L1 hits, and 32 registers less)
        bound = gl.to_tensor(1.0)
        n_tail = gl.to_tensor(LK)
        kv_end = gl.to_tensor(LK)
        tail_bias = gl.to_tensor(0.0)
        if not HAS_SSQ:  # the first tile's rows' statistic; each tile then loads the next one's
            rstd_next = _tile_rstd(rstd_ptr, t0, tiles_m, L, H, rows0, BLOCK_M, n_my > 0)
        for k in range(0, n_my):
            t = t0 + k
            bh = t // tiles_m
            b = bh // H
            h = bh % H
            m0 = (t % tiles_m) * BLOCK_M
            rows = m0 + rows0
            row_ok = rows < L
            tok = b.to(gl.int64) * L + rows
            if HAS_SSQ:  # the rows' RMSNorm statistic from the q GEMM's granule sums of squares
                ssq = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, q_op))
                for g0 in range(0, G, BLOCK_G):
                    gi = g0 + gl.arange(0, BLOCK_G, layout=gl.SliceLayout(0, q_op))
                    ssq += gl.sum(gl.load(ssq_ptr + gl.expand_dims(tok * stride_ssq, 1) + gl.expand_dims(gi, 0),
                                          mask=gl.expand_dims(row_ok, 1) & gl.expand_dims(gi < G, 0), other=0.0),
                                  axis=1)
                rstd = gl.rsqrt(ssq / D + eps)
            else:  # loaded one tile ahead
                rstd = rstd_next
                rstd_next = _tile_rstd(rstd_ptr, t + 1, tiles_m, L, H, rows0, BLOCK_M, k + 1 < n_my)
            w = gl.load(w_ptr + h * DH + dcols).to(gl.float32)
            if bh != cur_bh:
                bound = gl.load(bound_ptr + b)
                if HAS_TAIL:
                    n_tail = gl.load(n_ptr + bh)
                    kv_end = gl.minimum(n_tail + 1, LK)
                    tail_bias = gl.log2(gl.maximum(LK - n_tail, 1).to(gl.float32))
            nblk = (kv_end + BLOCK_N - 1) // BLOCK_N

            zslot = k % 2
            mbarrier.wait(zbars.index(zslot), (k // 2) & 1)
            zt = zbufs.index(zslot).load(q_op).to(gl.float32)
            # every warp has its z tile in registers and is past tile k - 1 (whose products were waited): the
            # other z slot and the key/value slots may be refilled
            _cta_barrier()
            _issue_z(zdesc, zbufs, zbars, (k + 1) % 2, t + 1, tiles_m, L, H, DH, BLOCK_M, k + 1 < n_my)
            qn = ((zt * gl.expand_dims(rstd, 1)).to(dt).to(gl.float32) * gl.expand_dims(w, 0)).to(dt)

            # key blocks: resident when the head has at most NRES of them (copied once per head), else
            # streamed NRES ahead. `first` is the copy count of block 0 of this tile.
            krow = b * LK
            reload = (bh != cur_bh) | (nblk > NRES)
            first = gl.where(reload, loads, loads - gl.minimum(nblk, NRES))
            if reload:
                for r in gl.static_range(NRES):
                    _issue_kv(kdesc, vdesc, kbufs, vbufs, kvbars, (loads + r) % NRES, krow + r * BLOCK_N, h * DH,
                              r < nblk)
                loads += gl.minimum(nblk, NRES)
            cur_bh = bh

            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
            acc = gl.zeros([BLOCK_M, DH], gl.float32, layout=o_layout)
            # full blocks, then the last one: only it can hold dead keys and the merged tail's key (n_tail =
            # kv_end - 1). Peeled rather than branched: with a tensor update under an `if` in this loop, the outputs
            # were wrong whenever key blocks streamed (H100, Triton 3.6, session 30; the same updates without the
            # `if` were right; cause not found)
            for j in range(0, nblk - 1):
                m_i, l_i, acc = _key_block(qn, kdesc, vdesc, kbufs, vbufs, kvbars, first + j, j, nblk, krow, h * DH,
                                           qk_scale, n_tail, tail_bias, kv_end, m_i, l_i, acc, s_zero, kcols0,
                                           p_op, o_layout, BLOCK_N, NRES, False, HAS_TAIL)
            m_i, l_i, acc = _key_block(qn, kdesc, vdesc, kbufs, vbufs, kvbars, first + nblk - 1, nblk - 1, nblk, krow,
                                       h * DH, qk_scale, n_tail, tail_bias, kv_end, m_i, l_i, acc, s_zero, kcols0,
                                       p_op, o_layout, BLOCK_N, NRES, True, HAS_TAIL)
            if nblk > NRES:
                loads += nblk - NRES

            # epilogue: the output as the graph stores it, then e4m3 at the sample's bound
            # (one reciprocal per row, not a division per element: the Triton kernel divides, so the two may differ
            # in the last bit of o and then, rarely, in a code)
            o = acc * gl.expand_dims(gl.convert_layout(1.0 / l_i, gl.SliceLayout(1, o_layout)), 1)
            o = gl.convert_layout(o.to(dt), st_layout).to(gl.float32)
            inv = gl.div_rn(gl.full([BLOCK_M, DH], 448.0, gl.float32, layout=st_layout), bound + gl.zeros_like(o))
            # the saturating RNE cast (cvt.rn.satfinite) is the quantizer's clamp at ±448
            codes = (o * inv).to(gl.float8e4nv)
            srows = m0 + srows0
            stok = b.to(gl.int64) * L + srows
            srow_ok = srows < L
            gl.store(codes_ptr + gl.expand_dims(stok * D + h * DH, 1) + gl.expand_dims(scols, 0), codes,
                     mask=gl.expand_dims(srow_ok, 1))
            scale = gl.div_rn(bound + gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, st_layout)), 448.0)
            gl.store(scale_ptr + stok, scale, mask=srow_ok & (h == 0))

        for i in gl.static_range(2):
            mbarrier.invalidate(zbars.index(i))
        for i in gl.static_range(NRES):
            mbarrier.invalidate(kvbars.index(i))


def _flat_rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` [B, R, C] or [B, R, H, d] (unit last stride, head stride d) as a 2-D [B·R, C or H·d] view of the
    same memory with one row stride, or None when the sample stride is not R row strides (and B > 1)."""
    B, R = t.shape[:2]
    if B > 1 and t.stride(0) != R * t.stride(1):
        return None
    cols = t.shape[2] if t.dim() == 3 else t.shape[2] * t.shape[3]
    return torch.as_strided(t, (B * R, cols), (t.stride(1), 1))


def gluon_supported(z: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `norm_attention_quant_gluon` covers this call: Hopper (sm90) CUDA, bf16/fp16, head dim 64 or
    128, z [B, L, D] and k/v [B, Lk, H, d] with unit last strides, head-packed columns (k/v head stride d),
    one row stride each across samples, 16-byte aligned rows and base addresses (TMA)."""
    if not (HAS_GLUON and z.is_cuda and torch.cuda.get_device_capability(z.device)[0] == 9):
        return False
    B, Lk, H, d = k.shape
    if z.dtype not in (torch.bfloat16, torch.float16) or d not in (64, 128) or Lk == 0 or z.shape[1] == 0:
        return False
    if z.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride(2) != d or v.stride(2) != d:
        return False
    for t in (z, k, v):
        flat = _flat_rows(t)
        if flat is None or flat.stride(0) % 8 or flat.data_ptr() % 16:
            return False
    return True


def _descriptor(t2: torch.Tensor, box: list):
    lay = gl.NVMMASharedLayout.get_default_for(box, gl.bfloat16 if t2.dtype == torch.bfloat16 else gl.float16)
    return GluonTensorDescriptor(t2, list(t2.shape), list(t2.stride()), box, lay)


def norm_attention_quant_gluon(z: torch.Tensor, weight: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               v_bound: torch.Tensor, tail_start: torch.Tensor | None, num_heads: int, eps: float,
                               codes: torch.Tensor, scales: torch.Tensor, rstd: torch.Tensor | None,
                               sumsq: torch.Tensor | None, block_g: int, programs: int | None = None,
                               block_n: int = BLOCK_N, nres: int = NRES) -> None:
    """Fill ``codes`` [B·L, D] e4m3 and ``scales`` [B·L, 1] fp32 (see the module docstring) from the rows'
    ``rstd`` [B·L] fp32 or their granule ``sumsq`` [B·L, G] fp32 (exactly one given). The caller checked
    `gluon_supported`. ``programs``: the persistent grid size (default two per SM); ``block_n`` / ``nres``: keys
    per block and key-block slots (64 / 2 or 128 / 1 keep the shared memory of two programs per SM)."""
    B, L, D = z.shape
    Lk, H, dh = k.shape[1], num_heads, D // num_heads
    tiles_m = triton.cdiv(L, BLOCK_M)
    n_tiles = B * H * tiles_m
    if programs is None:
        programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(z.device).multi_processor_count
    chunk = triton.cdiv(n_tiles, max(1, min(programs, n_tiles)))
    grid = triton.cdiv(n_tiles, chunk)
    zdesc = _descriptor(_flat_rows(z), [BLOCK_M, dh])
    kdesc = _descriptor(_flat_rows(k), [block_n, dh])
    vdesc = _descriptor(_flat_rows(v), [block_n, dh])
    dummy = v_bound
    ssq = sumsq if sumsq is not None else dummy
    _text_attn_gluon[(grid,)](
        zdesc, kdesc, vdesc, rstd if rstd is not None else dummy, ssq, weight,
        tail_start if tail_start is not None else dummy, v_bound, codes, scales,
        L, Lk, H, D, 1.4426950408889634 / dh ** 0.5, sumsq.shape[1] if sumsq is not None else 0,
        ssq.stride(0), float(eps), n_tiles, tiles_m, chunk,
        HAS_TAIL=tail_start is not None, HAS_SSQ=sumsq is not None, BLOCK_G=block_g,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, DH=dh, NRES=nres, num_warps=4)
