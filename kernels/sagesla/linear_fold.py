"""The linear branch's state, folded with proj_l, in one small kernel.

The statistics kernel (`linear_stats._linear_stats_kernel`) leaves per-chunk partials of
KV = Σ φ(k)ᵀv ([B*H, NC, D, D] fp32) and of Σφ(k) ([B*H, NC, D]). The attention epilogue needs
KVW = round(round(KV)·round(W)ᵀ) (proj_l folded in, since proj_l(φ(q)·KV / den) = φ(q)·(KV·Wᵀ) / den;
TD keeps KV and W in the model dtype) and Σφ(k). Done with torch ops that is about ten launches
(two sums, four casts, a batched matmul);
`_linear_fold_kernel` does all of it in one: program (bh, row block) sums its rows of the
partials, rounds them, multiplies by Wᵀ on the tensor cores and stores those rows of KVW (rows of
KVW depend only on the same rows of KV, so row blocks are independent).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..norms.triton_rounding import to_dt
from .side_streams import beside
from .triton_prep import INTERPRET, dot_acc

__all__ = ["fold_proj", "fold_linear", "linear_state"]


def fold_proj(kv: torch.Tensor, proj_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference of the fold: KVW = KV·Wᵀ [B*H, D, D] in ``dtype``; KV and W are rounded to
    ``dtype`` first, the product is taken in fp32 and rounded once."""
    return torch.matmul(kv.to(dtype).float(), proj_weight.to(dtype).float().t()).to(dtype)


