"""Pure-PyTorch references for the fused norm ops (float32 math, readable, any device).

Memory traffic of one fused pass (what the Triton kernels aim for), per element of x [M, D]:
* ln_modulate:            read x (2 B bf16) + write h (2 B)                  -> 4 B/elt
* residual_ln_modulate:   read x, y + write x_new, h                         -> 8 B/elt
* rmsnorm_rope:           read z + write out (+ a [L, d/2] cos/sin table, reused by every head)
* rmsnorm_rope_pool:      the same, + per-block pooled rows (fp32, 1/pool_rows of the rows); with v
                          also read v (2 B) for its per-block |v| channel maxima
* ln_modulate_quant:      read x + write q (1 B) + one fp32 scale per row/block -> 3 B/elt
* ln_modulate_quant_bound: the same (FP8, per token) + one more fp32 per row: the "bound" scale of the
                          GELU GEMM that reads q, from the codes still in registers (no re-read of q)
The references below materialize fp32 intermediates (several passes): they define the numerics,
not the speed.

Numerics of the LayerNorm ops: LN, affine and ``(1 + scale) + shift`` all stay in float32 and
are rounded once to the output dtype. TurboDiffusion rounds the LN output to bf16 *before* the
modulation, so these ops are slightly more accurate than TD and not bit-identical to it.
"""

from __future__ import annotations

import torch

__all__ = [
    "layer_norm_modulate_ref",
    "gated_residual_ref",
    "residual_ln_modulate_ref",
    "rmsnorm_rope_ref",
    "pool_heads_ref",
    "rmsnorm_rope_pool_ref",
    "quantize_ref",
    "ln_modulate_quant_ref",
    "ln_modulate_quant_bound_ref",
    "INT8_QMAX",
    "FP8_QMAX",
    "AMAX_FLOOR",
]

INT8_QMAX = 128.0  # TD's int8_max: +amax maps to 128 and saturates to 127
FP8_QMAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-8


def round_ln_output(x_dtype: torch.dtype, out_dtype: torch.dtype | None, modulated: bool) -> bool:
    """Whether the LN output is rounded to x.dtype before the AdaLN modulation.

    The eager model (and TurboDiffusion) computes ``LN(x).to(dt)`` and then modulates in fp32
    when the result goes back to a low-precision ``dt``; the head keeps everything in fp32.
    The fused kernels reproduce that rounding so they stay within bf16 rounding of the
    unfused graph.
    """
    out_dtype = out_dtype or x_dtype
    return modulated and x_dtype != torch.float32 and out_dtype != torch.float32


def layer_norm_modulate_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(LN(x)·w + b)·(1 + scale) + shift`` over the last dim in fp32.

    shift/scale broadcast against x (e.g. [B,1,D] or [1,1,D] against x [B,L,D]). When the
    output is low precision and modulated, the LN output is rounded to x.dtype before the
    modulation (:func:`round_ln_output`), like the eager model.
    """
    # F.layer_norm itself (fp32): the reference then reproduces the eager model bit for bit.
    D = x.shape[-1]
    h = torch.nn.functional.layer_norm(
        x.float(), (D,), None if weight is None else weight.float(), None if bias is None else bias.float(), eps
    )
    if round_ln_output(x.dtype, out_dtype, scale is not None or shift is not None):
        h = h.to(x.dtype).float()
    if scale is not None:
        h = h * (1.0 + scale.float())
    if shift is not None:
        h = h + shift.float()
    return h.to(out_dtype or x.dtype)


def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``x + y * gate.to(dt)`` with the eager rounding: product rounded to dt, then the sum."""
    if gate is None:
        return x + y
    return x + y * gate.to(x.dtype)


