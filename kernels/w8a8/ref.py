"""Pure-PyTorch references for the W8A8 linear family (quantizers and the scaled 8-bit GEMM).

Quantizer (shared by weights, offline, and activations, online; TurboDiffusion-compatible for INT8):

* ``amax = max(1e-8, max|x|)`` over the scale group, in fp32. Groups are 128x128 blocks
  (``block128``; partial edge blocks take the amax of their real elements only) or whole rows
  (``per_token`` for activations, ``per_channel`` for a weight's output rows).
* INT8: ``q = round_half_even(x * (128 / amax))`` saturated to [-128, 127] (so ``+amax`` -> 128 ->
  127, exactly as TD's ``cvt.rni.sat.s8``); stored scale (dequantisation factor) ``s = amax / 128``.
  ``128 / amax`` is one correctly rounded fp32 division, then one fp32 multiply per element: the
  Triton kernels compute the very same two roundings, so INT8 codes match bit for bit.
* FP8 (``torch.float8_e4m3fn``): ``q = e4m3(clamp(x * (448 / amax), -448, 448))`` with
  round-to-nearest-even, ``s = amax / 448``. The same 1e-8 floor keeps all-zero groups finite.

GEMM: ``y[m, n] = sum_kb sA(m, kb) * sW(n, kb) * sum_{k in kb} qA[m, k] * qW[n, k] + bias[n]`` with
``kb`` the 128-wide K block. A per-token / per-channel scale is the same for every ``kb``.
The reference accumulates in float64, which is exact here: int8 products are integers below 2^14
and e4m3 products have at most 8 significant bits inside a 2^-18..2^18 range, so a 128-long block
sum never rounds; only the (sA * sW) scaling and the sum over blocks round, in float64.

Memory traffic (what a fused kernel must beat): the quantizer reads x once (2 B/elem for bf16)
and writes q (1 B/elem) plus one fp32 per group; this reference instead materialises several
fp32 temporaries (|x|, padded copy, x * inv). The reference GEMM upcasts qA and qW to float64
(8 B/elem each) and does one float64 matmul per K block: it is for checking, never for speed.
"""

from __future__ import annotations

import torch

__all__ = [
    "BLOCK",
    "INT8_QMAX",
    "FP8_QMAX",
    "AMAX_FLOOR",
    "SCALE_MODES",
    "quant_dtype",
    "block128_amax",
    "quantize_ref",
    "codes_at_amax_ref",
    "dequant_scale_ref",
    "pow2_exponent_ref",
    "quantize_pow2_ref",
    "quantize_pow2_granules_ref",
    "w8a8_gemm_ref",
    "granule_sumsq_ref",
    "w8a8_gemm_sumsq_ref",
    "w8a8_linear_ref",
    "expand_scale",
    "gelu_tanh_ref",
    "w8a8_gemm_gelu_ref",
    "w8a8_gemm_gelu_quant_ref",
    "BOUND_MARGIN",
    "gelu_bound_constants_ref",
    "row_bound_scale_ref",
    "quantize_at_scale_ref",
    "check_row_scale",
    "w8a8_gemm_gelu_rowscale_ref",
]

BLOCK = 128
INT8_QMAX = 128.0  # TD's int8_max: +amax maps to 128 and saturates to 127
FP8_QMAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-8
# How a per-token FP8 scale is chosen: "amax" (amax / 448, quantize_ref) or "pow2" (the power of two
# 2^ceil(log2(amax / 448)), quantize_pow2_ref).
SCALE_MODES = ("amax", "pow2", "bound")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quant_dtype(fmt: str) -> torch.dtype:
    """Storage dtype of the 8-bit codes for ``fmt`` ("int8" | "fp8")."""
    return torch.int8 if fmt == "int8" else torch.float8_e4m3fn


def block128_amax(x32: torch.Tensor) -> torch.Tensor:
    """fp32 [ceil(M/128), ceil(K/128)] max|x| per 128x128 block of a 2-D fp32 tensor.

    Zero padding of partial blocks cannot change a max of absolute values, so edge blocks
    see only their real elements.
    """
    m, k = x32.shape
    mb, kb = _cdiv(m, BLOCK), _cdiv(k, BLOCK)
    pad = torch.nn.functional.pad(x32.abs(), (0, kb * BLOCK - k, 0, mb * BLOCK - m))
    return pad.view(mb, BLOCK, kb, BLOCK).amax(dim=(1, 3))


