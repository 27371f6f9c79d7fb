"""Triton kernel: Wan q/k RMSNorm over all D channels, fused with interleaved RoPE per head.

One program handles BLOCK_M rows × next_pow2(D) columns; the row is read once (it may be a
strided slice of a fused qkv output: any row strides, unit column stride) and written once,
contiguous. Traffic per element: read 2 B + write 2 B (bf16); the cos/sin table [L, d/2] fp32
is read once per row (d/2·8 B, ~2.5% of the row traffic at D=5120, d=128) and is shared by
all heads of the row, so it hits L1.

Math (matches the model): n = round_dt(z·rsqrt(mean(z²)+eps)) · w (rounded again to dt when w
is in dt, as the eager `n.to(dt) * w` does), then RoPE in fp32 on pairs (2j, 2j+1) of each head
with θ[l, j]: (a, b) -> (a·cos − b·sin, a·sin + b·cos), stored in z.dtype.

Two kernels: ``_rmsnorm_rope_pairs_kernel`` (even D, power-of-two d/2) reads each pair as one
int32 (int64 for fp32) word, so the rotation partner is in the same register and no reshape or
split is needed (16-byte vector loads/stores, row as one or two tiles of words);
``_rmsnorm_rope_kernel`` (element tiles, reshape + split of the pairs) covers the rest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbocompile.kernels.norms._launch import row_config, row_tiling, split_tiles
from turbocompile.kernels.norms.triton_rounding import rnd, round_to, to_dt

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


@triton.jit
def _unpack(wd, dt: tl.constexpr):
    """A word holding one interleaved pair (2j, 2j+1) in dt -> (even, odd) as fp32.
    16-bit dt: int32 words (little endian: the even element is the low half); fp32: int64."""
    if dt == tl.float32:
        lo = wd.to(tl.int32).to(tl.float32, bitcast=True)
        hi = (wd >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        lo = wd.to(tl.int16).to(dt, bitcast=True).to(tl.float32)
        hi = (wd >> 16).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _pack(lo, hi, dt: tl.constexpr, NATIVE: tl.constexpr):
    """(even, odd) fp32 -> one word of the pair in dt (RNE)."""
    if dt == tl.float32:
        a = lo.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        b = hi.to(tl.int32, bitcast=True).to(tl.int64)
        return a | (b << 32)
    else:
        a = to_dt(lo, dt, NATIVE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        b = to_dt(hi, dt, NATIVE).to(tl.int16, bitcast=True).to(tl.int32)
        return a | (b << 16)


@triton.jit
def _rms_tile(w_ptr, cos_ptr, sin_ptr, out_ptr, rows64, li, row_mask, pairs, rstd, stride_cl, NP, DT: tl.constexpr, WDT: tl.constexpr, HALF: tl.constexpr,
              HAS_ROPE: tl.constexpr, ROUND_AFTER_W: tl.constexpr, NATIVE: tl.constexpr, zw):
    """Normalize, weight, rotate and store one tile of pair-words (zw: the loaded words)."""
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
        t_off = li[:, None] * stride_cl + (pairs % HALF)[None, :]  # HALF is a power of two here: an AND
        c = tl.load(cos_ptr + t_off, mask=mask, other=0.0)
        s = tl.load(sin_ptr + t_off, mask=mask, other=0.0)
        a, b = a * c - b * s, a * s + b * c
    tl.store(out_ptr + rows64[:, None] * NP + pairs[None, :], _pack(a, b, DT, NATIVE), mask=mask)


@triton.jit
def _rmsnorm_rope_pairs_kernel(
    z_ptr, w_ptr, cos_ptr, sin_ptr,  # z / w / out viewed as pair-words (int32 for 16-bit dt, int64 for fp32)
    out_ptr,
    M, L, NP, D, eps,  # NP = D / 2 words per row
    stride_zb, stride_zl, stride_cl,  # z strides in words
    DT: tl.constexpr, WDT: tl.constexpr, HALF: tl.constexpr,
    HAS_ROPE: tl.constexpr, ROUND_AFTER_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_P2: tl.constexpr, NATIVE: tl.constexpr,
):
    """RMSNorm + interleaved RoPE on rows read as words of one (even, odd) pair each: the rotation
    partner of every element sits in the same word, so no reshape/split is needed and loads and
    stores stay 16-byte vectors. The row is one or two tiles of pair-words (BLOCK_P, BLOCK_P2)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    bi = rows64 // L
    li = rows64 % L
    zoff = (bi * stride_zb + li * stride_zl)[:, None]
    p1 = tl.arange(0, BLOCK_P)
    z1 = tl.load(z_ptr + zoff + p1[None, :], mask=row_mask[:, None] & (p1 < NP)[None, :], other=0)
    a, b = _unpack(z1, DT)
    ss = tl.sum(a * a + b * b, axis=1)
    if BLOCK_P2 > 0:
        p2 = BLOCK_P + tl.arange(0, BLOCK_P2)
        z2 = tl.load(z_ptr + zoff + p2[None, :], mask=row_mask[:, None] & (p2 < NP)[None, :], other=0)
        a2, b2 = _unpack(z2, DT)
        ss += tl.sum(a2 * a2 + b2 * b2, axis=1)
    rstd = tl.rsqrt(ss / D + eps)
    _rms_tile(w_ptr, cos_ptr, sin_ptr, out_ptr, rows64, li, row_mask, p1, rstd, stride_cl, NP, DT, WDT, HALF, HAS_ROPE, ROUND_AFTER_W, NATIVE, z1)
    if BLOCK_P2 > 0:
        _rms_tile(w_ptr, cos_ptr, sin_ptr, out_ptr, rows64, li, row_mask, p2, rstd, stride_cl, NP, DT, WDT, HALF, HAS_ROPE, ROUND_AFTER_W, NATIVE, z2)


