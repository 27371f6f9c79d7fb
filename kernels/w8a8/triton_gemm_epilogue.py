"""Triton W8A8 GEMM with a GELU (tanh) epilogue, optionally feeding a per-token quantizer (FFN ffn.0).

``h = GELU_tanh(sA*sW*(qA @ qW^T) + bias)`` is computed on the fp32 accumulator and stored once in
``out_dtype`` (the unfused graph instead stores the GEMM output, reads it back for GELU, stores h).
Scale modes are those of :mod:`.triton_gemm` (block-128 factors in the K loop, row-wise ones in the
epilogue); GELU uses ``y * sigmoid(2u)``, ``u = sqrt(2/pi) * (y + 0.044715 y^3)``, identical to
``0.5 y (1 + tanh(u))`` and overflow-safe (exp(-2u) -> inf gives -0, not NaN).

Per-token quantization of h for the next W8A8 linear needs each row's amax over ALL N columns, but
a row spans N/BLOCK_N program tiles. Two schemes (``amax_mode``), both two launches:

* ``"partial"`` (default): the GEMM epilogue also writes the amax of every 128-column granule of
  the ROUNDED h it stored into ``pamax [M, ceil(N/128)]`` fp32 (granules, not tiles, so the buffer
  does not depend on the autotuned BLOCK_N); then :func:`_quant_from_amax_kernel` reduces a row's
  granules (a few hundred bytes) and quantizes the row in one read of h. No atomics, deterministic.
* ``"atomic"``: the epilogue ``atomic_max``es its tile's row amax into a zeroed ``amax [M, 1]``;
  the same second kernel then reads one value per row. Costs a memset and contended atomics.
* ``"none"``: no amax in the epilogue; the standalone per-token quantizer re-derives it.

Traffic per h element (bf16): GEMM store 2 B, quantizer 2 B read + 1 B write, vs. 9 B and one
more launch for the unfused GEMM -> GELU -> quantizer chain. Codes are bit-identical to quantizing
the stored h with ``ref.quantize_ref`` (the amax is taken over the rounded values).

Per-token x per-channel on sm90+: :func:`w8a8_gemm_gelu_triton` runs the persistent TMA GEMM of
:mod:`.triton_gemm_tma` with its GELU / amax epilogue (all three amax modes, same contract) instead
of the pointer kernel below whenever that kernel's shape rule holds (see :func:`gelu_gemm_path`).

The pointer kernel's epilogue also runs without the GELU (``ACTIVATION`` 0) and with a gated residual
add (``RESIDUAL``, see ``_epilogue_math._gated_residual``): :mod:`.triton_gemm_residual` launches it
for the shapes the TMA kernel does not take (block-128 scales, unaligned rows, no sm90).

FP8 output with power-of-two per-token scales (``out_scale="pow2"`` of
:func:`w8a8_gemm_gelu_quant_triton`, :mod:`.triton_pow2`): on the TMA route (N % 16 == 0, K > 0) the
epilogue stores FP8 codes at per-granule power-of-two scales instead of bf16 h (1 B per element),
then a requantization moves them to the row scale; every other route (the pointer kernel: INT8
GEMMs, block-128 scales, no sm90) stores h with the partial amax and quantizes h with pow2 scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbocompile.kernels.w8a8 import _epilogue_math as _em
from turbocompile.kernels.w8a8._epilogue_math import (AMAX_GRANULE, AMAX_MODE_IDS, ResidualArgs, _gated_residual,
                                                      _gelu_tanh, _round_bf16_rne)
from turbocompile.kernels.w8a8._tiling import grouped_tile

from turbocompile.kernels.w8a8.triton_quant import AMAX_FLOOR, dequant_scale, quant_scale_math, quantize_triton
from turbocompile.ops._backend import triton_interpret

__all__ = ["w8a8_gemm_gelu_triton", "w8a8_gemm_gelu_quant_triton", "gelu_gemm_path", "AMAX_MODES",
           "DEFAULT_AMAX_MODE", "AMAX_GRANULE", "USE_TMA"]

AMAX_MODES = ("partial", "atomic", "none")
DEFAULT_AMAX_MODE = "partial"
# Per-token x per-channel FP8 GELU GEMMs on CUDA sm90+: use the persistent TMA kernel (triton_gemm_tma,
# GELU + amax epilogue) where its shape rule allows (True), or always the pointer kernel below
# (False); INT8 takes the pointer kernel unless use_tma=True (see gelu_gemm_path). The ``use_tma`` argument of w8a8_gemm_gelu_triton overrides it per call. Separate from
# triton_gemm.USE_TMA (the plain GEMM), so either can be switched off alone.
USE_TMA = True
# AMAX_GRANULE (128 columns per partial-amax entry) and the jit helpers _gelu_tanh / _round_bf16_rne
# live in _epilogue_math, shared with the TMA kernel; every BLOCK_N of _configs is a multiple of 128.


@triton.jit
def _w8a8_gemm_gelu_kernel(
    a_ptr,  # [M, K] int8 | e4m3
    w_ptr,  # [N, K] int8 | e4m3
    sa_ptr,  # [ceil(M/128), KB] | [M, 1] fp32
    sw_ptr,  # [ceil(N/128), KB] | [N, 1] fp32
    bias_ptr,  # [N] or dummy
    y_ptr,  # [M, N] out dtype (GELU output)
    amax_ptr,  # [M, ceil(N/128)] (partial) | [M, 1] zeroed (atomic) | dummy (none)
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_sam,
    stride_sak,
    stride_swn,
    stride_swk,
    stride_ym,
    stride_yn,
    stride_amax_m,
    res_ptr,  # residual x [M, N] in y's dtype, unit column stride (RESIDUAL), else a dummy
    gate_ptr,  # gate as a [B, L, N] broadcast view (RESIDUAL 2), else a dummy
    L,  # rows per sample (M = B * L), for the gate's batch index
    stride_rm,
    stride_gb,
    stride_gl,
    A_BLOCK: tl.constexpr,
    W_BLOCK: tl.constexpr,
    IS_FP8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # interpreter + bf16 output: round explicitly (see _round_bf16_rne)
    NATIVE: tl.constexpr,  # GELU form: 0 portable (interpreter), 1 / 2 inline PTX (_epilogue_math.gelu_native)
    AMAX_MODE: tl.constexpr,  # 0 none, 1 partial (per 128-column granule), 2 atomic (per row)
    ACTIVATION: tl.constexpr,  # 0 none, 1 GELU (tanh form)
    RESIDUAL: tl.constexpr,  # 0 none, 1 x + y, 2 x + y·gate (_epilogue_math.RESIDUAL_IDS)
    GATE_MODE: tl.constexpr,  # how the gate rows are read (_epilogue_math._gated_residual)
    GRANULE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    SCALE_IN_LOOP: tl.constexpr = A_BLOCK or W_BLOCK
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm_true = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_true = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rm_true % M  # wrapped rows/columns: unmasked loads, masked stores
    rn = rn_true % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not SCALE_IN_LOOP:
        if not IS_FP8:
            acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    sa_blk_ptr = sa_ptr + ((pid_m * BLOCK_M) // 128) * stride_sam
    sw_blk_ptrs = sw_ptr + (rn // 128) * stride_swn

    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(rk < k_left)[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=(rk < k_left)[:, None], other=0.0)
        if SCALE_IN_LOOP:
            if IS_FP8:
                part = tl.dot(a, w)
            else:
                part = tl.dot(a, w, out_dtype=tl.int32).to(tl.float32)
            if A_BLOCK:
                s_a = tl.load(sa_blk_ptr + kb * stride_sak)
                if W_BLOCK:
                    acc += part * (s_a * tl.load(sw_blk_ptrs + kb * stride_swk))[None, :]
                else:
                    acc += part * s_a
            else:
                acc += part * tl.load(sw_blk_ptrs + kb * stride_swk)[None, :]
        else:
            if IS_FP8:
                acc = tl.dot(a, w, acc)
            else:
                acc_i = tl.dot(a, w, acc_i, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if not SCALE_IN_LOOP:
        if not IS_FP8:
            acc = acc_i.to(tl.float32)
    if not A_BLOCK:
        acc = acc * tl.load(sa_ptr + rm * stride_sam)[:, None]
    if not W_BLOCK:
        acc = acc * tl.load(sw_ptr + rn * stride_swn)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    h = acc
    if ACTIVATION == 1:
        h = _gelu_tanh(h, NATIVE)
    if RESIDUAL != 0:
        # wrapped rows/columns: in bounds, unmasked; the result is exact in y's dtype
        x = tl.load(res_ptr + rm[:, None].to(tl.int64) * stride_rm + rn[None, :])
        h = _gated_residual(h, x, gate_ptr, rm, rn, pid_m * BLOCK_M, M, N, L, stride_gb, stride_gl, RESIDUAL,
                            GATE_MODE, NATIVE != 0)
    elif ROUND_BF16:
        h = _round_bf16_rne(h)
    h = h.to(y_ptr.dtype.element_ty)
    row_ok = rm_true < M
    col_ok = rn_true < N
    mask = row_ok[:, None] & col_ok[None, :]
    y_ptrs = y_ptr + rm_true[:, None].to(tl.int64) * stride_ym + rn_true[None, :] * stride_yn
    tl.store(y_ptrs, h, mask=mask)
    if AMAX_MODE != 0:
        # amax of exactly the values stored (rounded), over real columns only
        ah = tl.where(mask, tl.abs(h.to(tl.float32)), 0.0)
        if AMAX_MODE == 1:
            G: tl.constexpr = BLOCK_N // GRANULE
            gmax = tl.max(tl.reshape(ah, (BLOCK_M, G, GRANULE)), axis=2)  # [BLOCK_M, G]
            rg = pid_n * G + tl.arange(0, G)
            g_ok = rg < tl.cdiv(N, GRANULE)
            tl.store(amax_ptr + rm_true[:, None].to(tl.int64) * stride_amax_m + rg[None, :], gmax,
                     mask=row_ok[:, None] & g_ok[None, :])
        else:
            tl.atomic_max(amax_ptr + rm_true.to(tl.int64) * stride_amax_m, tl.max(ah, axis=1), mask=row_ok)


@triton.jit
def _quant_from_amax_kernel(
    h_ptr,  # [M, N] bf16/fp16/fp32
    amax_ptr,  # [M, G] fp32 partial maxima (G = 1 for the atomic mode)
    q_ptr,  # [M, N] int8/e4m3 contiguous
    s_ptr,  # [M, 1] fp32
    M,
    N,
    G,
    stride_hm,
    stride_hn,
    stride_amax_m,
    stride_qm,
    IS_FP8: tl.constexpr,
    USE_RINT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # BLOCK_M rows per program: reduce the row's partial maxima, then one sweep over the row.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    rg = tl.arange(0, BLOCK_G)
    pa = tl.load(amax_ptr + rm[:, None].to(tl.int64) * stride_amax_m + rg[None, :],
                 mask=row_ok[:, None] & (rg < G)[None, :], other=0.0)
    amax = tl.maximum(tl.max(pa, axis=1), AMAX_FLOOR)  # [BLOCK_M]
    h_rows = h_ptr + rm[:, None].to(tl.int64) * stride_hm
    q_rows = q_ptr + rm[:, None].to(tl.int64) * stride_qm
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (rn < N)[None, :]
        x = tl.load(h_rows + rn[None, :] * stride_hn, mask=mask, other=0.0).to(tl.float32)
        q, s = quant_scale_math(x, amax[:, None], IS_FP8, USE_RINT)
        tl.store(q_rows + rn[None, :], q, mask=mask)
    tl.store(s_ptr + rm, dequant_scale(amax, IS_FP8), mask=row_ok)


def _configs(scale_in_loop: bool) -> list:
    cfgs = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=s) for s in (3, 4)]
    if not scale_in_loop:
        cfgs.append(triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=3))
    cfgs.append(triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4))
    return cfgs


_TUNED: dict[bool, object] = {}


def _tuned(scale_in_loop: bool):
    if scale_in_loop not in _TUNED:
        _TUNED[scale_in_loop] = triton.autotune(
            configs=_configs(scale_in_loop),
            key=["M_BUCKET", "N", "K", "IS_FP8", "A_BLOCK", "W_BLOCK", "HAS_BIAS", "AMAX_MODE", "ACTIVATION",
                 "RESIDUAL", "GATE_MODE"],
        )(_w8a8_gemm_gelu_kernel)
    return _TUNED[scale_in_loop]


def _amax_buffer(m: int, n: int, mode: str, device) -> torch.Tensor | None:
    if mode == "partial":
        return torch.empty((m, triton.cdiv(n, AMAX_GRANULE)), dtype=torch.float32, device=device)
    if mode == "atomic":
        return torch.zeros((m, 1), dtype=torch.float32, device=device)  # a memset: graph-capturable
    return None


def w8a8_gemm_gelu_triton(
    qa: torch.Tensor,
    sa: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None,
    act_granularity: str,
    weight_granularity: str,
    out_dtype: torch.dtype,
    amax_mode: str = "none",
    config: dict | None = None,
    use_tma: bool | None = None,
    tma_config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h = GELU_tanh(scaled 8-bit GEMM + bias)`` [M, N] in ``out_dtype``; returns ``(h, amax)``.

    ``amax`` is the partial-maxima buffer of ``amax_mode`` (None for "none"). Inputs are validated by
    the op layer.

    Args:
        config: pointer kernel: fixed ``{"BLOCK_M", "BLOCK_N", "GROUP_M", "num_warps", "num_stages"}``
            (BLOCK_N a multiple of 128, BLOCK_M dividing 128) instead of autotuning; always fixed
            under the CPU interpreter.
        use_tma: per_token x per_channel only: None = :data:`USE_TMA` on CUDA sm90+ (never under the
            interpreter); True = the TMA kernel whenever the shape rule allows (CUDA sm90+ or the
            interpreter, else ValueError); False = the pointer kernel. See :func:`gelu_gemm_path`.
        tma_config: fixed config of the TMA kernel (see ``triton_gemm_tma.w8a8_gemm_tma``; with the
            partial amax its stored width must be a multiple of 128).
    """
    if amax_mode not in AMAX_MODES:
        raise ValueError(f"w8a8_gemm_gelu_triton: unknown amax_mode '{amax_mode}'; valid: {', '.join(AMAX_MODES)}")
    m, k = qa.shape
    n, k2 = qw.shape
    if k != k2:
        raise ValueError(f"w8a8_gemm_gelu_triton: K mismatch, activation {tuple(qa.shape)} vs weight {tuple(qw.shape)}")
    path = gelu_gemm_path(qa, qw, out_dtype, act_granularity, weight_granularity, use_tma)[0]
    amax = _amax_buffer(m, n, amax_mode, qa.device)
    if path == "tma":
        from turbocompile.kernels.w8a8.triton_gemm_tma import w8a8_gemm_tma

        h = w8a8_gemm_tma(qa, sa, qw, sw, bias, out_dtype, config=tma_config, activation="gelu_tanh",
                          amax_mode=amax_mode, amax_out=amax)
        return h, amax
    y = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    if m == 0 or n == 0:
        return y, amax
    if k == 0:  # degenerate: GELU(bias); keep the amax contract with torch ops
        b = bias.to(torch.float32) if bias is not None else torch.zeros(n, device=qa.device)
        y.copy_(torch.nn.functional.gelu(b, approximate="tanh").to(out_dtype).expand(m, n))
        if amax is not None:
            amax.copy_(y.float().abs().amax(dim=1, keepdim=True).expand_as(amax))
        return y, amax
    _launch_pointer(qa, sa, qw, sw, bias, act_granularity, weight_granularity, y, amax, amax_mode, 1, None, config,
                    "w8a8_gemm_gelu_triton")
    return y, amax


