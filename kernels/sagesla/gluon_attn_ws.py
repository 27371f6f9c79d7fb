"""SageSLA sparse forward (int8-fp8) for Hopper, warp-specialized with two consumer warpgroups in
ping-pong (FA3-style scheduling), written in Gluon. Experimental: not the default (see RESULTS.md).

Why: in `gluon_attn` two independent programs share an SM, and the profile (ncu, session 7) shows
them running in near lockstep: both in their exp2 phase at once (the MUFU pipe, 16 lanes/clk/SM,
is then shared) and both waiting on their PV product at once. Here one program (CTA) holds

  * warpgroup 0 (default partition) and warpgroup 1 (worker): each owns one 64-row query block
    (its own block-map row, q quantization group and K/V ring) and runs the same loop as
    `gluon_attn` (INT8 QK of block t+1 in flight under the softmax of block t, FP8 PV into a
    fresh tile folded into the fp32 accumulator);
  * two producer warps (workers, 24 registers), one per ring: each walks its warpgroup's block
    list and issues the K / V^T TMA loads NS ahead; "full" and "empty" mbarriers per slot, so
    the consumers neither issue loads nor synchronize their warps around refills;
  * with PINGPONG, a turn token (two mbarriers): a warpgroup enters its softmax only after the
    other one has left its own, so one warpgroup's exponentials run while the other's products and
    fold run.

Registers: 240 per consumer thread, 24 for the producer's warpgroup (maxnreg 168 at launch over
12 warps). The linear branch is not in this kernel: with `launch_attn`, it runs through the split
linear-output kernel.
"""

from __future__ import annotations

import triton

