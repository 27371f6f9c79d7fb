"""Triton kernel: Wan q/k RMSNorm over all D channels, fused with interleaved RoPE per head.

One program handles BLOCK_M rows × next_pow2(D) columns; the row is read once (it may be a
strided slice of a fused qkv output: any row strides, unit column stride) and written once,
contiguous. Traffic per element: read 2 B + write 2 B (bf16); the cos/sin table [L, d/2] fp32
is read once per row (d/2·8 B, ~2.5% of the row traffic at D=5120, d=128) and is shared by
all heads of the row, so it hits L1.

Math (matches the model): n = round_dt(z·rsqrt(mean(z²)+eps)) · w (rounded again to dt when w
is in dt, as the eager `n.to(dt) * w` does), then RoPE in fp32 on pairs (2j, 2j+1) of each head
with θ[l, j]: (a, b) -> (a·cos − b·sin, a·sin + b·cos), stored in z.dtype. The pairs are split
in registers (reshape [.., D/2, 2] + split), so the loads and stores stay 16-byte vectors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbocompile.kernels.norms._launch import row_tiling
from turbocompile.kernels.norms.triton_rounding import round_to

__all__ = ["rmsnorm_rope_triton"]


@triton.jit
def _rmsnorm_rope_kernel(
    z_ptr, w_ptr, cos_ptr, sin_ptr,  # z rows of [B, L, D]; w [D]; cos/sin [L, HALF] fp32
    out_ptr,  # [B*L, D] contiguous, z.dtype
    M, L, D, HALF, eps,
    stride_zb, stride_zl, stride_cl,
    HAS_ROPE: tl.constexpr, ROUND_AFTER_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    dt = out_ptr.dtype.element_ty
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    bi = rows64 // L
    li = rows64 % L

    z = tl.load(z_ptr + (bi * stride_zb + li * stride_zl)[:, None] + cols[None, :],
                mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(z * z, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    n = round_to(z * rstd[:, None], dt) * w[None, :]
    if ROUND_AFTER_W:
        n = round_to(n, dt)

    if HAS_ROPE:
        pairs = tl.arange(0, BLOCK_D // 2)
        j = pairs % HALF  # pair index within its head
        pmask = row_mask[:, None] & (pairs < D // 2)[None, :]
        t_off = li[:, None] * stride_cl + j[None, :]
        c = tl.load(cos_ptr + t_off, mask=pmask, other=0.0)
        s = tl.load(sin_ptr + t_off, mask=pmask, other=0.0)
        a, b = tl.split(tl.reshape(n, (BLOCK_M, BLOCK_D // 2, 2)))  # even, odd channels
        n = tl.reshape(tl.join(a * c - b * s, a * s + b * c), (BLOCK_M, BLOCK_D))

    tl.store(out_ptr + rows64[:, None] * D + cols[None, :], round_to(n, dt).to(dt), mask=mask)


def rmsnorm_rope_triton(z, weight, cos, sin, num_heads, eps):
    """RMSNorm(z)·w (+ interleaved RoPE) for z [B, L, D] (rows may be strided). Returns [B, L, D]
    contiguous in z.dtype."""
    if z.dim() != 3:
        raise ValueError(f"z must be [B, L, D], got shape {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"z dtype {z.dtype} not supported (float32, bfloat16, float16)")
    B, L, D = z.shape
    if z.stride(2) != 1:
        z = z.contiguous()
    w = weight.contiguous()
    out = torch.empty(B, L, D, device=z.device, dtype=z.dtype)
    half = D // num_heads // 2
    if cos is not None:
        c = cos.reshape(L, half).float().contiguous()
        s = sin.reshape(L, half).float().contiguous()
    else:
        c = s = w  # never dereferenced
    M = B * L
    if M == 0:
        return out
    block_m, block_d, num_warps = row_tiling(D)
    # A z with B == 1 or L == 1 may carry an arbitrary stride on that dim: it is never used.
    _rmsnorm_rope_kernel[(triton.cdiv(M, block_m),)](
        z, w, c, s, out, M, L, D, max(half, 1), float(eps),
        z.stride(0), z.stride(1), half,
        HAS_ROPE=cos is not None, ROUND_AFTER_W=(w.dtype != torch.float32),
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
    return out