def expand_scale(scale: torch.Tensor, rows: int, cols_blocks: int, granularity: str) -> torch.Tensor:
    """Return the scale of every (row, K block) as [rows, cols_blocks] (float64 not applied here).

    ``block128`` scales [ceil(rows/128), KB] are repeated over the 128 rows of each block;
    row-wise scales [rows, 1] are repeated over the K blocks.
    """
    if granularity == "block128":
        return scale.repeat_interleave(BLOCK, dim=0)[:rows]
    return scale.expand(rows, cols_blocks)


def quantize_ref(x: torch.Tensor, fmt: str, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D tensor: returns (q [M, K] int8 or e4m3, scale fp32).

    Args:
        x: [M, K] bf16 / fp16 / fp32.
        fmt: "int8" or "fp8".
        granularity: "block128" (scale [ceil(M/128), ceil(K/128)]) or a row-wise one
            ("per_token" / "per_channel": scale [M, 1]).
    """
    x32 = x.float()
    m, k = x32.shape
    if granularity == "block128":
        amax = block128_amax(x32).clamp_min(AMAX_FLOOR)
        amax_e = amax.repeat_interleave(BLOCK, 0)[:m].repeat_interleave(BLOCK, 1)[:, :k]
    else:
        amax = x32.abs().amax(dim=1, keepdim=True).clamp_min(AMAX_FLOOR) if k > 0 else \
            torch.full((m, 1), AMAX_FLOOR, device=x.device)
        amax_e = amax
    q = codes_at_amax_ref(x32, amax_e, fmt)
    scale = dequant_scale_ref(amax, fmt)
    return q, scale.float().contiguous()


def codes_at_amax_ref(x32: torch.Tensor, amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """8-bit codes of fp32 ``x32`` against ``amax`` (floored, broadcastable to x32): INT8
    ``round_half_even(x · (128 / amax))`` saturated to [-128, 127], FP8 ``e4m3_rne(clamp(x · (448 / amax), ±448))``."""
    # torch.full_like(...) / amax: a true fp32 division. (``scalar / tensor`` is computed by torch
    # as reciprocal-then-multiply, two roundings, which would not match the kernels bit for bit.)
    if fmt == "int8":
        inv = torch.full_like(amax, INT8_QMAX) / amax
        return torch.round(x32 * inv).clamp_(-128.0, 127.0).to(torch.int8)  # torch.round: half to even
    inv = torch.full_like(amax, FP8_QMAX) / amax
    return (x32 * inv).clamp_(-FP8_QMAX, FP8_QMAX).to(torch.float8_e4m3fn)  # RNE cast


def dequant_scale_ref(amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """The stored (dequantisation) scale ``amax / qmax``."""
    if fmt == "int8":
        return amax / INT8_QMAX
    # tensor / tensor: on CUDA, ``tensor / python_scalar`` is computed as x * fl(1/448), two
    # roundings, off by one ulp from the kernels' correctly rounded amax/448 for some amax.
    return amax / torch.full_like(amax, FP8_QMAX)


# --------------------------------------------------------------- FP8 with power-of-two scales
#
# Per-token FP8 e4m3 with the scale rounded UP to a power of two: s = 2^e, e = ceil(log2(a / 448)),
# a = max(amax_row, AMAX_FLOOR). e4m3 is a floating format, so the relative precision of normal codes
# is that of the amax scale; the codes of a row just use the binade range differently: the row's
# largest |code| is a / s in (224, 448] (before rounding; 224 after RNE at worst) instead of 448.
# What a power of two buys: re-scaling codes by 2^-d (d >= 0 an integer) is exact as long as the
# result stays an e4m3 normal (>= 2^-6), so codes made at a finer scale can be moved to the row scale
# without touching h again (see kernels/w8a8/triton_pow2.py).
#
# e is computed exactly, never with a float log2 (which can be off by one at exact powers of two):
# with a = m * 2^x, m in [0.5, 1) (frexp) and 448 = 0.875 * 2^9, a <= 448 * 2^e  <=>  m <= 0.875 * 2^(e + 9 - x),
# so the smallest such integer e is x - 9 when m <= 0.875 and x - 8 otherwise. The floor 1e-8 (the
# amax quantizer's) gives e = -35 for an all-zero row; any finite fp32 amax gives e <= 120, so 2^e
# and 2^-e are normal fp32 numbers. Inputs must be finite.


def _exp2i(e: torch.Tensor) -> torch.Tensor:
    """fp32 ``2^e`` for int32 ``e`` in [-126, 127], exactly (built from the exponent bits)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def pow2_exponent_ref(amax: torch.Tensor) -> torch.Tensor:
    """int32 ``e = ceil(log2(max(amax, AMAX_FLOOR) / 448))``, exact: the smallest integer with
    ``max(amax, 1e-8) <= 448 * 2^e`` (fp32 ``amax``, finite)."""
    a = amax.float().clamp_min(AMAX_FLOOR)
    m, x = torch.frexp(a)  # a = m * 2^x, 0.5 <= m < 1
    return (x.to(torch.int32) - 9 + (m > 0.875).to(torch.int32)).to(torch.int32)


def quantize_pow2_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 e4m3 quantization with power-of-two scales: ``(q [M, K] e4m3, scale [M, 1] fp32)``.

    ``scale = 2^e`` with ``e = pow2_exponent_ref(max|x_row|)`` and ``q = e4m3_rne(x * 2^-e)``: the
    product is exact (a power of two, |x * 2^-e| <= 448, no clamp needed) and the cast is torch's RNE.
    Same contract as ``quantize_ref(x, "fp8", "per_token")`` (``x ~ q * scale``), only the scale differs.
    """
    x32 = x.float()
    m, k = x32.shape
    amax = x32.abs().amax(dim=1, keepdim=True) if k > 0 else x32.new_zeros((m, 1))
    e = pow2_exponent_ref(amax)
    q = (x32 * _exp2i(-e)).to(torch.float8_e4m3fn)
    return q, _exp2i(e).contiguous()


def quantize_pow2_granules_ref(x: torch.Tensor, granule: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The intermediate of the fused pow2 path: codes at a power-of-two scale per (row, ``granule`` columns).

    Returns ``(c [M, K] e4m3, gamax [M, ceil(K / granule)] fp32)``: ``gamax`` the abs-max of each
    granule (the "partial" amax buffer of the GELU-epilogue GEMM) and ``c = e4m3_rne(x * 2^-e_g)``,
    ``e_g = pow2_exponent_ref(gamax)``. The per-token result is then ``c * 2^(e_g - e_row)`` rounded
    to e4m3 with ``e_row = max_g e_g`` (ceil o log2 is monotone, so that is the row's own exponent).
    """
    x32 = x.float()
    m, k = x32.shape
    g = _cdiv(k, granule)
    gamax = torch.nn.functional.pad(x32.abs(), (0, g * granule - k)).view(m, g, granule).amax(dim=2)
    inv = _exp2i(-pow2_exponent_ref(gamax)).repeat_interleave(granule, dim=1)[:, :k]
    return (x32 * inv).to(torch.float8_e4m3fn), gamax.contiguous()


def w8a8_gemm_ref(
    qa: torch.Tensor,  # [M, K] int8 | e4m3
    sa: torch.Tensor,  # [ceil(M/128), KB] (block128) | [M, 1] (per_token)
    qw: torch.Tensor,  # [N, K] int8 | e4m3 (nn.Linear layout, K contiguous)
    sw: torch.Tensor,  # [ceil(N/128), KB] (block128) | [N, 1] (per_channel)
    bias: torch.Tensor | None,  # [N]
    act_granularity: str,
    weight_granularity: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Exact scaled 8-bit GEMM ``y = sum_kb sA*sW*(qA_kb @ qW_kb^T) + bias`` in float64, cast last."""
    m, k = qa.shape
    n = qw.shape[0]
    kb_count = _cdiv(k, BLOCK)
    a = qa.to(torch.float64)
    w = qw.to(torch.float64)
    sa_full = expand_scale(sa.to(torch.float64), m, kb_count, act_granularity)  # [M, KB]
    sw_full = expand_scale(sw.to(torch.float64), n, kb_count, weight_granularity)  # [N, KB]
    y = torch.zeros(m, n, dtype=torch.float64, device=qa.device)
    for kb in range(kb_count):
        ks = slice(kb * BLOCK, min(k, (kb + 1) * BLOCK))
        part = a[:, ks] @ w[:, ks].T  # exact: see module docstring
        y += part * (sa_full[:, kb : kb + 1] * sw_full[:, kb][None, :])
    if bias is not None:
        y += bias.to(torch.float64)[None, :]
    return y.to(out_dtype)


def granule_sumsq_ref(y: torch.Tensor, granule: int = BLOCK) -> torch.Tensor:
    """fp32 ``[M, ceil(N / granule)]`` sums of squares of ``y [M, N]``'s values per (row, ``granule`` columns).

    The values are taken as y holds them (already rounded to its dtype), squared and summed in fp32; a
    partial last granule sums its real columns only. Same layout as the partial-amax buffer of the GEMM
    epilogues (``amax_mode="partial"``), which holds maxima instead of sums.
    """
    m, n = y.shape
    g = _cdiv(n, granule)
    sq = y.float().square()
    return torch.nn.functional.pad(sq, (0, g * granule - n)).view(m, g, granule).sum(dim=2)


def w8a8_gemm_sumsq_ref(qa, sa, qw, sw, bias, act_granularity: str, weight_granularity: str,
                        out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, sumsq)``: :func:`w8a8_gemm_ref` in ``out_dtype`` and :func:`granule_sumsq_ref` of that rounded y.

    ``sumsq[m, g]`` summed over g is the row's sum of squares, so ``rsqrt(sum_g sumsq / N + eps)`` is the
    RMSNorm statistic of the stored row without reading y again (the fused cross-attention's q norm).
    """
    y = w8a8_gemm_ref(qa, sa, qw, sw, bias, act_granularity, weight_granularity, out_dtype)
    return y, granule_sumsq_ref(y)


def w8a8_linear_ref(
    x: torch.Tensor,  # [M, K]
    qw: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
    act_granularity: str,
    weight_granularity: str,
) -> torch.Tensor:
    """Dynamic activation quantization followed by :func:`w8a8_gemm_ref`; output in x.dtype."""
    qa, sa = quantize_ref(x, fmt, act_granularity)
    return w8a8_gemm_ref(qa, sa, qw, sw, bias, act_granularity, weight_granularity, x.dtype)


# ------------------------------------------------------------------ GEMM + GELU epilogue (FFN)
#
# ``ffn.0 = GELU_tanh(W8A8 GEMM + bias)`` and, when its only consumers are W8A8 linears, the
# per-token quantization of that GELU output. The references reproduce the UNFUSED graph step by
# step (GEMM rounded to ``out_dtype``, GELU in ``out_dtype`` as ``F.gelu`` computes it, then the
# quantizer on the rounded GELU output), so the torch backend of the fused ops is bit-identical to
# the graph they replace. Memory traffic of that unfused chain per output element (bf16): GEMM
# writes y (2 B), GELU reads y and writes h (4 B), the quantizer reads h (2 B) and writes q (1 B):
# 9 B. The fused Triton path (kernels/w8a8/triton_gemm_epilogue.py) writes h (2 B) with the GELU
# applied to the fp32 accumulator, then one pass reads h and writes q (3 B): 5 B, and no GELU launch.


def gelu_tanh_ref(y: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, exactly as the captured graph computes it (``F.gelu`` in y's dtype).

    ``0.5 * y * (1 + tanh(sqrt(2/pi) * (y + 0.044715 * y^3)))`` == ``y * sigmoid(2u)`` with
    ``u = sqrt(2/pi) * (y + 0.044715 * y^3)``; the Triton epilogue uses the sigmoid form (no tanh
    in the interpreter, and it is overflow-safe).
    """
    return torch.nn.functional.gelu(y, approximate="tanh")


def w8a8_gemm_gelu_ref(qa, sa, qw, sw, bias, act_granularity: str, weight_granularity: str,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """``GELU_tanh(w8a8_gemm_ref(...))`` in ``out_dtype`` (the GEMM output rounded first, as unfused)."""
    y = w8a8_gemm_ref(qa, sa, qw, sw, bias, act_granularity, weight_granularity, out_dtype)
    return gelu_tanh_ref(y)


def w8a8_gemm_gelu_quant_ref(qa, sa, qw, sw, bias, act_granularity: str, weight_granularity: str,
                             out_dtype: torch.dtype, out_format: str, out_scale: str = "amax",
                             wbound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization (``out_format``) of :func:`w8a8_gemm_gelu_ref`.

    ``out_scale`` "amax": :func:`quantize_ref`; "pow2" (FP8 only): :func:`quantize_pow2_ref`; "bound"
    (FP8, per-token activations only): the scale of :func:`row_bound_scale_ref` (``wbound`` = the
    weight's :func:`gelu_bound_constants_ref`, computed here when None), codes by
    :func:`quantize_at_scale_ref`. Returns ``(q [M, N], scale [M, 1] fp32)``: what
    ``w8a8_linear_prequant`` consumes.
    """
    h = w8a8_gemm_gelu_ref(qa, sa, qw, sw, bias, act_granularity, weight_granularity, out_dtype)
    if out_scale in ("pow2", "bound") and out_format != "fp8":
        raise ValueError(f"w8a8_gemm_gelu_quant_ref: out_scale '{out_scale}' needs out_format 'fp8', got '{out_format}'")
    if out_scale == "pow2":
        return quantize_pow2_ref(h)
    if out_scale == "bound":
        if act_granularity != "per_token":
            raise ValueError(f"w8a8_gemm_gelu_quant_ref: out_scale 'bound' needs per_token activations, got "
                             f"'{act_granularity}'")
        if wbound is None:
            wbound = gelu_bound_constants_ref(qw, sw, bias, weight_granularity)
        scale = row_bound_scale_ref(qa, sa, wbound)
        return quantize_at_scale_ref(h, scale), scale
    return quantize_ref(h, out_format, "per_token")


# ------------------------------------------------------------------ "bound" scales
#
# A per-token FP8 scale that is known BEFORE the GEMM runs, so the GELU epilogue can store final FP8
# codes (no bf16 h, no amax pass, no requantization). For y = GEMM + bias and h = GELU_tanh(y):
# |h| <= |y| (h = y·(1 + tanh u)/2 and the factor lies in [0, 1]), and by Cauchy-Schwarz
# |y_mn| <= ||x̂_m||·||ŵ_n|| + |b_n| <= sa_m·||qa_m||·C + b, with x̂_m = sa_m·qa_m the dequantized
# input row, C = max_n ||ŵ_n|| and b = max_n |b_n|. The scale is the power of two covering that bound
# at 448, with BOUND_MARGIN (2^-6) for the fp32 roundings of the bound (K·2^-24 for the sum of
# squares) and the bf16 rounding of h (2^-9). The sm90 FP8 MMA accumulates with truncation, which
# measured only toward zero (H100, rows parallel to the largest weight row: -1.5% at K = 1536, -8% at
# K = 5120), i.e. it lowers |y|; the kernels clamp at ±448 in any case. Cost: the bound exceeds the
# row's true amax (H200 probe, RESULTS.md session 13: median 15-52x, up to 255x with outlier weight
# rows), which moves the row's smallest values toward e4m3's subnormal range (2^-6 of the scale): up
# to ~8 of e4m3's 17.8 binades in those rows (6% of codes subnormal at 14B vs 0.2% with pow2 scales);
# values near the amax keep their 3 mantissa bits, and ffn.2's output error measured equal to the pow2
# scales' (0.0372 vs fp32; amax scales 0.0363). The constants are fixed at optimize time: rewriting
# the weight afterwards (a LoRA merge) needs them recomputed, or codes may clip.
BOUND_MARGIN = 1.0 + 2.0 ** -6


def gelu_bound_constants_ref(qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
                             weight_granularity: str) -> torch.Tensor:
    """``[C, b]`` fp32 for the "bound" scale: C = max_n ||ŵ_n||_2 over the dequantized weight rows
    (float64, then rounded up to fp32), b = max_n |bias_n| (0 without a bias)."""
    n, k = qw.shape
    c = torch.zeros((), dtype=torch.float64, device=qw.device)
    if n and k and weight_granularity == "per_channel":  # sw_n·||qw_n||: one fp32 copy (exact for 8-bit codes)
        c = (torch.linalg.vector_norm(qw.float(), dim=1, dtype=torch.float64) * sw.to(torch.float64).view(-1)).max()
    elif n and k:
        kb = _cdiv(k, BLOCK)
        sfull = expand_scale(sw.to(torch.float64), n, kb, weight_granularity).repeat_interleave(BLOCK, dim=1)[:, :k]
        c = (qw.to(torch.float64) * sfull).norm(dim=1).max()
    b = bias.to(torch.float64).abs().max() if bias is not None and bias.numel() else torch.zeros_like(c)
    exact = torch.stack([c, b])
    out = exact.to(torch.float32)
    up = torch.nextafter(out, torch.full_like(out, float("inf")))
    return torch.where(out.double() < exact, up, out)  # never below the float64 value


def row_bound_scale_ref(qa: torch.Tensor, sa: torch.Tensor, wbound: torch.Tensor) -> torch.Tensor:
    """``[M, 1]`` fp32 powers of two ``2^e_m``, ``e_m = pow2_exponent_ref(B_m)``,
    ``B_m = (sa_m·sqrt(sum_k qa_mk^2)·C + b)·BOUND_MARGIN`` in fp32 (``wbound = [C, b]``). The Triton
    kernel sums the squares in another order and may contract ``·C + b`` into an FMA: its exponent can
    differ only when B_m lies within a few fp32 ulps of a power-of-two multiple of 448."""
    n2 = qa.float().square().sum(dim=1, keepdim=True)
    wb = wbound.float()
    bound = (sa.float() * torch.sqrt(n2) * wb[0] + wb[1]) * BOUND_MARGIN
    return _exp2i(pow2_exponent_ref(bound)).contiguous()


def quantize_at_scale_ref(h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes ``e4m3_rne(clamp(h / scale, ±448))`` of ``h [M, N]`` at given power-of-two row scales
    ``scale [M, 1]`` (the division is exact)."""
    return (h.float() * (1.0 / scale.float())).clamp(-FP8_QMAX, FP8_QMAX).to(torch.float8_e4m3fn)


def check_row_scale(op: str, row_scale: torch.Tensor, m: int, device: torch.device) -> None:
    """One-line ``ValueError`` unless ``row_scale`` is an ``[m, 1]`` fp32 tensor on ``device`` (the given
    power-of-two row scales of :func:`quantize_at_scale_ref`; their values are not inspected: no sync)."""
    if not isinstance(row_scale, torch.Tensor):
        raise ValueError(f"{op}: row_scale must be the [M, 1] fp32 row scales, got {type(row_scale).__name__}")
    if row_scale.dtype != torch.float32 or tuple(row_scale.shape) != (m, 1):
        raise ValueError(f"{op}: row_scale must be [M, 1] = [{m}, 1] float32 (one power-of-two scale per row), "
                         f"got {row_scale.dtype} {list(row_scale.shape)}")
    if row_scale.device != device:
        raise ValueError(f"{op}: row_scale is on {row_scale.device}, qx on {device}; both must share one device")


def w8a8_gemm_gelu_rowscale_ref(qa, sa, qw, sw, bias, act_granularity: str, weight_granularity: str,
                                out_dtype: torch.dtype, row_scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes ``[M, N]`` of :func:`w8a8_gemm_gelu_ref` (rounded to ``out_dtype``) at the given power-of-two
    row scales ``row_scale [M, 1]`` (:func:`quantize_at_scale_ref`). With ``row_scale =
    row_bound_scale_ref(qa, sa, wbound)`` these are the codes of :func:`w8a8_gemm_gelu_quant_ref` with
    ``out_scale="bound"``."""
    h = w8a8_gemm_gelu_ref(qa, sa, qw, sw, bias, act_granularity, weight_granularity, out_dtype)
    return quantize_at_scale_ref(h, row_scale)
