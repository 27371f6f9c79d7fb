"""SageSLA sparse forward (int8-fp8) for Hopper, written in Gluon with explicit async wgmma.

Same semantics and the same arithmetic as `_sagesla_fwd_kernel` (QUANT 1, cvt 2, MUFU exp2,
hardware e4m3 cast, two-level PV accumulation); on the H200 its outputs are bit-identical to the
Triton kernel's (RESULTS.md, session 6). What Gluon adds is the schedule, which Triton 3.6 does
not give that kernel:

  * K and V^T tiles arrive by TMA into an NS-deep shared-memory ring (one mbarrier per slot),
    issued NS blocks ahead of use; a slot is refilled as soon as both products that read it
    have completed;
  * the INT8 product S_{t+1} = q·K_{t+1}ᵀ is issued asynchronously *before* the softmax of
    block t, so the tensor cores work on block t+1 while the warps do exp2/max/sum of block t;
  * q stays in registers (wgmma A operand from registers) for the whole loop; P goes from the
    accumulator layout to the A-operand layout without shuffles, because `prepare` stores V's keys
    in `permute_keys` order (VPERM; the same digit swap on P's columns is a pure relabeling);
  * PV for block t goes into a fresh tile (use_acc=False) and is folded into the fp32
    accumulator by an FMA, as in the Triton kernel (the sm90 fp8 MMA accumulates at reduced
    precision, so the running sum stays in fp32);
  * the linear branch (φ(q)·KVW / (1e-5 + φ(q)·Σφ(k)), proj_l folded into KVW, + bias) runs in
    the epilogue: KVW goes through the idle K ring into a bf16 wgmma, no extra kernel and no
    round trip of the output rows.

One warpgroup (4 warps) owns a 64-row query block (= block_q, one row of the block map, one q
quantization group); two programs share an SM (255 registers, ~104 KB of shared memory at NS 3).
Measured and dropped (session 6): a deeper pipeline with PV_t in flight under the next softmax
(64-key sub-steps to fit the registers): ptxas serialized its wgmmas, 25-30% slower. Session 7:
two consumer warpgroups + TMA producer warps in one CTA, with or without a ping-pong token
(branch exp/gluon-ws): correct but 2-20% slower; row sums of P as a wgmma against a ones tile:
wrong results on the H200 (cause not found), reverted. With ADD_OUT the epilogue adds the rows
that `_linear_out_kernel` parked (the dense-mode placement of the linear branch).
Gluon kernels do not run under TRITON_INTERPRET: on CPU the Triton kernel is what the tests run,
and `tests/kernels/test_sagesla_gluon.py` compiles this one for sm90 and checks its instructions.
"""

from __future__ import annotations

import torch
import triton

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