from .gluon_attn import HAS_GLUON, LOG2E, make_descriptors

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

    from .gluon_attn import _softmax_pv, _tma_load

    @gluon.jit
    def _ws_producer(a, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, DENSE: gl.constexpr,
                     NS: gl.constexpr, VPERM: gl.constexpr, PINGPONG: gl.constexpr, WG: gl.constexpr):
        """One warp per consumer: the TMA loads of warpgroup WG's key blocks into its ring, NS ahead
        (one producer per ring, so a lagging warpgroup never holds up the other's loads)."""
        (q_ptr, o_ptr, kdesc, vdesc, kscale_ptr, vscale_ptr, lut_ptr, kbufs, vbufs, full, empty, turn,
         H, L, Qb, Kb, T, Lpad, qk_scale, sq, so) = a
        bh = gl.program_id(1)
        if DENSE:
            n_blk = Kb
        else:
            n_blk = T
        i = gl.minimum(2 * gl.program_id(0) + WG, Qb - 1)
        lut_base = lut_ptr + (bh * Qb + i).to(gl.int64) * T
        for t in range(n_blk):
            if DENSE:
                j = t
            else:
                j = gl.load(lut_base + t)
            slot = WG * NS + t % NS
            mbarrier.wait(empty.index(slot), ((t // NS) & 1) ^ 1)  # a fresh barrier passes parity 1
            bar = full.index(slot)
            mbarrier.expect(bar, kdesc.block_type.nbytes + vdesc.block_type.nbytes)
            _tma_load(kdesc, [bh * Lpad + j * BLOCK_N, 0], bar, kbufs.index(slot))
            _tma_load(vdesc, [bh * HEAD_D, j * BLOCK_N], bar, vbufs.index(slot))

    @gluon.jit
    def _ws_consumer(a, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, DENSE: gl.constexpr,
                     NS: gl.constexpr, VPERM: gl.constexpr, PINGPONG: gl.constexpr, WG: gl.constexpr):
        """One warpgroup: query block 2·pid + WG (clamped: an odd last block is computed twice and
        stored twice with the same values), its whole key loop and epilogue."""
        (q_ptr, o_ptr, kdesc, vdesc, kscale_ptr, vscale_ptr, lut_ptr, kbufs, vbufs, full, empty, turn,
         H, L, Qb, Kb, T, Lpad, qk_scale, sq, so) = a
        stride_qb, stride_ql, stride_qh, stride_qd = sq
        stride_ob, stride_ol, stride_oh, stride_od = so
        i = gl.minimum(2 * gl.program_id(0) + WG, Qb - 1)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        NW: gl.constexpr = 4
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, HEAD_D, 32])
        q_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=4)
        p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                                   warps_per_cta=[NW, 1], order=[1, 0])
        if DENSE:
            n_blk = Kb
        else:
            n_blk = T
        lut_base = lut_ptr + (bh * Qb + i).to(gl.int64) * T
        base = WG * NS
        my_turn = turn.index(WG)
        other_turn = turn.index(1 - WG)

        # q tile, INT8 with one scale (BLOCK_M == block_q)
        offs_m = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
        offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, ld_layout))
        qptrs = (q_ptr + b.to(gl.int64) * stride_qb + h * stride_qh
                 + gl.expand_dims(offs_m.to(gl.int64) * stride_ql, 1) + gl.expand_dims(offs_d * stride_qd, 0))
        qf = gl.load(qptrs, mask=gl.expand_dims(offs_m < L, 1), other=0.0).to(gl.float32)
        q_scale = gl.max(gl.max(gl.abs(qf), axis=1), axis=0) / 127.0 + 1e-7
        y = qf / q_scale
        q8 = gl.convert_layout((y + gl.where(y >= 0, 0.5, -0.5)).to(gl.int8), q_op)
        c_q = qk_scale * q_scale

        cols0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)
        kscale_base = kscale_ptr + bh * Kb

        if DENSE:
            j = gl.to_tensor(0)
        else:
            j = gl.load(lut_base)
        mbarrier.wait(full.index(base), 0)
        s_cur = warpgroup_mma(q8, kbufs.index(base).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s_cur = warpgroup_mma_wait(0, deps=(s_cur,))

        for t in range(0, n_blk - 1):
            slot = base + t % NS
            nslot = base + (t + 1) % NS
            if DENSE:
                j_next = t + 1
            else:
                j_next = gl.load(lut_base + t + 1)
            c = c_q * gl.load(kscale_base + j)
            mbarrier.wait(full.index(nslot), ((t + 1) // NS) & 1)
            s_next = warpgroup_mma(q8, kbufs.index(nslot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            # ping-pong: warpgroup 0 takes turns 0, 2, 4, ...; a fresh barrier passes parity 1
            if PINGPONG:
                mbarrier.wait(my_turn, (t & 1) ^ (1 - WG))
            pv, alpha, m_i, l_i = _softmax_pv(s_cur, m_i, l_i, acc, c, cols0, L, vbufs.index(slot), p_op, False,
                                              VPERM)
            if PINGPONG:
                mbarrier.arrive(other_turn, count=1)
            s_next, pv = warpgroup_mma_wait(0, deps=(s_next, pv))
            mbarrier.arrive(empty.index(slot), count=1)  # both products that read `slot` are done
            alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
            acc = acc * gl.expand_dims(alpha_o, 1) + pv
            s_cur = s_next
            j = j_next

        t = n_blk - 1
        slot = base + t % NS
        c = c_q * gl.load(kscale_base + j)
        if PINGPONG:
            mbarrier.wait(my_turn, (t & 1) ^ (1 - WG))
        pv, alpha, m_i, l_i = _softmax_pv(s_cur, m_i, l_i, acc, c, j * BLOCK_N + cols0, L,
                                          vbufs.index(slot), p_op, True, VPERM)
        if PINGPONG:
            mbarrier.arrive(other_turn, count=1)
        pv = warpgroup_mma_wait(0, deps=(pv,))
        alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
        acc = acc * gl.expand_dims(alpha_o, 1) + pv

        offs_mo = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        offs_do = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        vs = gl.load(vscale_ptr + bh * HEAD_D + offs_do)
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        o = acc * gl.expand_dims(vs, 0) / gl.expand_dims(l_o, 1)
        optrs = (o_ptr + b.to(gl.int64) * stride_ob + h * stride_oh
                 + gl.expand_dims(offs_mo.to(gl.int64) * stride_ol, 1) + gl.expand_dims(offs_do * stride_od, 0))
        gl.store(optrs, o.to(o_ptr.dtype.element_ty), mask=gl.expand_dims(offs_mo < L, 1))

    @gluon.jit
    def _sagesla_fwd_gluon_ws(
        q_ptr, o_ptr, kdesc, vdesc, kscale_ptr, vscale_ptr, lut_ptr,
        H, L, Qb, Kb, T, Lpad, qk_scale,
        stride_qb, stride_ql, stride_qh, stride_qd,
        stride_ob, stride_ol, stride_oh, stride_od,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, DENSE: gl.constexpr,
        NS: gl.constexpr, PINGPONG: gl.constexpr, num_warps: gl.constexpr,
    ):
        kbufs = gl.allocate_shared_memory(kdesc.dtype, [2 * NS] + kdesc.block_type.shape, kdesc.layout)
        vbufs = gl.allocate_shared_memory(vdesc.dtype, [2 * NS] + vdesc.block_type.shape, vdesc.layout)
        full = gl.allocate_shared_memory(gl.int64, [2 * NS, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [2 * NS, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(2 * NS):
            mbarrier.init(full.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        for s in gl.static_range(2):
            mbarrier.init(turn.index(s), count=1)
        a = (q_ptr, o_ptr, kdesc, vdesc, kscale_ptr, vscale_ptr, lut_ptr, kbufs, vbufs, full, empty, turn,
             H, L, Qb, Kb, T, Lpad, qk_scale,
             (stride_qb, stride_ql, stride_qh, stride_qd), (stride_ob, stride_ol, stride_oh, stride_od))
        gl.warp_specialize([(_ws_consumer, (a, BLOCK_M, BLOCK_N, HEAD_D, DENSE, NS, True, PINGPONG, 0)),
                            (_ws_consumer, (a, BLOCK_M, BLOCK_N, HEAD_D, DENSE, NS, True, PINGPONG, 1)),
                            (_ws_producer, (a, BLOCK_M, BLOCK_N, HEAD_D, DENSE, NS, True, PINGPONG, 0)),
                            (_ws_producer, (a, BLOCK_M, BLOCK_N, HEAD_D, DENSE, NS, True, PINGPONG, 1))],
                           [4, 1, 1], [240, 24, 24])


def launch_gluon_ws(q, out, prep, block_q: int, block_k: int, stages: int = 2, pingpong: bool = True):
    """Run the ping-pong kernel on operands made by `prepare` (int8-fp8, `v_perm`) into `out`
    (sparse branch only). Returns the compiled kernel."""
    if not prep["v_perm"]:
        raise ValueError("the ping-pong kernel needs V in permute_keys order (prepare(..., tune v_perm=1))")
    B, L, H, D = q.shape
    lut = prep["lut"] if prep["lut"] is not None else prep["kscale"]
    kdesc, vdesc = make_descriptors(prep["kq"], prep["vq"], block_k)
    return _sagesla_fwd_gluon_ws[(triton.cdiv(prep["Qb"], 2), B * H)](
        q, out, kdesc, vdesc, prep["kscale"], prep["vscale"], lut,
        H, L, prep["Qb"], prep["Kb"], prep["T"], prep["Lpad"], LOG2E / D ** 0.5, *q.stride(), *out.stride(),
        BLOCK_M=block_q, BLOCK_N=block_k, HEAD_D=D, DENSE=prep["dense"], NS=stages, PINGPONG=pingpong,
        num_warps=4, maxnreg=168,
    )
