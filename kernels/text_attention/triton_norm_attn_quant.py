"""Triton kernels: Wan's cross-attention from the raw q projection to the o projection's FP8 input.

Two kernels do what three did (q RMSNorm, attention over the text keys, per-token quantization):

* ``_rms_rstd_kernel``: ``rstd = rsqrt(mean(z²) + eps)`` per token (reads z once, writes 4 bytes a token);
  skipped when the caller passes ``sumsq``, z's sums of squares per 128-column granule written by the q GEMM's
  epilogue (``w8a8_linear_prequant_sumsq``): ``_attn_quant_kernel`` (``HAS_SSQ``) then takes
  ``rstd = rsqrt(sum_g sumsq / D + eps)`` from those few floats a token, and z is read once instead of twice;
* ``_attn_quant_kernel``, one program per (BLOCK_M tokens, batch·head)::

      qn   = round(round(z_h · rstd) · w_h)                       (round = to z's dtype, as the graph stores q)
      o_h  = round(softmax(qn · K_hᵀ / √d [+ tail bias]) · V_h)
      c    = e4m3(clamp(o_h · 448 / bound_b, ±448)),   scale = bound_b / 448 for every token of sample b

  and writes the FP8 codes of its head's columns (and, for head 0, the tokens' scales) directly. On Hopper,
  where `gluon_norm_attn_quant.gluon_supported` holds, the Gluon kernel there does this step instead (same
  arithmetic; a persistent schedule with TMA-prefetched query tiles and per-head resident key blocks).

Why a bound and not the token's abs-max: the abs-max of a token spans all heads, which live in different
programs. Softmax attention output is a convex combination of value rows, so ``|o| <= max|v|`` over the
sample's keys: ``bound_b = max |v[b]|`` (computed once per prompt) bounds every token of sample b. e4m3 is a
floating-point format, so a larger scale than the token's abs-max costs no relative precision for values
above the smallest normal (2^-6 · bound / 448); only smaller ones become subnormal. (P is rounded to V's
dtype for P·V, so |o| may exceed the bound by a rounding step: the clamp saturates at 448.)

Keys: all Lk of them, or (``HAS_TAIL``) keys 0 .. n with key n standing for the n .. Lk-1 tail
(logit + log2(Lk - n)), n read per batch and head from ``tail_start`` - the contract of
:mod:`.triton_tail_merged`, whose ``head_attention`` loop both kernels run.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from turbocompile.kernels.norms.triton_rounding import round_to
from turbocompile.kernels.text_attention.gluon_norm_attn_quant import gluon_supported, norm_attention_quant_gluon
from turbocompile.kernels.text_attention.triton_tail_merged import head_attention
from turbocompile.kernels.w8a8.triton_quant import dequant_scale, quant_scale_math
from turbocompile.ops._backend import triton_interpret

__all__ = ["DEFAULT_CONFIG", "KERNELS", "norm_attention_quant_triton"]

_LOG2E = 1.4426950408889634


@triton.jit
def _rms_rstd_kernel(z_ptr, rstd_ptr, M, L, D, eps, szb, szl, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """rstd[m] = rsqrt(mean over D of z[m]² + eps), fp32, for BLOCK_R rows of z [B, L, D]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < M
    rows64 = rows.to(tl.int64)
    base = z_ptr + ((rows64 // L) * szb + (rows64 % L) * szl)[:, None]
    ssq = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        zt = tl.load(base + cols[None, :], mask=ok[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
        ssq += tl.sum(zt * zt, axis=1)
    tl.store(rstd_ptr + rows, tl.rsqrt(ssq / D + eps), mask=ok)


@triton.jit
def _attn_quant_kernel(
    z_ptr,  # [B, L, D] raw q projection, unit last stride
    rstd_ptr,  # [B*L] fp32 (without HAS_SSQ), else a dummy
    ssq_ptr,  # [B*L, G] fp32 granule sums of squares of z's rows, unit last stride (HAS_SSQ), else a dummy
    w_ptr,  # [D] RMSNorm weight (z's dtype or fp32)
    k_ptr, v_ptr,  # [B, LK, H, DH], unit last stride
    n_ptr,  # int32 [B, H] tail starts (HAS_TAIL), else a dummy
    bound_ptr,  # [B] fp32: max |v| per sample
    codes_ptr,  # [B*L, D] e4m3, contiguous
    scale_ptr,  # [B*L] fp32 (the [M, 1] scale)
    L, LK, H, D, qk_scale,
    szb, szl, skb, skl, skh, svb, svl, svh,
    G, stride_ssq, eps,  # HAS_SSQ: granules per row, sumsq's row stride, the RMSNorm epsilon
    HAS_TAIL: tl.constexpr, NATIVE: tl.constexpr, DOT_F32: tl.constexpr,
    DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SSQ: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    dt = z_ptr.dtype.element_ty
    d = tl.arange(0, DH)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < L
    tok = b.to(tl.int64) * L + rm  # token rows of codes / scales / rstd
    zt = tl.load(z_ptr + b.to(tl.int64) * szb + rm[:, None].to(tl.int64) * szl + h * DH + d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    if HAS_SSQ:
        # the row's sum of squares from the q GEMM's granule sums (G floats a token, re-read by each head's program
        # instead of a pass over z), then _rms_rstd_kernel's expression; BLOCK_G granules at a time (see
        # _ssq_chunk: one [BLOCK_M, G] tile holds G registers a thread next to the attention's state)
        ssq = tl.zeros([BLOCK_M], tl.float32)
        for g0 in range(0, G, BLOCK_G):
            gi = g0 + tl.arange(0, BLOCK_G)
            ssq += tl.sum(tl.load(ssq_ptr + tok[:, None] * stride_ssq + gi[None, :],
                                  mask=row_ok[:, None] & (gi < G)[None, :], other=0.0), axis=1)
        rstd = tl.rsqrt(ssq / D + eps)
    else:
        rstd = tl.load(rstd_ptr + tok, mask=row_ok, other=0.0)
    w = tl.load(w_ptr + h * DH + d).to(tl.float32)
    if NATIVE:  # the GPU's casts round to nearest even: one instruction each
        qn = ((zt * rstd[:, None]).to(dt).to(tl.float32) * w[None, :]).to(dt)
    else:  # the interpreter's 16-bit casts truncate: round explicitly first
        qn = round_to(round_to(zt * rstd[:, None], dt) * w[None, :], dt).to(dt)
    if HAS_TAIL:
        n_tail = tl.load(n_ptr + bh)
    else:
        n_tail = LK
    o = head_attention(qn, k_ptr + b.to(tl.int64) * skb + h * skh, v_ptr + b.to(tl.int64) * svb + h * svh,
                        n_tail, LK, skl, svl, qk_scale, d, HAS_TAIL, BLOCK_M, BLOCK_N, DH, DOT_F32)
    bound = tl.zeros([BLOCK_M, 1], tl.float32) + tl.load(bound_ptr + b)
    if NATIVE:
        # the attention output as the graph stores it, then e4m3 at the bound's scale (the quantizer's formula:
        # one correctly rounded 448 / a, clamp, RNE cast - native, without the interpreter-exact grid rounding)
        o = o.to(dt).to(tl.float32)
        inv = tl.math.div_rn(tl.full(bound.shape, 448.0, tl.float32), bound)
        c = tl.minimum(tl.maximum(o * inv, -448.0), 448.0).to(tl.float8e4nv)
        s = dequant_scale(bound, True)
    else:
        c, s = quant_scale_math(round_to(o, dt), bound, True, False)
    tl.store(codes_ptr + tok[:, None] * D + h * DH + d[None, :], c, mask=row_ok[:, None])
    if h == 0:
        tl.store(scale_ptr + tok[:, None], s, mask=row_ok[:, None])


# 128-token tiles on one warpgroup with 64-key blocks: the fastest of bench_text_attention.py's sweep on an H100
# at the Wan-1.3B and Wan-14B shapes (RESULTS.md, session 26).
# KERNEL: the attention kernel when the caller names none (`norm_attention_quant_triton`'s ``kernel``);
# GLUON_*: the Gluon kernel's persistent grid (None: two programs per SM), keys per block and key-block slots.
DEFAULT_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2,
                  "RSTD_ROWS": 8, "RSTD_COLS": 512, "RSTD_WARPS": 4, "SSQ_CHUNK": None,
                  "KERNEL": "auto", "GLUON_PROGRAMS": None, "GLUON_BLOCK_N": 64, "GLUON_SLOTS": 2}
# (SSQ_CHUNK 2: the interpreter's tests, G <= 5, walk more than one chunk and a partial one)
_INTERPRET_CONFIG = {**DEFAULT_CONFIG, "BLOCK_M": 16, "BLOCK_N": 16, "num_stages": 1, "SSQ_CHUNK": 2}


def _ssq_chunk(g: int, chunk: int | None) -> int:
    """Granules of sumsq the attention kernel reads at a time (its BLOCK_G): ``chunk`` (config SSQ_CHUNK) when
    set, else 8 for G <= 16 and 16 above. H100, the fused op with sumsq, merged keys (bench_text_attention.py):
    Wan-1.3B (G = 12) 0.170 ms at 8 against 0.178 at 16; Wan-14B (G = 40) 1.446 ms at 16, 1.560 at 8 and 2.02 as
    one tile of 64."""
    if chunk is None:
        chunk = 8 if g <= 16 else 16
    return max(2, min(chunk, triton.next_power_of_2(max(g, 1))))


KERNELS = ("auto", "triton", "gluon")


def norm_attention_quant_triton(z: torch.Tensor, weight: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                v_bound: torch.Tensor, tail_start: torch.Tensor | None, num_heads: int, eps: float,
                                config: dict | None = None, sumsq: torch.Tensor | None = None,
                                kernel: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """z ``[B, L, D]``, weight ``[D]``, k/v ``[B, Lk, H, d]`` (unit last strides), v_bound fp32 ``[B]``
    (>= max |v| of each sample, > 0), tail_start int32 ``[B, H]`` contiguous or None -> (FP8 codes
    ``[B*L, D]``, fp32 scales ``[B*L, 1]``). ``config`` overrides :data:`DEFAULT_CONFIG` keys. ``sumsq``:
    None (the rstd pass reads z), or fp32 ``[B*L, G]`` with unit last stride, z's sums of squares per
    granule (the rstd pass is skipped; the RSTD_* config keys are then unused; SSQ_CHUNK: see :func:`_ssq_chunk`).
    ``kernel``: the attention kernel, ``"auto"`` (the Gluon kernel where `gluon_supported`, i.e. on Hopper with
    TMA-compatible layouts, else the Triton one), ``"triton"`` or ``"gluon"`` (an error where unsupported);
    None: the config's ``KERNEL`` ("auto" by default)."""
    interp = triton_interpret()
    cfg = {**(_INTERPRET_CONFIG if interp else DEFAULT_CONFIG), **(config or {})}
    kernel = cfg["KERNEL"] if kernel is None else kernel
    if kernel not in KERNELS:
        raise ValueError(f"norm_attention_quant: kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    B, L, D = z.shape
    H = num_heads
    dh = D // H
    Lk = k.shape[1]
    codes = torch.empty(B * L, D, device=z.device, dtype=torch.float8_e4m3fn)
    scales = torch.empty(B * L, 1, device=z.device, dtype=torch.float32)
    if B * L == 0:
        return codes, scales
    use_gluon = kernel != "triton" and not interp and gluon_supported(z, k, v)
    if kernel == "gluon" and not use_gluon:
        raise ValueError("norm_attention_quant: kernel='gluon' needs an sm90 CUDA device, bf16/fp16, head dim 64 or "
                         "128 and TMA-compatible z/k/v layouts (see gluon_supported); use kernel='auto' or 'triton'")
    if sumsq is None:
        rstd = torch.empty(B * L, device=z.device, dtype=torch.float32)
        _rms_rstd_kernel[(triton.cdiv(B * L, cfg["RSTD_ROWS"]),)](
            z, rstd, B * L, L, D, float(eps), z.stride(0), z.stride(1), BLOCK_R=cfg["RSTD_ROWS"],
            BLOCK_D=cfg["RSTD_COLS"], num_warps=cfg["RSTD_WARPS"])
        ssq, g = v_bound, 0  # a dummy pointer
    else:
        rstd, ssq, g = v_bound, sumsq, sumsq.shape[1]  # no rstd pass: a dummy pointer for rstd
    if use_gluon:
        norm_attention_quant_gluon(z, weight, k, v, v_bound, tail_start, H, eps, codes, scales,
                                   None if sumsq is not None else rstd, sumsq, _ssq_chunk(g, cfg["SSQ_CHUNK"]),
                                   programs=cfg["GLUON_PROGRAMS"], block_n=cfg["GLUON_BLOCK_N"],
                                   nres=cfg["GLUON_SLOTS"])
        return codes, scales
    n = tail_start if tail_start is not None else v_bound  # a dummy pointer when there is no tail
    _attn_quant_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B * H)](
        z, rstd, ssq, weight, k, v, n, v_bound, codes, scales,
        L, Lk, H, D, _LOG2E / math.sqrt(dh),
        z.stride(0), z.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        g, ssq.stride(0), float(eps),
        HAS_TAIL=tail_start is not None, NATIVE=not interp, DOT_F32=interp,
        DH=dh, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], HAS_SSQ=sumsq is not None,
        BLOCK_G=_ssq_chunk(g, cfg["SSQ_CHUNK"]))
    return codes, scales
