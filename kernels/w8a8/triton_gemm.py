"""Triton scaled 8-bit GEMM for W8A8 linears: ``y = sum_kb sA*sW*(qA_kb @ qW_kb^T) + bias``.

Layouts: qA [M, K] row-major (K contiguous); qW [N, K] as nn.Linear stores it (K contiguous), read
as [BLOCK_K, BLOCK_N] tiles of W^T. K-contiguous B tiles are what Hopper's 8-bit wgmma needs (it
only takes K-major operands for int8/e4m3), so no transposed copy of the weight is kept.

Scales (fp32):
* block128 (A: [ceil(M/128), KB], W: [ceil(N/128), KB]): applied inside the K loop. BLOCK_K is 128
  and BLOCK_M divides 128, so a tile of A has ONE scale per K block (a scalar load), W has one per
  128 columns (a [BLOCK_N] vector). Each K step: int32 (int8) / fp32 (fp8) partial dot, then
  ``acc += partial * (sA * sW)`` in fp32 registers (TD's scheme).
* per_token [M, 1] / per_channel [N, 1]: one accumulator over all of K, scaled in the epilogue.
  Mixed pairs work too: the row-wise factor goes to the epilogue, the block one to the loop.
Bias (any float dtype, [N]) is added in fp32 in the epilogue; the output is cast to y's dtype.

FUSE_QUANT (block128 activations only, BLOCK_M == 128): A is read as bf16/fp16/fp32 and each
128x128 tile is quantized in registers (TD-exact, same code as the standalone quantizer) right
before its dot: no qA round trip through memory, at the price of redoing the quantization once
per N tile.

Rows/columns past M/N: loads wrap (``% M``) so they need no mask (except the fused-quant A load,
whose amax must not see other rows), stores are masked. K tails are masked unless EVEN_K.

Per-token x per-channel on sm90+: :func:`w8a8_gemm_triton` runs the persistent TMA kernel of
:mod:`.triton_gemm_tma` instead of the pointer kernel below whenever that kernel's shape rule holds
(16-byte aligned rows: K % 16 == 0, N * out_itemsize % 16 == 0; see :func:`gemm_path`).
:func:`w8a8_gemm_sumsq_triton` is that GEMM plus the fp32 sums of squares of its stored output per
(row, 128 columns), from the TMA kernel's epilogue where it runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbocompile.kernels.w8a8._tiling import grouped_tile

from turbocompile.kernels.w8a8.triton_quant import AMAX_FLOOR, quant_scale_math
from turbocompile.ops._backend import triton_interpret

__all__ = ["w8a8_gemm_triton", "w8a8_gemm_sumsq_triton", "gemm_configs", "gemm_path", "DEFAULT_BLOCK_VARIANT",
           "USE_TMA"]

# block128 x block128 (not fused) runs kernels/w8a8/triton_gemm_block.py; "v1" = the generic
# kernel below (round 1). Picked from the side-by-side H200 run in benchmarks/RESULTS.md.
DEFAULT_BLOCK_VARIANT = {"int8": "scalar", "fp8": "scalar"}

# Per-token x per-channel GEMMs on CUDA sm90+: use the persistent TMA kernel (triton_gemm_tma)
# where its shape rule allows (True), or always the pointer kernel below (False). The
# ``use_tma`` argument of w8a8_gemm_triton overrides it per call (the benchmark times both).
USE_TMA = True


@triton.jit
def _w8a8_gemm_kernel(
    a_ptr,  # [M, K] int8 | e4m3 (or bf16/fp16/fp32 when FUSE_QUANT)
    w_ptr,  # [N, K] int8 | e4m3
    sa_ptr,  # [ceil(M/128), KB] | [M, 1] fp32 (unused when FUSE_QUANT)
    sw_ptr,  # [ceil(N/128), KB] | [N, 1] fp32
    bias_ptr,  # [N] or dummy
    y_ptr,  # [M, N] out dtype
    M,
    N,
    K,
    M_BUCKET,  # only an autotune key (size class of M), unused in the body
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
    A_BLOCK: tl.constexpr,
    W_BLOCK: tl.constexpr,
    IS_FP8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    FUSE_QUANT: tl.constexpr,
    USE_RINT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    SCALE_IN_LOOP: tl.constexpr = A_BLOCK or W_BLOCK
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm_true = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_true = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rm_true % M
    rn = rn_true % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk  # W^T tile

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not SCALE_IN_LOOP:
        if not IS_FP8:
            acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    # Scale pointers: the A tile lies inside one 128-row scale block (BLOCK_M divides 128).
    sa_blk_ptr = sa_ptr + ((pid_m * BLOCK_M) // 128) * stride_sam
    sw_blk_ptrs = sw_ptr + (rn // 128) * stride_swn

    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        if FUSE_QUANT:
            a_mask = (rm_true < M)[:, None] & (rk < k_left)[None, :]
            x = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), AMAX_FLOOR)
            a, s_a = quant_scale_math(x, amax, IS_FP8, USE_RINT)
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(rk < k_left)[None, :], other=0.0)
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=(rk < k_left)[:, None], other=0.0)

        if SCALE_IN_LOOP:
            if IS_FP8:
                part = tl.dot(a, w)
            else:
                part = tl.dot(a, w, out_dtype=tl.int32).to(tl.float32)
            if A_BLOCK:
                if not FUSE_QUANT:
                    s_a = tl.load(sa_blk_ptr + kb * stride_sak)
                if W_BLOCK:
                    s = s_a * tl.load(sw_blk_ptrs + kb * stride_swk)  # [BLOCK_N]
                    acc += part * s[None, :]
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
    # Epilogue: row-wise scales, bias, cast, masked store.
    if not A_BLOCK:
        acc = acc * tl.load(sa_ptr + rm * stride_sam)[:, None]
    if not W_BLOCK:
        acc = acc * tl.load(sw_ptr + rn * stride_swn)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm_true[:, None].to(tl.int64) * stride_ym + rn_true[None, :] * stride_yn
    mask = (rm_true < M)[:, None] & (rn_true < N)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def gemm_configs(scale_in_loop: bool, fuse_quant: bool) -> list:
    """Autotune candidates (BLOCK_K fixed at 128 = the scale block). 8 warps for 128-row tiles.

    A 128x256 tile is only offered when there is no in-loop scaling (an int32 partial next to an
    fp32 accumulator of that size would spill).
    """
    cfgs = []
    for stages in (3, 4):
        cfgs.append(triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=stages))
    if not scale_in_loop:
        cfgs.append(triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=3))
    if not fuse_quant:
        cfgs.append(triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4))
    else:
        cfgs.append(triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=3))
    return cfgs


_TUNED: dict[tuple[bool, bool], object] = {}


def _tuned_kernel(scale_in_loop: bool, fuse_quant: bool):
    key = (scale_in_loop, fuse_quant)
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(
            configs=gemm_configs(scale_in_loop, fuse_quant),
            # M changes the best tile only through its size class: bucket it.
            key=["M_BUCKET", "N", "K", "IS_FP8", "A_BLOCK", "W_BLOCK", "HAS_BIAS"],
        )(_w8a8_gemm_kernel)
    return _TUNED[key]


def w8a8_gemm_triton(
    qa: torch.Tensor,  # [M, K] int8/e4m3; or bf16/fp16/fp32 x when fuse_quant
    sa: torch.Tensor | None,  # [ceil(M/128), KB] | [M, 1] fp32; None when fuse_quant
    qw: torch.Tensor,  # [N, K] int8/e4m3
    sw: torch.Tensor,  # [ceil(N/128), KB] | [N, 1] fp32
    bias: torch.Tensor | None,  # [N]
    act_granularity: str,
    weight_granularity: str,
    out_dtype: torch.dtype,
    fuse_quant: bool = False,
    config: dict | None = None,
    block_variant: str | None = None,
    use_tma: bool | None = None,
    tma_config: dict | None = None,
) -> torch.Tensor:
    """Launch the scaled GEMM. Inputs are validated by the op layer; shapes are re-checked here.

    Args:
        fuse_quant: ``qa`` is the unquantized activation; quantize block128 tiles in the GEMM.
        config: fixed ``{"BLOCK_M", "BLOCK_N", "GROUP_M", "num_warps", "num_stages"}`` instead of
            autotuning (always used under the CPU interpreter, where autotuning is pointless).
        block_variant: block128 x block128 only: "scalar" | "magic" (int8) | "skew" (fp8) of
            :mod:`.triton_gemm_block`, or "v1" for the generic kernel; None = DEFAULT_BLOCK_VARIANT.
        use_tma: per_token x per_channel only: None = :data:`USE_TMA` on CUDA sm90+ (never under
            the interpreter); True = the TMA kernel whenever the shape rule allows (CUDA sm90+ or
            the interpreter, else ValueError); False = the pointer kernel. See :func:`gemm_path`.
        tma_config: fixed config of the TMA kernel (see ``triton_gemm_tma.w8a8_gemm_tma``).
    """
    m, k = qa.shape
    n, k2 = qw.shape
    if k != k2:
        raise ValueError(f"w8a8_gemm_triton: K mismatch, activation {tuple(qa.shape)} vs weight {tuple(qw.shape)}")
    is_fp8 = qw.dtype == torch.float8_e4m3fn
    a_block = act_granularity == "block128"
    w_block = weight_granularity == "block128"
    if fuse_quant and not a_block:
        raise ValueError("w8a8_gemm_triton: fuse_quant needs block128 activations")
    if gemm_path(qa, qw, out_dtype, act_granularity, weight_granularity, fuse_quant, use_tma)[0] == "tma":
        from turbocompile.kernels.w8a8.triton_gemm_tma import w8a8_gemm_tma

        return w8a8_gemm_tma(qa, sa, qw, sw, bias, out_dtype, config=tma_config)
    y = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(out_dtype)
        return y
    if fuse_quant:
        sa = sw  # placeholder pointer, never read
        sa_strides = (0, 0)
    else:
        sa_strides = (sa.stride(0), sa.stride(1))
    bias_arg = bias if bias is not None else sw
    args = (
        qa, qw, sa, sw, bias_arg, y, m, n, k, min(triton.next_power_of_2(m), 8192),
        qa.stride(0), qa.stride(1), qw.stride(0), qw.stride(1),
        sa_strides[0], sa_strides[1], sw.stride(0), sw.stride(1), y.stride(0), y.stride(1),
    )
    meta = dict(
        A_BLOCK=a_block, W_BLOCK=w_block, IS_FP8=is_fp8, HAS_BIAS=bias is not None,
        EVEN_K=k % 128 == 0, FUSE_QUANT=fuse_quant, USE_RINT=not triton_interpret(), BLOCK_K=128,
    )
    if a_block and w_block and not fuse_quant:
        variant = block_variant or DEFAULT_BLOCK_VARIANT["fp8" if is_fp8 else "int8"]
        if variant != "v1":
            return _launch_block(args, y, is_fp8, bias is not None, k % 128 == 0, variant, config)
    if config is None and triton_interpret():
        config = {"BLOCK_M": 64 if not fuse_quant else 128, "BLOCK_N": 64, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    if config is not None:
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        _w8a8_gemm_kernel[grid](*args, **meta, **config)
        return y
    kernel = _tuned_kernel(a_block or w_block, fuse_quant)

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

    kernel[grid](*args, **meta)
    return y


def w8a8_gemm_sumsq_triton(
    qa: torch.Tensor,  # [M, K] int8 | e4m3
    sa: torch.Tensor,  # [M, 1] fp32
    qw: torch.Tensor,  # [N, K] int8 | e4m3
    sw: torch.Tensor,  # [N, 1] fp32
    bias: torch.Tensor | None,  # [N]
    out_dtype: torch.dtype,
    use_tma: bool | None = None,
    tma_config: dict | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token x per-channel GEMM ``y [M, N]`` and ``sumsq [M, ceil(N/128)]`` fp32, the sum of squares of
    each 128-column granule of y as stored (``ref.w8a8_gemm_sumsq_ref``'s contract).

    Route: :func:`gemm_path` (``use_tma`` as there). On the TMA route the sums come from the GEMM's
    epilogue (``amax_mode="sumsq"``, no second read of y; ``tma_config`` must then store whole
    granules). Elsewhere (shape rule not met, no sm90, the interpreter's default) y comes from the pointer
    kernel (``config``) and the sums from torch ops on it: the same contract, one more read of y.
    Inputs are validated by the op layer.
    """
    from turbocompile.kernels.w8a8.ref import BLOCK, granule_sumsq_ref

    m, n = qa.shape[0], qw.shape[0]
    if gemm_path(qa, qw, out_dtype, "per_token", "per_channel", use_tma=use_tma)[0] == "tma":
        from turbocompile.kernels.w8a8.triton_gemm_tma import w8a8_gemm_tma

        sumsq = torch.empty((m, triton.cdiv(n, BLOCK)), dtype=torch.float32, device=qa.device)
        y = w8a8_gemm_tma(qa, sa, qw, sw, bias, out_dtype, config=tma_config, amax_mode="sumsq", amax_out=sumsq)
        return y, sumsq
    y = w8a8_gemm_triton(qa, sa, qw, sw, bias, "per_token", "per_channel", out_dtype, config=config, use_tma=False)
    return y, granule_sumsq_ref(y)


