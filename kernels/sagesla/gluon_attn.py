"""SageSLA sparse forward (int8-fp8) for Hopper, written in Gluon with explicit async wgmma.

Same semantics and arithmetic as `_sagesla_fwd_kernel` (QUANT 1, cvt 2, MUFU exp2, hardware e4m3
cast, two-level PV accumulation); the outputs agree to a few 1e-4 (the linear branch and the q
rounding are computed in a different order). What Gluon adds is the schedule:

  * K and V^T tiles arrive by TMA into an NS-deep shared-memory ring (one mbarrier per slot),
    issued NS blocks ahead of use; a slot is refilled as soon as both products that read it
    have completed;
  * one key block at a time: S = q·Kᵀ (INT8 wgmma, q from shared memory), the online softmax,
    P·V (FP8 wgmma, P from registers), the fold. The program needs 168 registers, so three share an
    SM and overlap each other's waits. Session 18 measured this against the previous schedule (QK of
    block t+1 issued before block t's softmax, 255 registers, two programs per SM): 4-7% faster
    (RESULTS.md);
  * P goes from the accumulator layout to the A-operand layout without shuffles, because `prepare`
    stores V's keys in `permute_keys` order (VPERM; the same digit swap on P's columns is a pure
    relabeling);
  * PV for block t goes into a fresh tile (use_acc=False) and is folded into the fp32 accumulator
    by an FMA (the sm90 fp8 MMA accumulates at reduced precision, so the running sum stays fp32);
  * the LUT row and the K scales of the selected blocks are staged in shared memory in the
    prologue: the loop has no global load whose latency it would wait for;
  * the linear branch (φ(q)·KVW / (1e-5 + φ(q)·Σφ(k)), proj_l folded into KVW, + bias) runs in the
    epilogue: KVW goes through the idle K ring into a bf16 wgmma whose accumulator starts from the
    attention output, no extra kernel and no round trip of the output rows;
  * with PDL (`pdl`, when `prepare` chained its kernels) the q tile is loaded and quantized before the
    grid-dependency wait, i.e. while the quantization pass finishes; the LUT and the K/V copies after it;
  * with QOUT the epilogue writes the o projection's FP8 codes at the sample's scale bound_b / 448 instead
    of the output rows (`quant_out`; the quotients by 448 come with the bounds, no division here): no
    register cost in the loop; the epilogue spills about as much as the bf16 store's (Triton 3.6, D = 128,
    as launched: 16 -> 0 stack bytes without the linear branch, 48 -> 56 with it).

One warpgroup (4 warps) owns a 64-row query block (= block_q, one row of the block map, one q
quantization group). Measured and dropped: session 6, a deeper pipeline with PV_t in flight under
the next softmax: ptxas serialized its wgmmas, 25-30% slower; session 7, two consumer warpgroups +
TMA producer warps in one CTA, with or without a ping-pong token: 2-20% slower; row sums of P as a
wgmma against a ones tile: wrong results on the H200 (cause not found); session 18, tree-shaped row
max / row sum: no gain. With ADD_OUT the epilogue adds the rows that `_linear_out_kernel` parked
(the dense-mode placement of the linear branch). Gluon kernels do not run under TRITON_INTERPRET:
on CPU the Triton kernel is what the tests run, and `tests/kernels/test_sagesla_gluon.py` compiles
this one for sm90 and checks its instructions and resources.
"""

from __future__ import annotations

import torch
import triton

from .pdl import pdl_launch_kwargs

try:  # Gluon ships with Triton >= 3.5; two builtins used here were renamed after 3.6
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # renamed after 3.6
    from triton.experimental.gluon.language._core import builtin as _gl_builtin

    @_gl_builtin
    def _smem_view(desc, dtype, shape, layout, _semantic=None):
        """`desc` reinterpreted as another dtype/shape/layout (`_reinterpret` in 3.6, public later)."""
        view = getattr(desc, "reinterpret", None) or desc._reinterpret
        return view(dtype, shape, layout, _semantic=_semantic)

    HAS_GLUON = True
except (ImportError, AttributeError):  # pragma: no cover - a Triton without (this) Gluon
    HAS_GLUON = False

