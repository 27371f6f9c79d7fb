"""The linear branch's statistics for Hopper, in Gluon: φ(k)ᵀv and Σφ(k) per chunk of rows, and with
``POOL`` also pass A's outputs (q means per query block, k sums per key block, |v| channel maxima).

Same outputs, in the same layouts, as `linear_stats._linear_stats_kernel` with VT, KS8 (and POOL), which
stays the portable kernel (and the one the CPU tests run: Gluon has no interpreter). What this one
changes is the schedule:

  * q, k and v tiles [64 rows, D] arrive by TMA, straight from [B, L, H, D] through 4-d descriptors
    (rows past L, within each batch element, are zero-filled by the copy), into an NS-deep ring;
    one thread issues them, so the loop spends no instructions on addresses;
  * φ(k) = softmax over the head dim is computed with each thread owning 32 consecutive columns of
    one row (four threads per row: two shuffle steps per row reduction) and goes to shared memory as
    the B operand of a bf16/fp16 wgmma, vᵀ·φ(k), whose A operand is the v tile of the ring, read
    transposed (M-major); two warpgroups own 64 rows of vᵀ each, so the [D, D] accumulator is 64
    registers per thread; φ is double-buffered so one product stays in flight under the next tile;
  * Σφ(k) and the |v| maxima are thread-local partials (a thread's columns never change) reduced once
    at the end; the k and q block sums are column sums on the tensor cores (mma.sync, a ones tile
    times the landed tile: exact products, fp32 sums), as in the Triton kernel.

The Triton kernel spends about 1500 instructions per warp on a 64-row step (sm90 compile: shuffle
reductions across 16 threads per row, cp.async address arithmetic, spills) and reads q, k, v at 44-59%
of a device copy's bandwidth; this one takes 549 and reads them at 72-83% (H200, H100; RESULTS.md,
session 17).
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from .gluon_attn import HAS_GLUON
from .pdl import pdl_launch_kwargs

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    from .gluon_attn import _cta_barrier, _gdc_launch_dependents, _gdc_wait, _smem_view, _tma_load

    LOG2E_C = gl.constexpr(1.4426950408889634)

ROWS = 64  # rows per step (one query block of the SM90 geometry; key blocks are two steps)
WARPS = 8  # two warpgroups: 64 rows of vᵀ each
DEFAULT_STAGES = 3  # ring depth: NS · 48 KB of q/k/v tiles + 32 KB of φ, one program per SM

if HAS_GLUON:

    @gluon.jit
    def _issue_rows(qdesc, kdesc, vdesc, qbufs, kbufs, vbufs, bars, slot, b, row, h, POOL_Q: gl.constexpr, pred):
        """TMA of one step's rows of k, v (and q) into ring slot `slot`."""
        bar = bars.index(slot)
        if POOL_Q:
            mbarrier.expect(bar, kdesc.block_type.nbytes + vdesc.block_type.nbytes + qdesc.block_type.nbytes, pred=pred)
        else:
            mbarrier.expect(bar, kdesc.block_type.nbytes + vdesc.block_type.nbytes, pred=pred)
        _tma_load(kdesc, [b, row, h, 0], bar, kbufs.index(slot), pred=pred)
        _tma_load(vdesc, [b, row, h, 0], bar, vbufs.index(slot), pred=pred)
        if POOL_Q:
            _tma_load(qdesc, [b, row, h, 0], bar, qbufs.index(slot), pred=pred)

    @gluon.jit
    def _linear_stats_gluon(
        qdesc, kdesc, vdesc,  # [B, L, H, D] each, blocks [1, ROWS, 1, D] (qdesc: kdesc when not POOL_Q)
        kv_ptr,  # [B*H, NC, D, D] fp32: per-chunk φ(k)ᵀ v, stored (dk, dv)
        ks_ptr,  # [B*H, NC, D] fp32: per-chunk Σ φ(k)
        vmax_ptr,  # [B*H, NC, D] fp32: per-chunk max |v| per channel (POOL)
        qpool_ptr,  # [B*H, Qb, D] fp32: q means per query block (POOL_Q)
        kblk_ptr,  # [B*H, Kb, D] fp32: k sums per key block (POOL)
        H, L, NC, Qb, Kb,
        CHUNK: gl.constexpr, ROWS: gl.constexpr, HEAD_D: gl.constexpr, NS: gl.constexpr,
        POOL: gl.constexpr, POOL_Q: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_K: gl.constexpr,
        PDL: gl.constexpr, num_warps: gl.constexpr,
    ):
        if PDL:  # chained launch (`pdl`): wait for the previous kernel, then let the next one launch
            _gdc_wait()
            _gdc_launch_dependents()
        c = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        row0 = c * CHUNK
        nt = gl.cdiv(gl.minimum(L - row0, CHUNK), ROWS)
        dtype: gl.constexpr = kdesc.dtype

        # Layouts. phi: a thread owns 32 consecutive columns of one row (4 threads per row, 8 rows per
        # warp, 8 warps: one [64, 128] tile). acc: the [D, D] wgmma accumulator,
        # one 64-row half of vᵀ per warpgroup. sums: mma.sync [16, D] tiles of column sums.
        TPR: gl.constexpr = 4
        phi_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, HEAD_D // TPR], threads_per_warp=[32 // TPR, TPR],
                                               warps_per_cta=[num_warps, 1], order=[1, 0])
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, HEAD_D, 16])
        sum_l: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, num_warps],
                                                        instr_shape=[16, 8])
        ones_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=sum_l, k_width=2)
        tile_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=sum_l, k_width=2)
        tile_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_D], dtype)

        # ---- ring (q, k, v tiles per slot), φ double buffer, barriers; first NS steps in flight ----
        kbufs = gl.allocate_shared_memory(dtype, [NS] + kdesc.block_type.shape, kdesc.layout)
        vbufs = gl.allocate_shared_memory(dtype, [NS] + vdesc.block_type.shape, vdesc.layout)
        if POOL_Q:
            qbufs = gl.allocate_shared_memory(dtype, [NS] + qdesc.block_type.shape, qdesc.layout)
        else:
            qbufs = kbufs
        phis = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_D], tile_s)
        bars = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NS):
            mbarrier.init(bars.index(s), count=1)
        for s in gl.static_range(NS):
            _issue_rows(qdesc, kdesc, vdesc, qbufs, kbufs, vbufs, bars, s, b, row0 + s * ROWS, h, POOL_Q, s < nt)

        kv = gl.zeros([HEAD_D, HEAD_D], gl.float32, layout=acc_l)
        ks = gl.zeros([ROWS, HEAD_D], gl.float32, layout=phi_l)  # thread-local partial sums
        vmx = gl.zeros([ROWS, HEAD_D], dtype, layout=phi_l)  # thread-local partial maxima of |v|
        ones = gl.full([16, ROWS], 1.0, dtype, layout=ones_op)
        ksum = gl.zeros([16, HEAD_D], gl.float32, layout=sum_l)
        qsum = gl.zeros([16, HEAD_D], gl.float32, layout=sum_l)
        offs_r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, phi_l))
        offs_sr = gl.arange(0, 16, layout=gl.SliceLayout(1, sum_l))
        offs_sd = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, sum_l))
        row_zero = gl.expand_dims(offs_sr == 0, 1) & gl.expand_dims(offs_sd >= 0, 0)  # [16, D]: row 0 stores

        for t in range(nt):
            slot = t % NS
            mbarrier.wait(bars.index(slot), (t // NS) & 1)
            kt = _smem_view(kbufs.index(slot), dtype, [ROWS, HEAD_D], tile_s)
            vt = _smem_view(vbufs.index(slot), dtype, [ROWS, HEAD_D], tile_s)
            r0 = row0 + t * ROWS
            # φ(k) = e / Σe over the head dim, rows past L zeroed (their k is zero-filled, φ would be 1/D)
            x = kt.load(phi_l).to(gl.float32)
            e = gl.exp2(x * LOG2E_C - gl.expand_dims(gl.max(x, axis=1) * LOG2E_C, 1))
            inv = gl.where(r0 + offs_r < L, 1.0 / gl.sum(e, axis=1), 0.0)
            phi = e * gl.expand_dims(inv, 1)
            ks += phi
            phis.index(t % 2).store(phi.to(dtype))
            if POOL:
                last = t == nt - 1
                vmx = gl.maximum(vmx, gl.abs(vt.load(phi_l))).to(dtype)  # zero-filled rows add nothing
                ksum = mma_v2(ones, kt.load(tile_op), ksum)
                if ((r0 + ROWS) % BLOCK_K == 0) | last:
                    gl.store(kblk_ptr + (bh * Kb + r0 // BLOCK_K).to(gl.int64) * HEAD_D
                             + gl.expand_dims(offs_sr * 0, 1) + gl.expand_dims(offs_sd, 0), ksum, mask=row_zero)
                    ksum = gl.zeros([16, HEAD_D], gl.float32, layout=sum_l)
                if POOL_Q:
                    qt = _smem_view(qbufs.index(slot), dtype, [ROWS, HEAD_D], tile_s)
                    qsum = mma_v2(ones, qt.load(tile_op), qsum)
                    if ((r0 + ROWS) % BLOCK_Q == 0) | last:
                        qb0 = r0 // BLOCK_Q * BLOCK_Q
                        cnt = gl.minimum(L - qb0, BLOCK_Q).to(gl.float32)
                        gl.store(qpool_ptr + (bh * Qb + r0 // BLOCK_Q).to(gl.int64) * HEAD_D
                                 + gl.expand_dims(offs_sr * 0, 1) + gl.expand_dims(offs_sd, 0), qsum / cnt,
                                 mask=row_zero)
                        qsum = gl.zeros([16, HEAD_D], gl.float32, layout=sum_l)
            fence_async_shared()
            _cta_barrier()  # φ in shared memory for the async proxy, every warp past its reads of `slot`
            kv = warpgroup_mma(vt.permute((1, 0)), phis.index(t % 2), kv, is_async=True)
            kv = warpgroup_mma_wait(1, deps=(kv,))  # the product of step t-1 has retired (in this warpgroup)
            _cta_barrier()  # ... and in the other one: refill its slot, reuse its φ buffer at step t+1
            tp = t - 1 + NS
            _issue_rows(qdesc, kdesc, vdesc, qbufs, kbufs, vbufs, bars, (t + NS - 1) % NS, b, row0 + tp * ROWS, h,
                        POOL_Q, (t >= 1) & (tp < nt))
        kv = warpgroup_mma_wait(0, deps=(kv,))
        for s in gl.static_range(NS):
            mbarrier.invalidate(bars.index(s))

        base = (bh * NC + c).to(gl.int64)
        offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, phi_l))
        gl.store(ks_ptr + base * HEAD_D + offs_d, gl.sum(ks, axis=0))
        if POOL:
            gl.store(vmax_ptr + base * HEAD_D + offs_d, gl.max(vmx.to(gl.float32), axis=0))
        # kv holds vᵀφ(k): element (dv, dk) goes to (dk, dv)
        offs_m = gl.arange(0, HEAD_D, layout=gl.SliceLayout(1, acc_l))
        offs_n = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, acc_l))
        gl.store(kv_ptr + base * HEAD_D * HEAD_D + gl.expand_dims(offs_n * HEAD_D, 0) + gl.expand_dims(offs_m, 1), kv)


