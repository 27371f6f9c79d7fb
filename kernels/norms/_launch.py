"""Launch helpers shared by the norm kernels (no Triton import: safe to import anywhere)."""

from __future__ import annotations

import torch

__all__ = ["row_tiling", "bcast_rows", "as_rows"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def row_tiling(D: int, max_tile: int = 4096) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for a one-tile-per-row kernel.

    The column tile is next_pow2(D) (the whole row stays in registers: one read, one write).
    Narrow rows pack several rows into a program so that each program still moves a few KB.
    """
    block_d = max(16, _next_pow2(D))
    block_m = max(1, max_tile // block_d)
    elems = block_m * block_d
    num_warps = min(16, max(1, elems // 512))
    return block_m, block_d, num_warps


def bcast_rows(t: torch.Tensor, B: int, L: int, D: int, name: str) -> tuple[torch.Tensor, int, int]:
    """View a per-sample/per-token vector as [B, L, D]; returns (tensor, stride_b, stride_l).

    Broadcast dims get stride 0, so [B,1,D], [1,1,D], [D] and per-token [B,L,D] all work.
    """
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        te = t.expand(B, L, D)
    except RuntimeError as err:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to the rows [B={B}, L={L}, D={D}]"
        ) from err
    return t, te.stride(0), te.stride(1)


def as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """x [B, L, D] or [M, D] -> (x as [M, D] with unit column stride, B, L)."""
    if x.dim() == 3:
        B, L, _ = x.shape
    elif x.dim() == 2:
        B, L = 1, x.shape[0]
    else:
        raise ValueError(f"expected x of shape [B, L, D] or [M, D], got {tuple(x.shape)}")
    x2 = x.reshape(B * L, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, B, L