# Shared-memory ring depth (K and V^T tiles per slot: 2 · BLOCK_N · D bytes). H200: 3 beats 2 by
# 3-4%; 4 leaves room for one program per SM only and is 25-35% slower.
DEFAULT_STAGES = 3

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
    def _sagesla_fwd_gluon(
        q_ptr, o_ptr, kdesc, vdesc, kscale_ptr, vscale_ptr, lut_ptr, kvw_ptr, ksum_ptr, bias_ptr,
        H, L, Qb, Kb, T, Lpad, qk_scale,
        stride_qb, stride_ql, stride_qh, stride_qd,
        stride_ob, stride_ol, stride_oh, stride_od,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, DENSE: gl.constexpr,
        LINEAR: gl.constexpr, HAS_BIAS: gl.constexpr, NS: gl.constexpr, VPERM: gl.constexpr, ADD_OUT: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        i = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        krow0 = bh * Lpad
        vrow0 = bh * HEAD_D

        # Layouts: S = q·Kᵀ [BLOCK_M, BLOCK_N] and O [BLOCK_M, HEAD_D] wgmma accumulators
        # (m64 per warpgroup, k32 for 8-bit operands); q and P as register A operands.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_D, 32])
        q_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=4)
        p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                                   warps_per_cta=[num_warps, 1], order=[1, 0])

        # ---- shared-memory ring and barriers; first NS key blocks in flight at once ----
        kbufs = gl.allocate_shared_memory(kdesc.dtype, [NS] + kdesc.block_type.shape, kdesc.layout)
        vbufs = gl.allocate_shared_memory(vdesc.dtype, [NS] + vdesc.block_type.shape, vdesc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NS):
            mbarrier.init(bars.index(s), count=1)
        if DENSE:
            n_blk = Kb
        else:
            n_blk = T
        lut_base = lut_ptr + (bh * Qb + i).to(gl.int64) * T
        for s in gl.static_range(NS):
            if DENSE:
                j0 = s
            else:
                j0 = gl.load(lut_base + gl.minimum(s, n_blk - 1))
            _issue_kv(kdesc, vdesc, kbufs, vbufs, bars, s, j0, krow0, vrow0, BLOCK_N, s < n_blk)

        # ---- q tile: load from [B, L, H, D], per-tile INT8 (one scale: BLOCK_M == block_q) ----
        offs_m = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
        offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, ld_layout))
        row_ok = gl.expand_dims(offs_m < L, 1)
        qptrs = (q_ptr + b.to(gl.int64) * stride_qb + h * stride_qh
                 + gl.expand_dims(offs_m.to(gl.int64) * stride_ql, 1) + gl.expand_dims(offs_d * stride_qd, 0))
        qf = gl.load(qptrs, mask=row_ok, other=0.0).to(gl.float32)
        q_scale = gl.max(gl.max(gl.abs(qf), axis=1), axis=0) / 127.0 + 1e-7
        y = qf / q_scale
        q8 = gl.convert_layout((y + gl.where(y >= 0, 0.5, -0.5)).to(gl.int8), q_op)
        c_q = qk_scale * q_scale

        cols0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)

        # ---- block 0's scores ----
        if DENSE:
            j = gl.to_tensor(0)
        else:
            j = gl.load(lut_base)
        mbarrier.wait(bars.index(0), 0)
        s_cur = warpgroup_mma(q8, kbufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s_cur = warpgroup_mma_wait(0, deps=(s_cur,))
        kscale_base = kscale_ptr + bh * Kb

        # ---- steady state: QK of block t+1 runs on the tensor cores during block t's softmax ----
        for t in range(0, n_blk - 1):
            slot = t % NS
            nslot = (t + 1) % NS
            if DENSE:
                j_next = t + 1
            else:
                j_next = gl.load(lut_base + t + 1)
            c = c_q * gl.load(kscale_base + j)
            mbarrier.wait(bars.index(nslot), ((t + 1) // NS) & 1)
            s_next = warpgroup_mma(q8, kbufs.index(nslot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            pv, alpha, m_i, l_i = _softmax_pv(s_cur, m_i, l_i, acc, c, cols0, L, vbufs.index(slot), p_op, False, VPERM)
            s_next, pv = warpgroup_mma_wait(0, deps=(s_next, pv))
            alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
            acc = acc * gl.expand_dims(alpha_o, 1) + pv
            # Both products that read `slot` are done in every warp: refill it with block t+NS.
            _cta_barrier()
            t_fill = t + NS
            if DENSE:
                j_fill = t_fill
            else:
                j_fill = gl.load(lut_base + gl.minimum(t_fill, n_blk - 1))
            _issue_kv(kdesc, vdesc, kbufs, vbufs, bars, slot, j_fill, krow0, vrow0, BLOCK_N, t_fill < n_blk)
            s_cur = s_next
            j = j_next

        # ---- last block (the only one that may be partial: blocks are ascending) ----
        t = n_blk - 1
        c = c_q * gl.load(kscale_base + j)
        pv, alpha, m_i, l_i = _softmax_pv(s_cur, m_i, l_i, acc, c, j * BLOCK_N + cols0, L,
                                          vbufs.index(t % NS), p_op, True, VPERM)
        pv = warpgroup_mma_wait(0, deps=(pv,))
        alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
        acc = acc * gl.expand_dims(alpha_o, 1) + pv
        for s in gl.static_range(NS):
            mbarrier.invalidate(bars.index(s))

        # ---- epilogue: o = acc · v_scale / l (P̃ and l both carry the 448) + linear branch ----
        offs_mo = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        offs_do = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        vs = gl.load(vscale_ptr + bh * HEAD_D + offs_do)
        inv_l = gl.convert_layout(1.0 / l_i, gl.SliceLayout(1, o_layout))  # one reciprocal per row
        o = acc * gl.expand_dims(vs, 0) * gl.expand_dims(inv_l, 1)
        if LINEAR:
            # Linear branch, proj_l folded into KVW: φ(q)·KVW / (1e-5 + φ(q)·Σφ(k)) (+ bias), φ =
            # softmax over the head dim of the unquantized q tile (re-read, L2-hot). KVW goes
            # through the now idle K ring (every product and TMA load of the loop has retired).
            lin_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                                 instr_shape=[16, HEAD_D, 16])
            _cta_barrier()
            w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HEAD_D, HEAD_D], q_ptr.dtype.element_ty)
            w_smem = _smem_view(kbufs, q_ptr.dtype.element_ty, [HEAD_D, HEAD_D], w_layout)
            offs_r = gl.arange(0, HEAD_D, layout=gl.SliceLayout(1, ld_layout))
            w = gl.load(kvw_ptr + bh.to(gl.int64) * HEAD_D * HEAD_D + gl.expand_dims(offs_r * HEAD_D, 1)
                        + gl.expand_dims(offs_d, 0))
            w_smem.store(w)
            fence_async_shared()
            _cta_barrier()
            # Re-read so that nothing of the prologue's q tile stays live across the loop: the volatile
            # load is not merged with the first one, and program_id(2) (always 0) keeps the address
            # arithmetic from being CSE'd with the prologue's 64-bit pointer tile (both spilled).
            offs_m2 = i * BLOCK_M + gl.program_id(2) + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
            qptrs2 = (q_ptr + b.to(gl.int64) * stride_qb + h * stride_qh
                      + gl.expand_dims(offs_m2.to(gl.int64) * stride_ql, 1) + gl.expand_dims(offs_d * stride_qd, 0))
            qf2 = gl.load(qptrs2, mask=gl.expand_dims(offs_m2 < L, 1), other=0.0, volatile=True).to(gl.float32)
            # φ(q) = e / Σe: the 1/Σe cancels (as in the Triton kernel), so e goes into the product
            # and den = 1e-5·Σe + e·Σφ(k)
            e = gl.exp2(qf2 * LOG2E_C - gl.expand_dims(gl.max(qf2, axis=1) * LOG2E_C, 1))
            ks = gl.load(ksum_ptr + bh * HEAD_D + offs_d)
            den = 1e-5 * gl.sum(e, axis=1) + gl.sum(e * gl.expand_dims(ks, 0), axis=1)
            a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=lin_layout, k_width=2)
            phi_a = gl.convert_layout(e.to(q_ptr.dtype.element_ty), a_op)
            num = warpgroup_mma(phi_a, w_smem, gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=lin_layout),
                                use_acc=False)
            num = num * gl.expand_dims(gl.convert_layout(1.0 / den, gl.SliceLayout(1, lin_layout)), 1)
            o += gl.convert_layout(num, o_layout)
        if HAS_BIAS:
            o += gl.expand_dims(gl.load(bias_ptr + offs_do), 0)
        optrs = (o_ptr + b.to(gl.int64) * stride_ob + h * stride_oh
                 + gl.expand_dims(offs_mo.to(gl.int64) * stride_ol, 1) + gl.expand_dims(offs_do * stride_od, 0))
        if ADD_OUT:  # the linear branch (+ bias) was parked in the output rows by `_linear_out_kernel`
            o += gl.load(optrs, mask=gl.expand_dims(offs_mo < L, 1), other=0.0).to(gl.float32)
        gl.store(optrs, o.to(o_ptr.dtype.element_ty), mask=gl.expand_dims(offs_mo < L, 1))


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