def _launch_pointer(qa, sa, qw, sw, bias, act_granularity: str, weight_granularity: str, y: torch.Tensor,
                    amax: torch.Tensor | None, amax_mode: str, activation: int, res: ResidualArgs | None,
                    config: dict | None, caller: str) -> None:
    """Launch the pointer epilogue kernel writing ``y [M, N]`` (M, N, K > 0; inputs checked by the caller)."""
    m, k = qa.shape
    n = qw.shape[0]
    is_fp8 = qw.dtype == torch.float8_e4m3fn
    a_block = act_granularity == "block128"
    w_block = weight_granularity == "block128"
    amax_arg = amax if amax is not None else sw
    gate = res.gate if res is not None and res.gate is not None else sw
    args = (
        qa, qw, sa, sw, bias if bias is not None else sw, y, amax_arg, m, n, k, min(triton.next_power_of_2(m), 8192),
        qa.stride(0), qa.stride(1), qw.stride(0), qw.stride(1), sa.stride(0), sa.stride(1),
        sw.stride(0), sw.stride(1), y.stride(0), y.stride(1), amax.stride(0) if amax is not None else 0,
        res.x if res is not None else sw, gate, res.L if res is not None else 1,
        res.x.stride(0) if res is not None else 0, res.stride_gb if res is not None else 0,
        res.stride_gl if res is not None else 0,
    )
    residual = _em.RESIDUAL_IDS["none" if res is None else "add" if res.gate is None else "gated"]
    meta = dict(A_BLOCK=a_block, W_BLOCK=w_block, IS_FP8=is_fp8, HAS_BIAS=bias is not None, EVEN_K=k % 128 == 0,
                ROUND_BF16=triton_interpret() and y.dtype == torch.bfloat16, NATIVE=_em.gelu_native(triton_interpret()),
                AMAX_MODE=AMAX_MODE_IDS[amax_mode], ACTIVATION=activation, RESIDUAL=residual,
                GATE_MODE=0 if res is None else res.gate_mode, GRANULE=AMAX_GRANULE, BLOCK_K=128)
    if config is None and triton_interpret():
        config = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    if config is not None:
        if config["BLOCK_N"] % AMAX_GRANULE or 128 % config["BLOCK_M"]:
            raise ValueError(f"{caller}: BLOCK_N must be a multiple of 128 and BLOCK_M divide 128")
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        _w8a8_gemm_gelu_kernel[grid](*args, **meta, **config)
        return

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

    _tuned(a_block or w_block)[grid](*args, **meta)