def linear_state(prep: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(KV [B*H, D, D], Σφ(k) [B*H, D]) in fp32: the statistics partials of `prepare` summed."""
    return prep["kv_parts"].sum(1), prep["ks_parts"].sum(1)


@triton.jit
def _linear_fold_kernel(
    kv_ptr,  # [BH, NC, D, D] fp32 partials of φ(k)ᵀv
    ks_ptr,  # [BH, NC, D] fp32 partials of Σφ(k)
    w_ptr,  # [D, D] proj_l weight (out, in), any float dtype
    kvw_ptr,  # [BH, D, D] out: KVW in the model dtype
    ksum_ptr,  # [BH, D] fp32 out
    NC, stride_wo, stride_wi,
    HEAD_D: tl.constexpr, BR: tl.constexpr, NCB: tl.constexpr, F32: tl.constexpr, NATIVE: tl.constexpr,
):
    bh = tl.program_id(0)
    rb = tl.program_id(1)
    dt = kvw_ptr.dtype.element_ty
    rows = rb * BR + tl.arange(0, BR)
    cols = tl.arange(0, HEAD_D)
    base = bh.to(tl.int64) * NC
    # NCB partials per step, loaded together: one step's latency covers NCB loads (a loop of
    # single [BR, D] loads waits a full memory latency per partial: 0.059 ms at 74 partials on the
    # H100; 4 per step, 4 warps: 0.034 ms at 43; on the H200 8 per step with 8 warps was slower)
    cs = tl.arange(0, NCB)
    offs = (cs[:, None, None] * HEAD_D + rows[None, :, None]) * HEAD_D + cols[None, None, :]
    acc3 = tl.zeros([NCB, BR, HEAD_D], dtype=tl.float32)
    for c0 in range(0, NC, NCB):
        ok = (c0 + cs < NC)[:, None, None]
        acc3 += tl.load(kv_ptr + (base + c0) * HEAD_D * HEAD_D + offs, mask=ok, other=0.0)
    acc = tl.sum(acc3, axis=0)
    # RNE casts: the hardware's on the GPU (NaN and inf kept as torch keeps them), exact bit
    # rounding under the interpreter (whose own bf16 cast truncates)
    kvr = to_dt(acc, dt, NATIVE)
    # B operand Wᵀ [in, out]: element (i, o) = W[o, i]
    wt = tl.load(w_ptr + cols[None, :] * stride_wo + cols[:, None] * stride_wi).to(tl.float32)
    res = dot_acc(kvr, to_dt(wt, dt, NATIVE), tl.zeros([BR, HEAD_D], dtype=tl.float32), F32)
    res = to_dt(res, dt, NATIVE)
    tl.store(kvw_ptr + (bh.to(tl.int64) * HEAD_D + rows[:, None]) * HEAD_D + cols[None, :], res)
    if rb == 0:
        ks2 = tl.zeros([NCB, HEAD_D], dtype=tl.float32)
        for c0 in range(0, NC, NCB):
            ks2 += tl.load(ks_ptr + (base + c0 + cs[:, None]) * HEAD_D + cols[None, :],
                           mask=(c0 + cs < NC)[:, None], other=0.0)
        tl.store(ksum_ptr + bh * HEAD_D + cols, tl.sum(ks2, axis=0))


def fold_linear(prep: dict, proj_weight: torch.Tensor, dtype: torch.dtype, ncb: int = 4,
                num_warps: int = 4, out: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(KVW [B*H, D, D] in ``dtype``, Σφ(k) [B*H, D] fp32) from `prepare`'s statistics partials, in
    one launch. Same values as :func:`fold_proj` of :func:`linear_state` up to the order of the fp32
    sums. ``ncb`` (partials per load step) and ``num_warps`` are launch knobs for the benchmarks;
    ``out``: (kvw, ksum) to write into (contiguous, of those shapes and dtypes)."""
    kvp, ksp = prep["kv_parts"], prep["ks_parts"]
    BH, NC, D, _ = kvp.shape
    if tuple(proj_weight.shape) != (D, D):
        raise ValueError(f"proj_weight {tuple(proj_weight.shape)} must be [D, D] = [{D}, {D}]")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fold dtype {dtype}; valid: torch.bfloat16, torch.float16 (the model dtype)")
    if D < 16 or D & (D - 1) or kvp.shape != (BH, NC, D, D) or ksp.shape != (BH, NC, D):
        raise ValueError(f"kv_parts {tuple(kvp.shape)} / ks_parts {tuple(ksp.shape)}: need [B*H, NC, D, D] / "
                         f"[B*H, NC, D] with D a power of two >= 16")
    if kvp.dtype != torch.float32 or ksp.dtype != torch.float32:
        raise ValueError(f"kv_parts {kvp.dtype} / ks_parts {ksp.dtype}; valid: torch.float32")
    if not (kvp.device == ksp.device == proj_weight.device):
        raise ValueError(f"kv_parts on {kvp.device}, ks_parts on {ksp.device}, proj_weight on "
                         f"{proj_weight.device}: all must be on one device")
    kvp, ksp = kvp.contiguous(), ksp.contiguous()  # the kernel indexes them densely
    dev = kvp.device
    kvw, ksum = out if out is not None else (torch.empty(BH, D, D, device=dev, dtype=dtype),
                                             torch.empty(BH, D, device=dev, dtype=torch.float32))
    br = 16
    _linear_fold_kernel[(BH, D // br)](
        kvp, ksp, proj_weight, kvw, ksum, NC, proj_weight.stride(0), proj_weight.stride(1),
        HEAD_D=D, BR=br, NCB=ncb, F32=INTERPRET, NATIVE=not INTERPRET, num_warps=num_warps,
    )
    return kvw, ksum


def fold_linear_beside(prep: dict, proj_weight: torch.Tensor, dtype: torch.dtype):
    """:func:`fold_linear` launched on a side CUDA stream (`side_streams.beside`, lane 0), so that it runs
    beside the rest of the preparation (block scores, top-k, quantization), which does not need it.
    Returns (kvw, ksum, event); the attention kernel's stream must wait on ``event`` before reading them
    (None where the fold ran in order: off CUDA). The outputs are allocated on the calling stream
    before the fork."""
    kvp = prep["kv_parts"]
    dev = kvp.device
    BH, _, D, _ = kvp.shape
    out = (torch.empty(BH, D, D, device=dev, dtype=dtype), torch.empty(BH, D, device=dev, dtype=torch.float32))
    _, done = beside(dev, 0, lambda: fold_linear(prep, proj_weight, dtype, out=out),
                     uses=(kvp, prep["ks_parts"], proj_weight, *out))
    return (*out, done)