LOG2E = 1.4426950408889634
if HAS_GLUON:
    LOG2_448 = gl.constexpr(8.807354922057604)  # log2(448): P̃ = 448·p = exp2(s − m + log2 448)
    MAGIC = gl.constexpr(12582912.0)  # 1.5·2^23: bits(MAGIC) + i reads as MAGIC + i for |i| < 2^22
    MAGIC_BITS = gl.constexpr(0x4B400000)
    LOG2E_C = gl.constexpr(LOG2E)

# Three programs per SM: registers capped at 168 (65536 / (3 · 128)) and a shared-memory ring of two
# slots (K and V^T tiles, 2 · BLOCK_N · D bytes per slot) + the INT8 q tile: about 74 KB per program at
# D = 128. A third slot, or a staged LUT row of more than 256 entries (top-k above ~0.4 at Wan-14B),
# leaves room for two.
DEFAULT_STAGES = 2
MAX_REGS = 168
# The epilogue's KVW tile by one TMA copy into the idle K ring, instead of global loads through 64
# registers per thread and shared-memory stores (which spill around the epilogue at 168 registers).
# On the H100 the kernel is 0.033 ms faster with it at Wan-1.3B top-k 0.1 + proj_l (0.884 vs 0.917 ms)
# and level at 14B (session 22; session 21's whole op: 1.181 vs 1.198 ms). Module-level so that a
# benchmark can compare the two (`probe_prep_chain.py`, variant "kvw by registers").
KVW_TMA = True