def gelu_gemm_path(qa: torch.Tensor, qw: torch.Tensor, out_dtype: torch.dtype, act_granularity: str,
                   weight_granularity: str, use_tma: bool | None = None) -> tuple[str, str]:
    """Which kernel :func:`w8a8_gemm_gelu_triton` runs: ``("tma" | "pointer", why)``.

    The rule of ``triton_gemm.gemm_path`` (decided before any launch, never by catching a failure),
    with this module's :data:`USE_TMA`:
    1. ``use_tma=False``, or ``None`` with :data:`USE_TMA` off -> pointer; ``None`` with INT8 codes
       -> pointer too (the TMA GELU kernel measured no faster for INT8).
    2. Shape rule (``triton_gemm_tma.tma_unsupported_reason``): per_token x per_channel, 16-byte
       aligned operand rows (K % 16 == 0 for contiguous 8-bit codes) and bases, output row
       N * itemsize % 16 == 0. Any failed condition -> pointer.
    3. Hardware: ``None`` needs a CUDA device of capability >= 9.0 (else pointer; the CPU
       interpreter also takes the pointer kernel by default); ``True`` needs sm90+ or the
       interpreter and raises ValueError otherwise (an impossible request).
    Every amax mode runs on either kernel, so it does not enter the rule.
    """
    if use_tma is False or (use_tma is None and not USE_TMA):
        return "pointer", "TMA off"
    if use_tma is None and qw.dtype != torch.float8_e4m3fn:
        # H200, ffn.0 at 1.3B (benchmarks/RESULTS.md, session 5): INT8 GELU GEMM 1.236 ms TMA vs 1.233
        # pointer, and the pointer kernel's partial amax is cheaper; FP8 0.974 vs 1.133 ms. Session 10
        # (tanh GELU): INT8 1.024 TMA vs 1.058 pointer, but with the quantizer 1.246 vs 1.250: a tie
        return "pointer", "INT8 codes (the TMA GELU kernel is no faster)"
    from turbocompile.kernels.w8a8.triton_gemm import tma_route

    return tma_route(qa, qw, out_dtype, act_granularity, weight_granularity, False, use_tma, "w8a8_gemm_gelu_triton")