def residual_ln_modulate_ref(
    x, y, gate=None, weight=None, bias=None, shift=None, scale=None, eps=1e-6, out_dtype=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_new, h): x_new = gated_residual_ref(x, y, gate), h = layer_norm_modulate_ref(x_new, ...)."""
    x_new = gated_residual_ref(x, y, gate)
    return x_new, layer_norm_modulate_ref(x_new, weight, bias, shift, scale, eps, out_dtype)


def rmsnorm_rope_ref(
    z: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Wan q/k RMSNorm over all D channels, then interleaved RoPE per head.

    ``n = bf16(z·rsqrt(mean(z²)+eps)) · w`` (w applied after the rounding, as the model does);
    RoPE rotates pairs (2j, 2j+1) of each head by θ[l, j] in fp32: cos/sin are [L, d/2].
    The result is returned in z.dtype.
    """
    dt = z.dtype
    zf = z.float()
    n = (zf * torch.rsqrt(zf.square().mean(-1, keepdim=True) + eps)).to(dt) * weight
    if cos is None:
        return n.to(dt)
    B, L, D = z.shape
    d = D // num_heads
    nf = n.float().reshape(B, L, num_heads, d // 2, 2)
    a, b = nf[..., 0], nf[..., 1]
    c = cos.float().reshape(1, L, 1, d // 2)
    s = sin.float().reshape(1, L, 1, d // 2)
    out = torch.stack((a * c - b * s, a * s + b * c), dim=-1)
    return out.reshape(B, L, D).to(dt)


def pool_heads_ref(x: torch.Tensor, num_heads: int, rows: int, reduce: str) -> torch.Tensor:
    """Per-head pooling of x [B, L, D] over blocks of ``rows`` consecutive tokens of each batch element.

    Returns [B*H, ceil(L/rows), D/H] fp32 (row b*H + h: batch b, head h, channels h*d..h*d+d-1).
    ``reduce``: "sum", "mean" (over the block's actual rows: the last block may be partial) or
    "absmax" (max |x| per channel). Computed in fp32 from the values x holds.
    """
    if reduce not in ("sum", "mean", "absmax"):
        raise ValueError(f"unknown reduce '{reduce}'; valid: sum, mean, absmax")
    B, L, D = x.shape
    d = D // num_heads
    nb = -(-L // rows)
    xf = x.float().reshape(B, L, num_heads, d).transpose(1, 2)  # [B, H, L, d]
    if reduce == "absmax":
        xf = xf.abs()  # the zero padding below cannot raise a maximum of |x|
    xp = torch.nn.functional.pad(xf, (0, 0, 0, nb * rows - L)).reshape(B, num_heads, nb, rows, d)
    if reduce == "absmax":
        out = xp.amax(3)
    else:
        out = xp.sum(3)
        if reduce == "mean":
            cnt = (L - torch.arange(nb, device=x.device) * rows).clamp(max=rows).float()  # rows per block
            out = out / cnt[:, None]
    return out.reshape(B * num_heads, nb, d)


def rmsnorm_rope_pool_ref(
    z: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    eps: float,
    pool_rows: int,
    mean: bool,
    v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`rmsnorm_rope_ref` plus its per-head block pooling (SageSLA's pass A statistics).

    Returns ``(out, pooled, vmax)``: ``out`` as :func:`rmsnorm_rope_ref`; ``pooled`` the sum
    (``mean`` False) or mean (``mean`` True) of ``out``'s stored values per head and block of
    ``pool_rows`` tokens, [B*H, ceil(L/pool_rows), D/H] fp32; ``vmax`` the max |v| per channel
    per block of v [B, L, D] in the same layout, or None when v is None.
    """
    out = rmsnorm_rope_ref(z, weight, cos, sin, num_heads, eps)
    pooled = pool_heads_ref(out, num_heads, pool_rows, "mean" if mean else "sum")
    vmax = pool_heads_ref(v, num_heads, pool_rows, "absmax") if v is not None else None
    return out, pooled, vmax


def quantize_ref(h: torch.Tensor, fmt: str, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric W8A8 activation quantizer on a 2-D [M, D] tensor (the values are used as given).

    INT8: amax = max(1e-8, max|h|) per group in fp32, q = rint(h · (128/amax)) saturated to
    [-128, 127] (round half to even), scale = amax/128.
    FP8:  q = e4m3(clamp(h · (448/amax), ±448)) round to nearest even, scale = amax/448.
    (128/amax and 448/amax are single correctly rounded divisions; this is exactly what
    ``turbocompile::quantize_activation`` computes. The brief's "h/scale" for FP8 differs from
    h·(448/amax) in the last bit for some inputs; the w8a8 op's form is the contract.)
    per_token: one group per row, scale [M, 1]. block128: 128×128 groups, scale
    [ceil(M/128), ceil(D/128)]; partial blocks use only their real elements.
    """
    if h.dim() != 2:
        raise ValueError(f"quantize_ref expects a 2-D [M, D] tensor, got shape {tuple(h.shape)}")
    hf = h.float()
    M, D = hf.shape
    if granularity == "per_token":
        amax = hf.abs().amax(dim=1, keepdim=True).clamp_min(AMAX_FLOOR)
        amax_e = amax
    elif granularity == "block128":
        Mp, Dp = -(-M // 128) * 128, -(-D // 128) * 128
        pad = torch.zeros(Mp, Dp, dtype=torch.float32, device=h.device)
        pad[:M, :D] = hf.abs()  # zero padding cannot raise an amax
        amax = pad.reshape(Mp // 128, 128, Dp // 128, 128).amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)
        amax_e = amax.repeat_interleave(128, 0).repeat_interleave(128, 1)[:M, :D]
    else:
        raise ValueError(f"unknown granularity '{granularity}'; valid: per_token, block128")
    # full_like(...) / amax: one correctly rounded fp32 division (torch computes scalar / tensor
    # as reciprocal-then-multiply), then one multiply per element, as the kernels do.
    if fmt == "int8":
        inv = torch.full_like(amax_e, INT8_QMAX) / amax_e
        q = torch.round(hf * inv).clamp(-128.0, 127.0).to(torch.int8)  # torch.round: half to even
        return q, amax / INT8_QMAX
    if fmt == "fp8":
        inv = torch.full_like(amax_e, FP8_QMAX) / amax_e
        q = (hf * inv).clamp(-FP8_QMAX, FP8_QMAX).to(torch.float8_e4m3fn)  # RNE cast
        return q, amax / torch.full_like(amax, FP8_QMAX)  # a true division (CUDA's tensor / scalar is x·(1/448))
    raise ValueError(f"unknown format '{fmt}'; valid: int8, fp8")


def ln_modulate_quant_ref(
    x, weight, bias, shift, scale, eps, fmt, granularity
) -> tuple[torch.Tensor, torch.Tensor]:
    """ln_modulate rounded to x.dtype, flattened to [M, D], then :func:`quantize_ref`."""
    h = layer_norm_modulate_ref(x, weight, bias, shift, scale, eps, x.dtype)
    return quantize_ref(h.reshape(-1, x.shape[-1]), fmt, granularity)


def ln_modulate_quant_bound_ref(
    x, weight, bias, shift, scale, eps, wbound: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, s, s_bound)``: :func:`ln_modulate_quant_ref` with FP8 per-token codes, and the "bound" row scales
    ``s_bound [M, 1]`` fp32 that ``row_bound_scale_ref(q, s, wbound)`` computes from them (the power of two
    covering ``(s·||q_row||·C + b)·BOUND_MARGIN`` at 448, ``wbound = [C, b]`` of the GELU GEMM reading q)."""
    from turbocompile.kernels.w8a8.ref import row_bound_scale_ref

    q, s = ln_modulate_quant_ref(x, weight, bias, shift, scale, eps, "fp8", "per_token")
    return q, s, row_bound_scale_ref(q, s, wbound)