if HAS_GLUON:

    @gluon.jit
    def _issue_kv(kdesc, vdesc, kbufs, vbufs, bars, slot, j, krow0, vrow0,
                  BLOCK_N: gl.constexpr, pred):
        """TMA of key block j (K rows and V^T columns) into ring slot `slot`."""
        bar = bars.index(slot)
        mbarrier.expect(bar, kdesc.block_type.nbytes + vdesc.block_type.nbytes, pred=pred)
        _tma_load(kdesc, [krow0 + j * BLOCK_N, 0], bar, kbufs.index(slot), pred=pred)
        _tma_load(vdesc, [vrow0, j * BLOCK_N], bar, vbufs.index(slot), pred=pred)

    @gluon.jit
    def _smem_scalar(buf, idx, num_warps: gl.constexpr):
        """Element `idx` of a [N, 1, 1] shared-memory vector as a scalar (a broadcast shared load)."""
        one: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32, 1],
                                             warps_per_cta=[num_warps, 1], order=[1, 0])
        return gl.max(gl.max(buf.index(idx).load(one), axis=1), axis=0)

    @gluon.jit
    def _gdc_wait():
        """griddepcontrol.wait: the previous kernel of the stream has completed, its writes are visible
        (`pdl`; a no-op for a launch without PDL)."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _gdc_launch_dependents():
        """griddepcontrol.launch_dependents: the next kernel's programs may launch (`pdl`)."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _start_ring(kdesc, vdesc, kbufs, vbufs, bars, lut_base, n_blk, krow0, vrow0, BLOCK_N: gl.constexpr,
                    NS: gl.constexpr, DENSE: gl.constexpr):
        """TMA of the first NS key blocks (LUT entries 0..NS-1 when sparse) into the ring."""
        for s in gl.static_range(NS):
            if DENSE:
                j0 = s
            else:
                j0 = gl.load(lut_base + gl.minimum(s, n_blk - 1))
            _issue_kv(kdesc, vdesc, kbufs, vbufs, bars, s, j0, krow0, vrow0, BLOCK_N, s < n_blk)

    @gluon.jit
    def _softmax_pv(s_i32, m_i, l_i, acc, c, cols, L, vbuf, p_layout: gl.constexpr, TAIL: gl.constexpr,
                    VPERM: gl.constexpr):
        """One key block's online-softmax update from its INT8 scores (already waited):
        returns (pv token issued asynchronously, alpha, m_new, l_new). `c` is the scalar
        q_scale·k_scale·log2e/√D of this block (one q quantization group per program)."""
        s = (s_i32 + MAGIC_BITS).to(gl.float32, bitcast=True)  # = MAGIC + s exactly (cvt 2)
        off = MAGIC * c
        if TAIL:
            s = gl.where(gl.expand_dims(cols < L, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * c - off)
        alpha = gl.exp2(m_i - m_new)
        bias = off + m_new - LOG2_448
        p = gl.exp2(s * c - gl.expand_dims(bias, 1))
        l_new = l_i * alpha + gl.sum(p, axis=1)
        # V's keys are in `permute_keys` order: the same digit swap on P's columns makes the
        # accumulator layout the wgmma A-operand layout (the convert is then register packing only).
        p8 = p.to(gl.float8e4nv)
        M: gl.constexpr = p8.shape[0]
        N: gl.constexpr = p8.shape[1]
        if VPERM:
            p8 = gl.reshape(gl.permute(gl.reshape(p8, [M, N // 32, 2, 2, 4, 2]), (0, 1, 2, 4, 3, 5)), [M, N])
        p8 = gl.convert_layout(p8, p_layout)
        pv = warpgroup_mma(p8, vbuf.permute((1, 0)), gl.zeros_like(acc), use_acc=False, is_async=True)
        return pv, alpha, m_new, l_new

    @gluon.jit
    def _block_step(q8, kbufs, vbufs, bars, t, c, m_i, l_i, acc, s_zero, cols, L, p_op: gl.constexpr,
                    o_layout: gl.constexpr, NS: gl.constexpr, TAIL: gl.constexpr, VPERM: gl.constexpr):
        """Key block t (ring slot t % NS): wait for its tiles, S = q·Kᵀ, online softmax, PV, fold."""
        slot = t % NS
        mbarrier.wait(bars.index(slot), (t // NS) & 1)
        s = warpgroup_mma(q8, kbufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        pv, alpha, m_i, l_i = _softmax_pv(s, m_i, l_i, acc, c, cols, L, vbufs.index(slot), p_op, TAIL, VPERM)
        pv = warpgroup_mma_wait(0, deps=(pv,))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1) + pv
        return m_i, l_i, acc

    @gluon.jit
    def _sagesla_fwd_gluon(
        q_ptr, o_ptr, kdesc, vdesc, wdesc, kscale_ptr, vscale_ptr, lut_ptr, kvw_ptr, ksum_ptr, bias_ptr,
        H, L, Qb, Kb, T, Lpad, qk_scale,
        stride_qb, stride_ql, stride_qh, stride_qd,
        stride_ob, stride_ol, stride_oh, stride_od,
        codes_ptr, scale_ptr, bound_ptr,  # QOUT: e4m3 [B*L, H*D], fp32 [B*L] token scales, fp32 [3, B] (see below)
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, DENSE: gl.constexpr,
        LINEAR: gl.constexpr, HAS_BIAS: gl.constexpr, NS: gl.constexpr, VPERM: gl.constexpr, ADD_OUT: gl.constexpr,
        LUT_PAD: gl.constexpr, PDL: gl.constexpr, KVW_TMA: gl.constexpr, QOUT: gl.constexpr, num_warps: gl.constexpr,
    ):
        i = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        krow0 = bh * Lpad
        vrow0 = bh * HEAD_D

        # Layouts: S = q·Kᵀ [BLOCK_M, BLOCK_N] and O [BLOCK_M, HEAD_D] wgmma accumulators
        # (m64 per warpgroup, k32 for 8-bit operands); P as a register A operand.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_D, 32])
        p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                                   warps_per_cta=[num_warps, 1], order=[1, 0])

        # ---- shared-memory ring and barriers; first NS key blocks in flight at once ----
        kbufs = gl.allocate_shared_memory(kdesc.dtype, [NS] + kdesc.block_type.shape, kdesc.layout)
        vbufs = gl.allocate_shared_memory(vdesc.dtype, [NS] + vdesc.block_type.shape, vdesc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NS):
            mbarrier.init(bars.index(s), count=1)
        if LINEAR and KVW_TMA:  # the epilogue's KVW copy
            wbar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(wbar, count=1)
        if DENSE:
            n_blk = Kb
        else:
            n_blk = T
        lut_base = lut_ptr + (bh * Qb + i).to(gl.int64) * T
        if not PDL:
            _start_ring(kdesc, vdesc, kbufs, vbufs, bars, lut_base, n_blk, krow0, vrow0, BLOCK_N, NS, DENSE)

        # ---- q tile: load from [B, L, H, D], per-tile INT8 (one scale: BLOCK_M == block_q) into shared
        # memory, the QK wgmma's A operand. q/scale is rounded by the 1.5·2^23 trick: the low byte of
        # bits(y + MAGIC) is round(y) as a two's-complement int8 for |y| <= 127 (no F2I, which shares
        # the MUFU pipe) ----
        offs_m = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
        offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, ld_layout))
        row_ok = gl.expand_dims(offs_m < L, 1)
        qptrs = (q_ptr + b.to(gl.int64) * stride_qb + h * stride_qh
                 + gl.expand_dims(offs_m.to(gl.int64) * stride_ql, 1) + gl.expand_dims(offs_d * stride_qd, 0))
        qf = gl.load(qptrs, mask=row_ok, other=0.0).to(gl.float32)
        q_scale = gl.max(gl.max(gl.abs(qf), axis=1), axis=0) / 127.0 + 1e-7
        y = (qf * (1.0 / q_scale) + MAGIC).to(gl.int32, bitcast=True)
        q8 = gl.allocate_shared_memory(gl.int8, [BLOCK_M, HEAD_D],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_D], gl.int8),
                                       y.to(gl.int8))
        fence_async_shared()
        c_q = qk_scale * q_scale
        if PDL:  # chained launch (`pdl`): the q tile above is the op's input; the LUT and K/V are not
            _gdc_wait()
            _start_ring(kdesc, vdesc, kbufs, vbufs, bars, lut_base, n_blk, krow0, vrow0, BLOCK_N, NS, DENSE)
        if QOUT:  # the sample's 448 / bound and bound / 448 (`quant_out.sample_bound`), loaded before the loop: in the
            # epilogue their latency was exposed at every program's end (ncu, session 29)
            nb = gl.num_programs(1) // H  # B
            c_inv = gl.load(bound_ptr + nb + b)
            c_scale = gl.load(bound_ptr + 2 * nb + b)

        cols0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)

        # ---- sparse: the program's LUT row and the K scales of its key blocks, staged in shared memory,
        # so that the loop reads them with shared loads: a global load there, whose value feeds a uniform
        # register (TMA coordinate, softmax scale), put its latency on the critical path. Dense: block t's
        # scale is a global load at the top of step t, hidden by the QK product ----
        kscale_base = kscale_ptr + bh * Kb
        if not DENSE:
            vec_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32, 1],
                                                        warps_per_cta=[num_warps, 1], order=[1, 0])
            vec_smem: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
            offs_t = gl.expand_dims(gl.arange(0, LUT_PAD, layout=gl.SliceLayout(1, vec_layout)), 1)
            t_ok = offs_t < n_blk
            lut_row = gl.load(lut_base + offs_t, mask=t_ok, other=0)
            ks_smem = gl.allocate_shared_memory(gl.float32, [LUT_PAD, 1], vec_smem,
                                                gl.load(kscale_base + lut_row, mask=t_ok, other=1.0))
            lut_smem = gl.allocate_shared_memory(gl.int32, [LUT_PAD, 1], vec_smem, lut_row)
            # viewed as [LUT_PAD, 1, 1] so that `.index(t)` is a [1, 1] tile in the same layout
            ks_smem = _smem_view(ks_smem, gl.float32, [LUT_PAD, 1, 1], vec_smem)
            lut_smem = _smem_view(lut_smem, gl.int32, [LUT_PAD, 1, 1], vec_smem)

        # ---- one key block at a time: QK, softmax, PV and the fold in order. Nothing is carried in
        # flight from one step to the next, so the program fits in 168 registers and three programs
        # share an SM: they hide each other's waits (faster than overlapping QK_{t+1} with softmax_t
        # inside one program at 255 registers, two per SM: RESULTS.md, session 18) ----
        for t in range(0, n_blk - 1):
            t_fill = t + NS
            if DENSE:
                j_fill = t_fill
                c = c_q * gl.load(kscale_base + t)
            else:
                j_fill = _smem_scalar(lut_smem, gl.minimum(t_fill, n_blk - 1), num_warps)
                c = c_q * _smem_scalar(ks_smem, t, num_warps)
            m_i, l_i, acc = _block_step(q8, kbufs, vbufs, bars, t, c, m_i, l_i, acc, s_zero, cols0, L, p_op, o_layout,
                                        NS, False, VPERM)
            # every warp is past both products that read slot t % NS: refill it with block t + NS
            _cta_barrier()
            _issue_kv(kdesc, vdesc, kbufs, vbufs, bars, t % NS, j_fill, krow0, vrow0, BLOCK_N, t_fill < n_blk)

        # ---- last block (the only one that may be partial: blocks are ascending) ----
        t = n_blk - 1
        if DENSE:
            j = t
            c = c_q * gl.load(kscale_base + t)
        else:
            j = _smem_scalar(lut_smem, t, num_warps)
            c = c_q * _smem_scalar(ks_smem, t, num_warps)
        m_i, l_i, acc = _block_step(q8, kbufs, vbufs, bars, t, c, m_i, l_i, acc, s_zero, j * BLOCK_N + cols0, L, p_op,
                                    o_layout, NS, True, VPERM)
        for s in gl.static_range(NS):
            mbarrier.invalidate(bars.index(s))

        # ---- epilogue: o = acc · v_scale / l (P̃ and l both carry the 448) + linear branch ----
        offs_mo = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        offs_do = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        vs = gl.load(vscale_ptr + bh * HEAD_D + offs_do)
        inv_l = gl.convert_layout(1.0 / l_i, gl.SliceLayout(1, o_layout))  # one reciprocal per row
        if LINEAR:
            # Linear branch, proj_l folded into KVW: φ(q)·KVW / (1e-5 + φ(q)·Σφ(k)) (+ bias), φ = softmax
            # over the head dim of the unquantized q tile, re-read (L2-hot) straight into the register
            # layout of the wgmma's A operand. φ = e / Σe and the 1/Σe cancels, so with
            # den = e·(Σφ(k) + 1e-5) the output row is (acc·vs/l·den + e·KVW) / den: the attention part
            # goes in as the wgmma's accumulator and one multiply per element finishes both. KVW goes
            # through the idle K ring.
            lin_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                                 instr_shape=[16, HEAD_D, 16])
            a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=lin_layout, k_width=2)
            _cta_barrier()  # every warp is past the loop
            w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HEAD_D, HEAD_D], q_ptr.dtype.element_ty)
            w_smem = _smem_view(kbufs, q_ptr.dtype.element_ty, [HEAD_D, HEAD_D], w_layout)
            if KVW_TMA:  # every product that read the ring has completed (waited in the loop)
                mbarrier.expect(wbar, wdesc.block_type.nbytes)
                _tma_load(wdesc, [bh * HEAD_D, 0], wbar, w_smem)
            else:
                offs_r = gl.arange(0, HEAD_D, layout=gl.SliceLayout(1, ld_layout))
                w = gl.load(kvw_ptr + bh.to(gl.int64) * HEAD_D * HEAD_D + gl.expand_dims(offs_r * HEAD_D, 1)
                            + gl.expand_dims(offs_d, 0))
            # program_id(2) (always 0) keeps this address tile from being CSE'd with the prologue's, which
            # would keep it live (spilled) across the loop; volatile keeps the load from being merged.
            offs_ma = i * BLOCK_M + gl.program_id(2) + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_op))
            offs_da = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, a_op))
            qa = gl.load(q_ptr + b.to(gl.int64) * stride_qb + h * stride_qh
                         + gl.expand_dims(offs_ma.to(gl.int64) * stride_ql, 1) + gl.expand_dims(offs_da * stride_qd, 0),
                         mask=gl.expand_dims(offs_ma < L, 1), other=0.0, volatile=True).to(gl.float32)
            ks1 = gl.load(ksum_ptr + bh * HEAD_D + offs_da) + 1e-5
            if not KVW_TMA:
                w_smem.store(w)
                fence_async_shared()
            e = gl.exp2(qa * LOG2E_C - gl.expand_dims(gl.max(qa, axis=1) * LOG2E_C, 1))
            den = gl.sum(e * gl.expand_dims(ks1, 0), axis=1)
            row = gl.convert_layout(inv_l * gl.convert_layout(den, gl.SliceLayout(1, o_layout)),
                                    gl.SliceLayout(1, lin_layout))
            init = (gl.convert_layout(acc, lin_layout)
                    * gl.expand_dims(gl.convert_layout(vs, gl.SliceLayout(0, lin_layout)), 0) * gl.expand_dims(row, 1))
            if KVW_TMA:
                mbarrier.wait(wbar, 0)
                mbarrier.invalidate(wbar)
            else:
                _cta_barrier()  # every warp's part of KVW is in shared memory
            r = warpgroup_mma(e.to(q_ptr.dtype.element_ty), w_smem, init, use_acc=True)
            inv_den = gl.convert_layout(1.0 / den, gl.SliceLayout(1, lin_layout))
            o = gl.convert_layout(r * gl.expand_dims(inv_den, 1), o_layout)
        else:
            o = acc * gl.expand_dims(vs, 0) * gl.expand_dims(inv_l, 1)
        if HAS_BIAS:
            o += gl.expand_dims(gl.load(bias_ptr + offs_do), 0)
        optrs = (o_ptr + b.to(gl.int64) * stride_ob + h * stride_oh
                 + gl.expand_dims(offs_mo.to(gl.int64) * stride_ol, 1) + gl.expand_dims(offs_do * stride_od, 0))
        if ADD_OUT:  # the linear branch (+ bias) was parked in the output rows by `_linear_out_kernel`
            o += gl.load(optrs, mask=gl.expand_dims(offs_mo < L, 1), other=0.0).to(gl.float32)
        if QOUT:  # the o projection's FP8 input instead of the output rows (o_ptr then only parks the linear branch)
            _store_codes(o, codes_ptr, scale_ptr, c_inv, c_scale, b, h, H, L, offs_mo, offs_do,
                         q_ptr.dtype.element_ty, HEAD_D)
        else:
            gl.store(optrs, o.to(o_ptr.dtype.element_ty), mask=gl.expand_dims(offs_mo < L, 1))

    @gluon.jit
    def _store_codes(o, codes_ptr, scale_ptr, inv, scale, b, h, H, L, offs_m, offs_d, dt: gl.constexpr,
                     HEAD_D: gl.constexpr):
        """`quant_out.fp8_codes` in Gluon: o [BLOCK_M, HEAD_D] (rows offs_m of sample b, head h) rounded to dt as
        the output would be stored, times ``inv`` = 448 / bound_b, to e4m3 by the saturating RNE cast
        (cvt.rn.satfinite: the quantizer's clamp at ±448); head 0 also writes the rows' scales ``scale`` =
        bound_b / 448. Both quotients come correctly rounded with the bounds (`quant_out.sample_bound`): a
        division here would be a subroutine call whose saved registers spill."""
        if dt == gl.bfloat16:  # back through the bits: the bf16 cast pair must not be folded away
            x = (o.to(dt).to(gl.uint16, bitcast=True).to(gl.uint32) << 16).to(gl.float32, bitcast=True)
        else:
            x = o.to(dt).to(gl.float32)
        row_ok = offs_m < L
        tok = b.to(gl.int64) * L + offs_m
        cptrs = codes_ptr + gl.expand_dims((tok * H + h) * HEAD_D, 1) + gl.expand_dims(offs_d, 0)
        gl.store(cptrs, (x * inv).to(gl.float8e4nv), mask=gl.expand_dims(row_ok, 1))
        # head 0's rows carry the scales: a mask, not an `if h == 0` branch, which (offline sm90 compile, Triton
        # 3.6) moved the TMA descriptor address out of the uniform registers and added R2URs to the main loop
        gl.store(scale_ptr + tok, gl.zeros_like(offs_m.to(gl.float32)) + scale, mask=row_ok & (h == 0))