def quantize_from_amax_triton(h: torch.Tensor, amax: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of ``h [M, N]`` given partial row maxima ``amax [M, G]`` (G >= 1)."""
    m, n = h.shape
    is_fp8 = fmt == "fp8"
    q = torch.empty((m, n), dtype=torch.float8_e4m3fn if is_fp8 else torch.int8, device=h.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=h.device)
    if m == 0:
        return q, s
    g = amax.shape[1]
    block_n = min(1024, max(16, triton.next_power_of_2(n)))
    block_m = max(1, min(8, 4096 // block_n))
    _quant_from_amax_kernel[(triton.cdiv(m, block_m),)](
        h, amax, q, s, m, n, g, h.stride(0), h.stride(1), amax.stride(0), q.stride(0),
        IS_FP8=is_fp8, USE_RINT=not triton_interpret(), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_G=max(2, triton.next_power_of_2(g)), num_warps=4 if block_m * block_n <= 2048 else 8,
    )
    return q, s


def w8a8_gemm_gelu_quant_triton(
    qa, sa, qw, sw, bias, act_granularity: str, weight_granularity: str, out_dtype: torch.dtype, out_format: str,
    amax_mode: str | None = None, config: dict | None = None, use_tma: bool | None = None,
    tma_config: dict | None = None, out_scale: str = "amax", pow2_config: dict | None = None,
    wbound: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU-epilogue GEMM then per-token quantization of its (rounded) output: ``(q [M, N], s [M, 1])``.

    ``amax_mode`` None: "none" on the TMA path (GELU epilogue without an amax, then the one/two-tile
    per-token quantizer: 1.220 ms vs 1.475 ms with the partial amax, FP8 ffn.0 at 1.3B on an H200),
    :data:`DEFAULT_AMAX_MODE` on the pointer path; "none" runs the standalone per-token quantizer.
    ``config`` / ``use_tma`` / ``tma_config``: as in :func:`w8a8_gemm_gelu_triton`.
    ``out_scale``: "amax" (scale amax/qmax, ``ref.quantize_ref``) or "pow2" (FP8 only, scale
    2^ceil(log2(amax/448)), ``ref.quantize_pow2_ref``; ``amax_mode`` is then ignored): see
    :func:`_gelu_quant_pow2` for its routes. ``pow2_config``: launch override of its row kernel.
    "bound" (FP8, per-token activations; ``amax_mode`` ignored): power-of-two row scales from an upper
    bound of |h| known before the GEMM (``ref.row_bound_scale_ref``; ``wbound`` the weight's ``[C, b]``,
    computed when None), the epilogue storing the final codes: :func:`.triton_bound.gelu_quant_bound`.
    """
    if out_scale in ("pow2", "bound") and out_format != "fp8":
        raise ValueError(f"w8a8_gemm_gelu_quant_triton: out_scale '{out_scale}' needs out_format 'fp8', "
                         f"got '{out_format}'")
    if out_scale == "bound":
        from turbocompile.kernels.w8a8.triton_bound import gelu_quant_bound

        return gelu_quant_bound(qa, sa, qw, sw, bias, act_granularity, weight_granularity, out_dtype, wbound, config,
                                use_tma, tma_config)
    if out_scale == "pow2":
        return _gelu_quant_pow2(qa, sa, qw, sw, bias, act_granularity, weight_granularity, out_dtype, config, use_tma,
                                tma_config, pow2_config)
    if out_scale != "amax":
        raise ValueError(f"w8a8_gemm_gelu_quant_triton: unknown out_scale '{out_scale}'; valid: amax, pow2, bound")
    mode = amax_mode
    if mode is None:
        path = gelu_gemm_path(qa, qw, out_dtype, act_granularity, weight_granularity, use_tma)[0]
        mode = "none" if path == "tma" else DEFAULT_AMAX_MODE
    h, amax = w8a8_gemm_gelu_triton(qa, sa, qw, sw, bias, act_granularity, weight_granularity, out_dtype,
                                    amax_mode=mode, config=config, use_tma=use_tma, tma_config=tma_config)
    if amax is None or h.shape[1] == 0:
        return quantize_triton(h, out_format, "per_token")
    return quantize_from_amax_triton(h, amax, out_format)


def _gelu_quant_pow2(qa, sa, qw, sw, bias, act_granularity, weight_granularity, out_dtype, config, use_tma,
                     tma_config, pow2_config) -> tuple[torch.Tensor, torch.Tensor]:
    """``out_scale="pow2"``: ``(q e4m3 [M, N], s = 2^e_row [M, 1])``, see :mod:`.triton_pow2`.

    TMA route with N % 16 == 0 and K > 0: the GEMM stores FP8 codes at per-granule power-of-two scales
    plus the granule maxima, then :func:`.triton_pow2.requant_pow2_triton` moves them to the row scale
    in place (codes equal ``ref.quantize_pow2_ref`` of the rounded h except possibly one subnormal
    step on codes below 2^-6). Otherwise: bf16 h with the partial amax (TMA or pointer kernel), then
    :func:`.triton_pow2.quantize_pow2_from_amax_triton` (bit-equal to the reference).
    """
    from turbocompile.kernels.w8a8.triton_pow2 import quantize_pow2_from_amax_triton, requant_pow2_triton

    m, k = qa.shape
    n = qw.shape[0]
    path = gelu_gemm_path(qa, qw, out_dtype, act_granularity, weight_granularity, use_tma)[0]
    if path == "tma" and n % 16 == 0 and k > 0 and m > 0:
        from turbocompile.kernels.w8a8.triton_gemm_tma import w8a8_gemm_tma

        amax = _amax_buffer(m, n, "partial", qa.device)
        codes = w8a8_gemm_tma(qa, sa, qw, sw, bias, out_dtype, config=tma_config, activation="gelu_tanh",
                              amax_mode="pow2", amax_out=amax)
        return requant_pow2_triton(codes, amax, pow2_config)
    h, amax = w8a8_gemm_gelu_triton(qa, sa, qw, sw, bias, act_granularity, weight_granularity, out_dtype,
                                    amax_mode="partial", config=config, use_tma=use_tma, tma_config=tma_config)
    return quantize_pow2_from_amax_triton(h, amax, pow2_config)
