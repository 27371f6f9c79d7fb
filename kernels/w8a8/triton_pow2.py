"""Per-token FP8 with power-of-two scales, produced by a GEMM epilogue without re-reading h in bf16.

Reference semantics: :func:`turbocompile.kernels.w8a8.ref.quantize_pow2_ref` (row scale
``s = 2^e_row``, ``e_row = ceil(log2(max(amax_row, 1e-8) / 448))``, codes ``e4m3_rne(h / s)``).

The fused path (``out_scale="pow2"`` of ``w8a8_gemm_gelu_quant_triton``) has two launches:

1. GEMM epilogue (:func:`pow2_granule_codes`, called by the TMA kernel of :mod:`.triton_gemm_tma`
   with ``amax_mode="pow2"``): for each (row, 128-column granule g) of the ROUNDED output h (the
   values a bf16 h would hold), ``a_g = max|h|`` and ``e_g = ceil(log2(max(a_g, 1e-8) / 448))``;
   it stores the FP8 codes ``c = e4m3_rne(h * 2^-e_g)`` (1 B per element instead of 2) and ``a_g``
   into the partial-amax buffer ``[M, ceil(N/128)]``.
2. :func:`requant_pow2_triton`: per row, ``e_row = e(max_g a_g) = max_g e_g`` (ceil o log2 is
   monotone), then every code of a granule with ``d = e_row - e_g > 0`` becomes
   ``e4m3_rne(c * 2^-d)``, in place; granules already at the row scale (d = 0) are neither read nor
   written. Writes the row scale ``2^e_row``.

Exactness of step 2 against direct quantization ``e4m3_rne(h * 2^-e_row)``: ``c * 2^-d`` is exact in
fp32. If ``|h| * 2^-e_row >= 2^-6`` (an e4m3 normal at the row scale), then ``|h| * 2^-e_g`` is a
normal too, both roundings keep 3 mantissa bits of the same binary number, and the requantized code
equals the direct one bit for bit. Below 2^-6 the row-scale code is subnormal (quantum 2^-9) while
``c`` was rounded on a finer grid first: a double rounding, which can differ from the direct code by
one subnormal step (2^-9 in code units, i.e. 2^-9 * s_row in h), e.g. when c lands exactly on a tie
of the coarser grid. That concerns only ``|h| < 2^-6 * s_row``, and since ``s_row < amax_row / 224``
this is ``|h| < 2^-6 / 224 * amax_row ~ 7.0e-5 * amax_row`` at most (``3.5e-5 * amax_row`` when
``s_row = amax_row / 448``). The scales are always exact.

Fallback (any other kernel route, e.g. the pointer kernel, INT8 GEMMs, N % 16 != 0): the GEMM stores
bf16 h with the partial amax and :func:`quantize_pow2_from_amax_triton` quantizes h directly, equal
to the reference bit for bit (one rounding).

Traffic per element at 1.3B (M = 32760, N = 8960): GEMM store 1 B (was 2 B of bf16), requant at
most 1 B read + 1 B write (was 2 B + 1 B for the amax path's quantizer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbocompile.kernels.w8a8 import ref
from turbocompile.kernels.w8a8.triton_quant import AMAX_FLOOR, e4m3_grid
from turbocompile.ops._backend import triton_interpret

__all__ = ["pow2_exponent", "exp2_int", "pow2_granule_codes", "requant_pow2_triton", "quantize_pow2_from_amax_triton"]

GRANULE = ref.BLOCK  # columns per partial-amax entry (== _epilogue_math.AMAX_GRANULE)


@triton.jit
def pow2_exponent(a):
    """int32 ``e = ceil(log2(a / 448))`` for fp32 normal ``a > 0`` (callers floor it at 1e-8), exactly.

    From the bit pattern: ``a = (1 + f) * 2^E`` and ``448 = 1.75 * 2^8``, so ``a <= 448 * 2^e`` holds
    for ``e = E - 8`` iff ``1 + f <= 1.75``, i.e. the mantissa field ``<= 0x600000``; otherwise
    ``e = E - 7``. (A float log2 could round across an integer at exact powers of two.)
    """
    bits = a.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 135  # biased exponent field - 127 - 8
    return e + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)


@triton.jit
def exp2_int(e):
    """fp32 ``2^e`` for int32 ``e`` in [-126, 127], exact (built from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3(v, NATIVE: tl.constexpr):
    """e4m3 code of fp32 ``v`` (``|v| <= 448``), round to nearest even. GPU: the hardware cvt (RNE,
    subnormals included); the interpreter's cast is not RNE, so round to the grid first."""
    if NATIVE:
        return v.to(tl.float8e4nv)
    return e4m3_grid(v).to(tl.float8e4nv)


@triton.jit
def _as_f32(out):
    """The stored (rounded) values of a bf16 / fp16 / fp32 tile as fp32, exactly. bf16 goes through the
    bits: the codes must be made from the rounded h, and a cast pair could be folded away."""
    if out.dtype == tl.bfloat16:
        return (out.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return out.to(tl.float32)


@triton.jit
def pow2_granule_codes(
    out,  # [BLOCK_M, WIDTH] the epilogue's output tile, rounded to h's dtype (bf16 / fp16 / fp32)
    amax_ptr,  # [M, ceil(N / GRANULE)] fp32 granule maxima (written here)
    rm,  # [BLOCK_M] row indices of the tile
    off_n,  # first column of the tile (a multiple of GRANULE)
    M,
    N,
    stride_amax_m,
    NATIVE: tl.constexpr,  # hardware e4m3 cast (GPU) or the explicit grid rounding (interpreter)
    GRANULE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    WIDTH: tl.constexpr,  # a multiple of GRANULE
):
    """FP8 codes of the tile at a power-of-two scale per (row, granule), and the granule maxima.

    Stores ``a_g = max|h|`` over the granule's real columns (the values of ``out``, i.e. rounded) into
    ``amax_ptr`` (rows < M, granules < ceil(N / GRANULE)) and returns ``e4m3_rne(h * 2^-e_g)`` with
    ``e_g = pow2_exponent(max(a_g, 1e-8))``: ``|h| * 2^-e_g <= 448`` exactly, so no clamp.
    """
    tl.static_assert(WIDTH % GRANULE == 0, "pow2 codes: stored tile width must be a multiple of GRANULE")
    G: tl.constexpr = WIDTH // GRANULE
    h = _as_f32(out)
    rn = off_n + tl.arange(0, WIDTH)
    ah = tl.where((rn < N)[None, :], tl.abs(h), 0.0)  # columns past N (GELU(0) = 0 anyway) masked
    if G == 1:  # one granule per stored width (every autotune config): plain row reductions, no reshape
        gmax = tl.max(ah, axis=1)[:, None]  # [BLOCK_M, 1]
        v = h * exp2_int(-pow2_exponent(tl.maximum(gmax, AMAX_FLOOR)))
    else:
        gmax = tl.max(tl.reshape(ah, (BLOCK_M, G, GRANULE)), axis=2)  # [BLOCK_M, G]
        inv = exp2_int(-pow2_exponent(tl.maximum(gmax, AMAX_FLOOR)))
        v = tl.reshape(tl.reshape(h, (BLOCK_M, G, GRANULE)) * inv[:, :, None], (BLOCK_M, WIDTH))
    rg = off_n // GRANULE + tl.arange(0, G)  # a vector even for G == 1 (the half may lie past N)
    tl.store(amax_ptr + rm[:, None].to(tl.int64) * stride_amax_m + rg[None, :], gmax,
             mask=(rm < M)[:, None] & (rg < tl.cdiv(N, GRANULE))[None, :])
    return _e4m3(v, NATIVE)


@triton.jit
def _pow2_rows_kernel(
    x_ptr,  # [M, N] e4m3 granule codes (IN_CODES) | bf16 / fp16 / fp32 h
    amax_ptr,  # [M, G] fp32 granule maxima of h
    q_ptr,  # [M, N] e4m3 row-scale codes (== x_ptr for the in-place requantization)
    s_ptr,  # [M, 1] fp32 row scales 2^e_row
    M,
    N,
    G,
    stride_xm,
    stride_amax_m,
    stride_qm,
    IN_CODES: tl.constexpr,  # x holds codes at 2^e_g (then in place, d = 0 granules skipped) | h itself
    NATIVE: tl.constexpr,
    GRANULE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,  # next power of two >= G (the row's maxima in one load)
    CHUNK_G: tl.constexpr,  # granules per step of the column loop
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    pa_rows = amax_ptr + rm[:, None].to(tl.int64) * stride_amax_m
    rg = tl.arange(0, BLOCK_G)
    pa = tl.load(pa_rows + rg[None, :], mask=row_ok[:, None] & (rg < G)[None, :], other=0.0)
    e_row = pow2_exponent(tl.maximum(tl.max(pa, axis=1), AMAX_FLOOR))  # [BLOCK_M] = max_g e_g
    tl.store(s_ptr + rm, exp2_int(e_row), mask=row_ok)
    x_rows = x_ptr + rm[:, None, None].to(tl.int64) * stride_xm
    q_rows = q_ptr + rm[:, None, None].to(tl.int64) * stride_qm
    for g0 in range(0, G, CHUNK_G):
        gi = g0 + tl.arange(0, CHUNK_G)
        cols = gi[:, None] * GRANULE + tl.arange(0, GRANULE)[None, :]  # [CHUNK_G, GRANULE]
        mask = row_ok[:, None, None] & (cols < N)[None, :, :]
        if IN_CODES:
            a_g = tl.load(pa_rows + gi[None, :], mask=row_ok[:, None] & (gi < G)[None, :], other=0.0)
            d = e_row[:, None] - pow2_exponent(tl.maximum(a_g, AMAX_FLOOR))  # [BLOCK_M, CHUNK_G], >= 0
            # d > 100 leaves c * 2^-d < 2^-90, which rounds to 0 like any d >= 11; the clamp keeps 2^-d a
            # normal fp32 (d reaches 155 only between a 1e-8 granule and a 2^120 row maximum)
            inv = exp2_int(-tl.minimum(d, 100))
            mask = mask & (d > 0)[:, :, None]  # granules already at the row scale: no read, no write
        else:
            inv = exp2_int(-e_row)[:, None]  # [BLOCK_M, 1]: h * 2^-e_row, one rounding (== the reference)
        x = tl.load(x_rows + cols[None, :, :], mask=mask, other=0.0).to(tl.float32)
        # exact product (a power of two); only the e4m3 rounding below can round
        tl.store(q_rows + cols[None, :, :], _e4m3(x * inv[:, :, None], NATIVE), mask=mask)


def _launch_rows(x: torch.Tensor, amax: torch.Tensor, q: torch.Tensor, in_codes: bool,
                 config: dict | None) -> torch.Tensor:
    m, n = x.shape
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return s
    g = amax.shape[1]
    if g != triton.cdiv(n, GRANULE) or (g and amax.stride(1) != 1) or amax.dtype != torch.float32:
        raise ValueError(f"pow2 quantizer: amax must be fp32 [M, ceil(N/{GRANULE})] = [{m}, {triton.cdiv(n, GRANULE)}] "
                         f"with contiguous rows, got {amax.dtype} {list(amax.shape)}")
    if g == 0:  # N == 0: every row at the floor
        s.copy_(ref._exp2i(ref.pow2_exponent_ref(torch.zeros((m, 1), device=x.device))))
        return s
    if x.stride(1) != 1 or q.stride(1) != 1:
        raise ValueError("pow2 quantizer: x and q need contiguous rows")
    cfg = {"CHUNK_G": 8, "BLOCK_M": 0, "num_warps": 4}
    cfg.update(config or {})
    chunk = min(cfg["CHUNK_G"], triton.next_power_of_2(g))
    block_m = cfg["BLOCK_M"] or max(1, 4096 // (chunk * GRANULE))  # ~4K elements per step
    _pow2_rows_kernel[(triton.cdiv(m, block_m),)](
        x, amax, q, s, m, n, g, x.stride(0), amax.stride(0), q.stride(0),
        IN_CODES=in_codes, NATIVE=not triton_interpret(), GRANULE=GRANULE, BLOCK_M=block_m,
        BLOCK_G=max(2, triton.next_power_of_2(g)), CHUNK_G=chunk, num_warps=cfg["num_warps"],
    )
    return s


def requant_pow2_triton(codes: torch.Tensor, amax: torch.Tensor,
                        config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move granule-scale codes to their row scale, IN PLACE: returns ``(codes, s [M, 1])``.

    Args:
        codes: [M, N] float8_e4m3fn from :func:`pow2_granule_codes` (``e4m3(h * 2^-e_g)``).
        amax: [M, ceil(N / 128)] fp32 granule maxima of h written with them.
        config: launch override (benchmarks): ``CHUNK_G`` (granules per step, default 8), ``BLOCK_M``
            (rows per program, default ~4096 elements per step), ``num_warps`` (4).

    Equal to ``ref.quantize_pow2_ref(h)`` except codes below 2^-6 at the row scale, which may be one
    subnormal step off (double rounding; see the module docstring). Not idempotent: call it once.
    """
    if codes.dtype != torch.float8_e4m3fn or codes.dim() != 2:
        raise ValueError(f"requant_pow2_triton: codes must be 2-D float8_e4m3fn, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    return codes, _launch_rows(codes, amax, codes, True, config)


def quantize_pow2_from_amax_triton(h: torch.Tensor, amax: torch.Tensor,
                                   config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token pow2 FP8 quantization of ``h [M, N]`` (bf16 / fp16 / fp32) given its granule maxima
    ``amax [M, ceil(N / 128)]`` (the GELU GEMM's "partial" buffer): ``(q e4m3, s [M, 1])``, equal to
    ``ref.quantize_pow2_ref(h)`` bit for bit (values; the sign of a zero code may differ)."""
    if h.dim() != 2 or h.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quantize_pow2_from_amax_triton: h must be 2-D bf16/fp16/fp32, got {h.dtype} "
                         f"{tuple(h.shape)}")
    q = torch.empty(h.shape, dtype=torch.float8_e4m3fn, device=h.device)
    return q, _launch_rows(h, amax, q, False, config)
