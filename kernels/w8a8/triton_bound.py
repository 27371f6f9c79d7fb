"""Per-token FP8 with "bound" scales: the GELU GEMM's epilogue stores the final codes directly.

Semantics: :func:`turbocompile.kernels.w8a8.ref.row_bound_scale_ref` (a power-of-two row scale from an
upper bound of the row's |GELU(GEMM + bias)|, computable before the GEMM) and
:func:`~turbocompile.kernels.w8a8.ref.quantize_at_scale_ref` (codes of the rounded h at that scale).

Two launches instead of the "pow2" path's GEMM + requantization or the "amax" path's GEMM + quantizer:

1. :func:`row_bound_scale_triton`: reads the 8-bit GEMM input ``qa [M, K]`` (1 B per element, K = the
   model dim) and writes ``s [M, 1]``.
2. The TMA GEMM with ``amax_mode="rowscale"`` (:func:`rowscale_codes` in its epilogue): the GELU output,
   rounded to the output dtype, times ``1 / s`` (exact), cast to e4m3. 1 B stored per element of h and
   nothing read back.

When qa comes from the fused LayerNorm that quantizes it, launch 1 is gone: that kernel holds each row's
codes in registers and writes ``s`` beside them (:func:`bound_row_scale` on its sum of squared codes;
``turbocompile::ln_modulate_quant_bound``), and the GEMM takes ``s`` as ``row_scale``
(``turbocompile::w8a8_linear_gelu_quant_rowscale``).

Any other kernel route (pointer kernel: INT8 inputs without TMA, N % 16 != 0) computes bf16 h and
quantizes it at the same scales with torch ops (same codes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbocompile.kernels.w8a8 import ref
from turbocompile.kernels.w8a8.triton_pow2 import _as_f32, _e4m3, exp2_int, pow2_exponent
from turbocompile.kernels.w8a8.triton_quant import AMAX_FLOOR
from turbocompile.ops._backend import triton_interpret

__all__ = ["rowscale_codes", "bound_row_scale", "row_bound_scale_triton", "gelu_quant_bound"]

BOUND_MARGIN = tl.constexpr(ref.BOUND_MARGIN)


@triton.jit
def rowscale_codes(
    out,  # [BLOCK_M, WIDTH] the epilogue's output tile, rounded to h's dtype
    s_ptr,  # [M, 1] fp32 power-of-two row scales (read)
    rm,  # [BLOCK_M] row indices of the tile
    M,
    stride_sm,
    NATIVE: tl.constexpr,  # hardware e4m3 cast (GPU) or the explicit grid rounding (interpreter)
):
    """e4m3 codes ``e4m3_rne(clamp(h / s_row, ±448))`` of the tile (``ref.quantize_at_scale_ref``)."""
    s = tl.load(s_ptr + rm * stride_sm, mask=rm < M, other=1.0)
    v = _as_f32(out) * (1.0 / s)[:, None]  # exact: s is a power of two
    return _e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0), NATIVE)


@triton.jit
def bound_row_scale(n2, sa, c, b):
    """fp32 power-of-two "bound" row scales ``2^pow2_exponent(max(B, 1e-8))`` with
    ``B = (sa·sqrt(n2)·C + b)·BOUND_MARGIN`` (``ref.row_bound_scale_ref``), from each row's sum of squared
    8-bit codes ``n2`` and its dequantisation scale ``sa`` (tensors of one shape), ``C, b`` the weight's
    constants. Shared by :func:`_row_bound_kernel` and the LayerNorm kernel that writes the codes
    (``kernels/norms/triton_layernorm.py``), so both compute the one formula."""
    bound = (sa * tl.sqrt_rn(n2) * c + b) * BOUND_MARGIN
    return exp2_int(pow2_exponent(tl.maximum(bound, AMAX_FLOOR)))


@triton.jit
def _row_bound_kernel(
    qa_ptr,  # [M, K] int8 | e4m3
    sa_ptr,  # [M, 1] fp32
    wb_ptr,  # [2] fp32: C = max_n ||ŵ_n||, b = max_n |bias_n|
    s_ptr,  # [M, 1] fp32 out
    M,
    K,
    stride_qm,
    stride_sm,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    rows = qa_ptr + rm[:, None].to(tl.int64) * stride_qm
    n2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
        n2 += tl.sum(x * x, axis=1)
    sa = tl.load(sa_ptr + rm * stride_sm, mask=row_ok, other=0.0)
    c = tl.load(wb_ptr)
    b = tl.load(wb_ptr + 1)
    tl.store(s_ptr + rm, bound_row_scale(n2, sa, c, b), mask=row_ok)


def row_bound_scale_triton(qa: torch.Tensor, sa: torch.Tensor, wbound: torch.Tensor) -> torch.Tensor:
    """``s [M, 1]`` fp32, the "bound" row scales of ``ref.row_bound_scale_ref`` (exponents equal except
    within a few ulps of a boundary: the squares are summed in another order, ``·C + b`` may be an FMA).

    Args:
        qa: [M, K] int8 / float8_e4m3fn, contiguous rows (the GELU GEMM's quantized input).
        sa: [M, 1] fp32 per-token scales of qa.
        wbound: [2] fp32 ``[C, b]`` (``ref.gelu_bound_constants_ref`` of the GEMM's weight and bias).
    """
    m, k = qa.shape
    if qa.stride(1) != 1 and k > 1:
        raise ValueError("row_bound_scale_triton: qa needs contiguous rows")
    if tuple(sa.shape) != (m, 1):
        raise ValueError(f"row_bound_scale_triton: sa must be [M, 1] = [{m}, 1], got {list(sa.shape)}")
    if tuple(wbound.shape) != (2,) or wbound.device != qa.device:
        raise ValueError(f"row_bound_scale_triton: wbound must be the [2] [C, b] on {qa.device}, got "
                         f"{list(wbound.shape)} on {wbound.device}")
    s = torch.empty((m, 1), dtype=torch.float32, device=qa.device)
    if m == 0:
        return s
    block_k = 256 if k > 128 else max(16, triton.next_power_of_2(max(k, 1)))
    block_m = 16 if triton_interpret() else 8
    sa32 = sa.float()  # a copy unless fp32 already: its own stride
    _row_bound_kernel[(triton.cdiv(m, block_m),)](
        qa, sa32, wbound.float().contiguous(), s, m, k, qa.stride(0), sa32.stride(0),
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )
    return s


def gelu_quant_bound(qa, sa, qw, sw, bias, act_granularity, weight_granularity, out_dtype, wbound, config=None,
                     use_tma=None, tma_config=None, row_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``out_scale="bound"`` of ``w8a8_gemm_gelu_quant_triton``: ``(q e4m3 [M, N], s [M, 1])``.

    ``row_scale``: ``[M, 1]`` fp32 power-of-two row scales computed already (the bound scales the LayerNorm
    kernel that wrote qa computed, ``turbocompile::*ln_modulate_quant_bound``); then no row-bound kernel runs
    and the returned ``s`` is that tensor (``turbocompile::w8a8_linear_gelu_quant_rowscale`` returns q only).
    Otherwise ``s = row_bound_scale_triton(qa, sa, wbound)``, with ``wbound`` None computed here from the
    weight (``ref.gelu_bound_constants_ref``; a graph pass computes it once at optimize time instead)."""
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import gelu_gemm_path, w8a8_gemm_gelu_triton

    if act_granularity != "per_token":
        raise ValueError(f"w8a8_gemm_gelu_quant_triton: out_scale 'bound' needs per_token activations, got "
                         f"'{act_granularity}'")
    if row_scale is not None:
        ref.check_row_scale("gelu_quant_bound", row_scale, qa.shape[0], qa.device)
        s = row_scale
    else:
        if wbound is None:
            wbound = ref.gelu_bound_constants_ref(qw, sw, bias, weight_granularity)
        s = row_bound_scale_triton(qa, sa, wbound)
    m, k = qa.shape
    n = qw.shape[0]
    path = gelu_gemm_path(qa, qw, out_dtype, act_granularity, weight_granularity, use_tma)[0]
    if path == "tma" and n % 16 == 0 and k > 0 and m > 0:
        from turbocompile.kernels.w8a8.triton_gemm_tma import w8a8_gemm_tma

        codes = w8a8_gemm_tma(qa, sa, qw, sw, bias, out_dtype, config=tma_config, activation="gelu_tanh",
                              amax_mode="rowscale", amax_out=s)
        return codes, s
    h, _ = w8a8_gemm_gelu_triton(qa, sa, qw, sw, bias, act_granularity, weight_granularity, out_dtype,
                                 amax_mode="none", config=config, use_tma=use_tma, tma_config=tma_config)
    return ref.quantize_at_scale_ref(h, s), s