def launch_gluon(q: torch.Tensor, out: torch.Tensor, prep: dict, block_q: int, block_k: int,
                 kvw: torch.Tensor | None, ksum: torch.Tensor | None, bias: torch.Tensor | None,
                 stages: int = DEFAULT_STAGES, add_out: bool = False):
    """Run the Gluon sparse forward on operands made by `prepare` (int8-fp8) into `out`; with
    `kvw` (= (φ(k)ᵀv)·proj_lᵀ, q dtype) and `ksum` the linear branch (+ `bias`) is added in the
    epilogue; with `add_out` the output rows already hold it (parked by `_linear_out_kernel`) and
    are added to. Returns the compiled kernel."""
    B, L, H, D = q.shape
    lut = prep["lut"] if prep["lut"] is not None else prep["kscale"]
    kdesc, vdesc = make_descriptors(prep["kq"], prep["vq"], block_k)
    dummy = prep["vscale"]
    return _sagesla_fwd_gluon[(triton.cdiv(L, block_q), B * H)](
        q, out, kdesc, vdesc, prep["kscale"], prep["vscale"], lut,
        kvw if kvw is not None else dummy, ksum if ksum is not None else dummy,
        bias if bias is not None else dummy,
        H, L, prep["Qb"], prep["Kb"], prep["T"], prep["Lpad"], LOG2E / D ** 0.5, *q.stride(), *out.stride(),
        BLOCK_M=block_q, BLOCK_N=block_k, HEAD_D=D, DENSE=prep["dense"], LINEAR=kvw is not None,
        HAS_BIAS=bias is not None, NS=stages, VPERM=bool(prep["v_perm"]), ADD_OUT=add_out, num_warps=4,
    )