def gemm_path(qa: torch.Tensor, qw: torch.Tensor, out_dtype: torch.dtype, act_granularity: str,
              weight_granularity: str, fuse_quant: bool = False, use_tma: bool | None = None) -> tuple[str, str]:
    """Which kernel :func:`w8a8_gemm_triton` runs: ``("tma" | "pointer", why)``.

    Dispatch rule (explicit, decided from shapes/dtypes/device before any launch - never by
    catching a failure):
    1. ``use_tma=False``, or ``None`` with :data:`USE_TMA` off -> pointer.
    2. Shape rule (``triton_gemm_tma.tma_unsupported_reason``): per_token x per_channel, not fused,
       16-byte aligned operand rows (K % 16 == 0 for contiguous 8-bit codes) and bases, output row
       N * itemsize % 16 == 0. Any failed condition -> pointer.
    3. Hardware: ``None`` needs a CUDA device of capability >= 9.0 (else pointer; the CPU
       interpreter also takes the pointer kernel by default); ``True`` needs sm90+ or the
       interpreter and raises ValueError otherwise (an impossible request).
    """
    if use_tma is False or (use_tma is None and not USE_TMA):
        return "pointer", "TMA off"
    return tma_route(qa, qw, out_dtype, act_granularity, weight_granularity, fuse_quant, use_tma, "w8a8_gemm_triton")