def _words(t: torch.Tensor) -> torch.Tensor | None:
    """t viewed as words of two elements (int32 for 16-bit dtypes, int64 for fp32), or None."""
    wdt = torch.int64 if t.dtype == torch.float32 else torch.int32
    try:
        return t.view(wdt)
    except RuntimeError:
        return None


def rmsnorm_rope_triton(z, weight, cos, sin, num_heads, eps, config=None, legacy=False):
    """RMSNorm(z)·w (+ interleaved RoPE) for z [B, L, D] (rows may be strided). Returns [B, L, D]
    contiguous in z.dtype.

    Even D (and a power-of-two d/2 with RoPE): the pair-word kernel; otherwise (odd D, a row
    stride or offset that cannot be viewed as words) the element kernel. ``config`` overrides
    :func:`row_config` keys; ``legacy`` forces the element kernel (benchmarks)."""
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
    # A z with B == 1 or L == 1 may carry an arbitrary stride on that dim: it is never used.
    zw, ww, ow = (_words(z), _words(w), _words(out)) if D % 2 == 0 and not legacy else (None, None, None)
    pow2_half = half >= 1 and (half & (half - 1)) == 0
    if zw is not None and ww is not None and ow is not None and (cos is None or pow2_half):
        cfg = row_config(D // 2, "rms", config)
        if cfg["split"]:
            bp, bp2 = split_tiles(D // 2)
        else:
            bp, bp2 = max(16, triton.next_power_of_2(D // 2)), 0
        bm = cfg["block_m"]
        _rmsnorm_rope_pairs_kernel[(triton.cdiv(M, bm),)](
            zw, ww, c, s, ow, M, L, D // 2, D, float(eps),
            zw.stride(0), zw.stride(1), half,
            DT=_TL[z.dtype], WDT=_TL[w.dtype], HALF=half if cos is not None else 1,
            HAS_ROPE=cos is not None, ROUND_AFTER_W=(w.dtype != torch.float32),
            BLOCK_M=bm, BLOCK_P=bp, BLOCK_P2=bp2, NATIVE=z.device.type == "cuda", num_warps=cfg["num_warps"])
        return out
    block_m, block_d, num_warps = row_tiling(D)
    _rmsnorm_rope_kernel[(triton.cdiv(M, block_m),)](
        z, w, c, s, out, M, L, D, max(half, 1), float(eps),
        z.stride(0), z.stride(1), half,
        HAS_ROPE=cos is not None, ROUND_AFTER_W=(w.dtype != torch.float32),
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
    return out


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