def gluon_supported(q: torch.Tensor, quant: int, block_q: int, block_k: int) -> bool:
    """Whether the Gluon kernel covers this call: Hopper (sm90) CUDA, int8-fp8, one q quantization
    group per 64-row program, key blocks of 128 (the only size run on the GPU; the epilogue's D×D
    KVW tile must fit in the K ring), D in {64, 128}."""
    return (HAS_GLUON and q.is_cuda and quant == 1 and block_q == 64 and block_k == 128
            and q.shape[-1] in (64, 128) and torch.cuda.get_device_capability(q.device)[0] == 9)


def make_descriptors(kq: torch.Tensor, vq: torch.Tensor, block_k: int):
    """Host TMA descriptors over the prepared K [B*H, Lpad, D] int8 and V^T [B*H, D, Lpad] e4m3."""
    BH, Lpad, D = kq.shape
    k2, v2 = kq.view(BH * Lpad, D), vq.view(BH * D, Lpad)
    klay = gl.NVMMASharedLayout.get_default_for([block_k, D], gl.int8)
    vlay = gl.NVMMASharedLayout.get_default_for([D, block_k], gl.float8e4nv)
    kdesc = GluonTensorDescriptor(k2, list(k2.shape), list(k2.stride()), [block_k, D], klay)
    vdesc = GluonTensorDescriptor(v2, list(v2.shape), list(v2.stride()), [D, block_k], vlay)
    return kdesc, vdesc