def tma_route(qa: torch.Tensor, qw: torch.Tensor, out_dtype: torch.dtype, act_granularity: str,
              weight_granularity: str, fuse_quant: bool, use_tma: bool | None, caller: str) -> tuple[str, str]:
    """Rules 2 and 3 of :func:`gemm_path` (shape rule, then hardware), shared with the GELU-epilogue
    GEMM's dispatch; ``caller`` names the function in the error of an impossible ``use_tma=True``."""
    from turbocompile.kernels.w8a8.triton_gemm_tma import tma_hardware_ok, tma_unsupported_reason

    why = tma_unsupported_reason(qa, qw, out_dtype, act_granularity, weight_granularity, fuse_quant)
    if why is not None:
        return "pointer", why
    if use_tma is None:
        if triton_interpret() or qa.device.type != "cuda" or not tma_hardware_ok(qa.device):
            return "pointer", "no sm90+ CUDA device"
    elif not tma_hardware_ok(qa.device):
        raise ValueError(f"{caller}: use_tma=True needs a CUDA device of compute capability >= 9.0 "
                         f"(or the CPU interpreter), got {qa.device}")
    return "tma", "shape rule holds"


_TUNED_BLOCK: dict[int, object] = {}


def _launch_block(args, y, is_fp8: bool, has_bias: bool, even_k: bool, variant: str, config: dict | None):
    """Run the block128 x block128 kernel (scalar per-tile scales; see triton_gemm_block)."""
    from turbocompile.kernels.w8a8.triton_gemm_block import VARIANTS, block_configs, block_gemm_kernel

    if variant not in VARIANTS:
        raise ValueError(f"w8a8_gemm_triton: unknown block_variant '{variant}'; valid: v1, {', '.join(VARIANTS)}")
    if (variant == "magic" and is_fp8) or (variant == "skew" and not is_fp8):
        raise ValueError(f"w8a8_gemm_triton: block_variant '{variant}' is for {'int8' if is_fp8 else 'fp8'} only")
    v = VARIANTS[variant]
    m, n = y.shape
    meta = dict(IS_FP8=is_fp8, HAS_BIAS=has_bias, EVEN_K=even_k, VARIANT=v, BLOCK_K=128)
    if config is None and triton_interpret():
        config = {"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    if config is not None:
        if 128 % config["BLOCK_M"] or 128 % config["BLOCK_N"]:
            raise ValueError("w8a8_gemm_triton: block128 tiles must divide 128")
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        block_gemm_kernel[grid](*args, **meta, **config)
        return y
    if v not in _TUNED_BLOCK:
        _TUNED_BLOCK[v] = triton.autotune(
            configs=block_configs(v), key=["M_BUCKET", "N", "K", "IS_FP8", "HAS_BIAS", "EVEN_K"],
        )(block_gemm_kernel)

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

    _TUNED_BLOCK[v][grid](*args, **meta)
    return y


def tuned_block_config(variant: str):
    """The autotuner's last pick for a block variant (for the benchmark's report), or None."""
    from turbocompile.kernels.w8a8.triton_gemm_block import VARIANTS

    tuned = _TUNED_BLOCK.get(VARIANTS.get(variant, -1))
    return None if tuned is None else getattr(tuned, "best_config", None)