def stats_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int) -> bool:
    """Whether `launch_stats` covers these inputs: Hopper (sm90) CUDA, bf16/fp16, D = 128 (two 64-row
    halves of vᵀ over the two warpgroups), unit last stride and 16-byte aligned strides and bases (TMA),
    block sizes multiples of the 64-row step."""
    if not (HAS_GLUON and k.is_cuda and k.dtype in (torch.bfloat16, torch.float16) and k.shape[-1] == 128):
        return False
    if torch.cuda.get_device_capability(k.device)[0] != 9 or block_q % ROWS or block_k % ROWS:
        return False
    for t in (q, k, v):
        if t.dtype != k.dtype or t.stride(3) != 1 or t.data_ptr() % 16 or any(s * 2 % 16 for s in t.stride()[:3]):
            return False
    return True


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (cached: asked on every call)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=1024)
def chunk_rows(L: int, BH: int, block: int, sms: int) -> int:
    """Rows per program: whole multiples of `block`, and as close to full waves of one program per SM
    as the head count allows (the number of waves with the least idle tail, fewest waves on ties)."""
    best = None
    for waves in range(1, 9):
        per_head = max(1, (waves * sms) // BH)
        rows = math.ceil(math.ceil(L / per_head) / block) * block
        progs = BH * math.ceil(L / rows)
        fill = progs / (math.ceil(progs / sms) * sms)
        if best is None or fill > best[0] + 0.02:
            best = (fill, rows)
    return best[1]


@functools.lru_cache(maxsize=None)
def _tile_layout(dtype: torch.dtype, D: int):
    """The ring's shared-memory layout (the same for every call: built once)."""
    return gl.NVMMASharedLayout.get_default_for([1, ROWS, 1, D], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def launch_stats(q, k, v, kvp, ksp, vmax, qpool, kblk, chunk: int, Qb: int, Kb: int, block_q: int, block_k: int,
                 pool: bool, pool_q: bool, stages: int = DEFAULT_STAGES, pdl: bool = False):
    """Run the Gluon statistics kernel over [B, L, H, D] inputs into the partial buffers (shapes as for
    `_linear_stats_kernel`; vmax, qpool, kblk are only written with ``pool`` / ``pool_q``); ``pdl``:
    launch as a chained kernel (`pdl`)."""
    B, L, H, D = k.shape
    NC = math.ceil(L / chunk)
    pool_q = pool and pool_q  # the q means are part of the pooling
    lay = _tile_layout(k.dtype, D)
    descs = [GluonTensorDescriptor(t, list(t.shape), list(t.stride()), [1, ROWS, 1, D], lay) for t in (q, k, v)]
    _linear_stats_gluon[(NC, B * H)](
        descs[0] if pool_q else descs[1], descs[1], descs[2], kvp, ksp, vmax, qpool, kblk, H, L, NC, Qb, Kb,
        CHUNK=chunk, ROWS=ROWS, HEAD_D=D, NS=stages, POOL=pool, POOL_Q=pool_q, BLOCK_Q=block_q, BLOCK_K=block_k,
        PDL=pdl, num_warps=WARPS, **pdl_launch_kwargs(pdl),
    )
