"""W8A8 GEMM whose epilogue adds the result to the residual stream: ``x_new = x + y·gate``.

In a Wan block the o-projections and ffn.2 feed ``x = x + y·gate`` (or ``x + y``), and that sum feeds
the next LayerNorm. Unfused, the GEMM writes y (2 B/elt in bf16) and the fused norm reads x and y and
writes x_new (6 B/elt) besides its normalized output. Here the GEMM reads x (2 B/elt) and writes
x_new (2 B/elt) instead of y, and the norm reads only x_new: ~2 B/elt less per site, and y never
exists in memory.

Numerics: bit-identical to the unfused pair of kernels. The epilogue rounds the fp32 GEMM value to
the output dtype (what the plain GEMM stores as y), then applies the norm kernels' gated residual
sequence (``_epilogue_math._gated_residual``): g = dt(gate), t = dt(y·g), x_new = dt(x + t).

Kernels: the persistent TMA kernel of :mod:`.triton_gemm_tma` (per-token x per-channel on sm90+, by
``triton_gemm.gemm_path``'s rule: the kernel the plain GEMM of these linears runs on Hopper), else the
pointer epilogue kernel of :mod:`.triton_gemm_epilogue` (any scale granularity, block-128 included).
The TMA kernel reads the residual tile through a TMA descriptor of its own or with pointer loads
(:data:`RESIDUAL_LOAD`).
"""

from __future__ import annotations

import torch

from turbocompile.kernels.norms._launch import as_rows, bcast_rows
from turbocompile.kernels.w8a8._epilogue_math import ResidualArgs, residual_torch

__all__ = ["RESIDUAL_LOADS", "RESIDUAL_LOAD", "residual_args", "residual_gemm_path", "w8a8_gemm_residual_triton"]

RESIDUAL_LOADS = ("tma", "pointer")
#: How the TMA kernel reads the residual tile: "tma" (its own descriptor; the tile arrives through shared
#: memory like the operands) or "pointer" (masked loads straight into the accumulator's register layout).
#: Module-level so benchmarks/probe_gemm_residual.py can compare them. "tma" needs a TMA-able residual
#: (unit column stride, 16-byte aligned base and row stride); any other residual is read with pointer loads.
RESIDUAL_LOAD = "tma"
# Largest BLOCK_M of any config of the two kernels (a per-sample gate needs L >= BLOCK_M for GATE_MODE 1).
MAX_BLOCK_M = 128


def residual_args(residual: torch.Tensor, gate: torch.Tensor | None, load: str | None = None) -> ResidualArgs:
    """The kernels' view of ``residual`` [B, L, N] or [M, N] and ``gate`` (None, or broadcasting to it).

    Rows keep their stride when ``reshape`` can give a [M, N] view with unit column stride (a
    row-strided residual is read in place); otherwise the residual is copied contiguous. ``load``:
    None = :data:`RESIDUAL_LOAD`, downgraded to "pointer" when the residual is not TMA-able.
    """
    from turbocompile.kernels.w8a8.triton_gemm_tma import _row_major_16b

    load = RESIDUAL_LOAD if load is None else load
    if load not in RESIDUAL_LOADS:
        raise ValueError(f"unknown residual load '{load}'; valid: {', '.join(RESIDUAL_LOADS)}")
    x2, b, seq = as_rows(residual)
    n = x2.shape[1]
    if load == "tma" and (x2.numel() == 0 or _row_major_16b(x2) is not None):
        load = "pointer"
    if gate is None:
        return ResidualArgs(x2, None, seq, 0, 0, 0, load)
    g, sgb, sgl = bcast_rows(gate, b, seq, n, "gate")
    if sgl == 0 and (b == 1 or sgb == 0):
        mode = 0  # one gate row for all rows
    elif sgl == 0 and seq >= MAX_BLOCK_M:
        mode = 1  # per sample, a tile spans at most two samples
    else:
        mode = 2  # per-token gate (or samples shorter than a tile): gather
    return ResidualArgs(x2, g, seq, sgb, sgl, mode, load)


def residual_gemm_path(qa: torch.Tensor, qw: torch.Tensor, out_dtype: torch.dtype, act_granularity: str,
                       weight_granularity: str, use_tma: bool | None = None) -> tuple[str, str]:
    """``("tma" | "pointer", why)``: the rule of ``triton_gemm.gemm_path`` (the plain GEMM's)."""
    from turbocompile.kernels.w8a8.triton_gemm import gemm_path

    return gemm_path(qa, qw, out_dtype, act_granularity, weight_granularity, False, use_tma)


def w8a8_gemm_residual_triton(
    qa: torch.Tensor,
    sa: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None,
    act_granularity: str,
    weight_granularity: str,
    residual: torch.Tensor,
    gate: torch.Tensor | None,
    config: dict | None = None,
    use_tma: bool | None = None,
    tma_config: dict | None = None,
    res_load: str | None = None,
) -> torch.Tensor:
    """``residual + (scaled 8-bit GEMM + bias)·gate`` with the unfused roundings, in residual's shape and dtype.

    Inputs are validated by the op layer (``turbocompile::w8a8_linear_residual``): ``qa [M, K]``,
    ``residual [B, L, N]`` or ``[M, N]`` with B·L = M, ``gate`` None or broadcasting to it.

    Args:
        config / use_tma / tma_config: as ``triton_gemm_epilogue.w8a8_gemm_gelu_triton`` (pointer kernel
            config; TMA routing, see :func:`residual_gemm_path`; TMA kernel config).
        res_load: how the TMA kernel reads the residual, "tma" | "pointer"; None = :data:`RESIDUAL_LOAD`.
    """
    m, k = qa.shape
    n = qw.shape[0]
    dt = residual.dtype
    res = residual_args(residual, gate, res_load)
    if residual_gemm_path(qa, qw, dt, act_granularity, weight_granularity, use_tma)[0] == "tma":
        from turbocompile.kernels.w8a8.triton_gemm_tma import w8a8_gemm_tma

        out = w8a8_gemm_tma(qa, sa, qw, sw, bias, dt, config=tma_config, residual=res)
        return out.reshape(residual.shape)
    out = torch.empty((m, n), dtype=dt, device=qa.device)
    if m == 0 or n == 0:
        return out.reshape(residual.shape)
    if k == 0:  # degenerate: y = bias (or 0), then the residual add with torch ops
        y = (bias.to(dt) if bias is not None else torch.zeros(n, dtype=dt, device=qa.device)).expand(m, n)
        return residual_torch(y, res).reshape(residual.shape)
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import _launch_pointer

    # the pointer kernel reads the residual with its own loads whatever res.load says
    _launch_pointer(qa, sa, qw, sw, bias, act_granularity, weight_granularity, out, None, "none", 0, res, config,
                    "w8a8_gemm_residual_triton")
    return out.reshape(residual.shape)