def kvw_descriptor(kvw: torch.Tensor):
    """Host TMA descriptor over KVW [B*H, D, D] (q dtype, contiguous), one [D, D] box per head."""
    BH, D, _ = kvw.shape
    w2 = kvw.contiguous().view(BH * D, D)
    lay = gl.NVMMASharedLayout.get_default_for([D, D], gl.bfloat16 if kvw.dtype == torch.bfloat16 else gl.float16)
    return GluonTensorDescriptor(w2, list(w2.shape), list(w2.stride()), [D, D], lay)


def launch_gluon(q: torch.Tensor, out: torch.Tensor, prep: dict, block_q: int, block_k: int,
                 kvw: torch.Tensor | None, ksum: torch.Tensor | None, bias: torch.Tensor | None,
                 stages: int = DEFAULT_STAGES, add_out: bool = False, qout=None):
    """Run the Gluon sparse forward on operands made by `prepare` (int8-fp8) into `out`; with
    `kvw` (= (φ(k)ᵀv)·proj_lᵀ, q dtype) and `ksum` the linear branch (+ `bias`) is added in the
    epilogue; with `add_out` the output rows already hold it (parked by `_linear_out_kernel`) and
    are added to. `qout`: (codes [B*L, H*D] e4m3, scales [B*L, 1] fp32, [3, B] fp32 bounds, 448 / bound and
    bound / 448 from `quant_out.sample_bound`): write the FP8 codes at each sample's scale bound / 448 and
    the rows' scales instead of `out` (which then only holds the parked rows of `add_out`). Returns the
    compiled kernel."""
    B, L, H, D = q.shape
    pdl = bool(prep.get("pdl"))  # `prepare` launched its chain with PDL: this kernel joins it
    lut = prep["lut"] if prep["lut"] is not None else prep["kscale"]
    kdesc, vdesc = make_descriptors(prep["kq"], prep["vq"], block_k)
    kvw_tma = KVW_TMA and kvw is not None
    wdesc = kvw_descriptor(kvw) if kvw_tma else kdesc  # kdesc: a placeholder the kernel never reads
    dummy = prep["vscale"]
    lut_pad = 1 if prep["dense"] else triton.next_power_of_2(prep["T"])  # entries staged (sparse)
    return _sagesla_fwd_gluon[(triton.cdiv(L, block_q), B * H)](
        q, out, kdesc, vdesc, wdesc, prep["kscale"], prep["vscale"], lut,
        kvw if kvw is not None else dummy, ksum if ksum is not None else dummy,
        bias if bias is not None else dummy,
        H, L, prep["Qb"], prep["Kb"], prep["T"], prep["Lpad"], LOG2E / D ** 0.5, *q.stride(), *out.stride(),
        *(qout if qout is not None else (dummy, dummy, dummy)),
        BLOCK_M=block_q, BLOCK_N=block_k, HEAD_D=D, DENSE=prep["dense"], LINEAR=kvw is not None,
        HAS_BIAS=bias is not None, NS=stages, VPERM=bool(prep["v_perm"]), ADD_OUT=add_out, LUT_PAD=lut_pad,
        PDL=pdl, KVW_TMA=kvw_tma, QOUT=qout is not None, num_warps=4, maxnreg=MAX_REGS, **pdl_launch_kwargs(pdl),
    )
