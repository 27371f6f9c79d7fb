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


def split_tiles(D: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): the row as one power-of-two tile plus an optional second one.

    D = 5120 -> (4096, 1024), 1536 -> (1024, 512), 3072 -> (2048, 1024): no masked lanes, where
    next_pow2(D) would leave 37.5% of an 8192-lane tile idle at D = 5120. When the remainder
    needs a tile as large as the first (D = 200 -> 128 + 72), one next_pow2(D) tile is used.
    """
    D = max(int(D), 1)
    a = max(16, 1 << (D.bit_length() - 1))
    rem = D - a
    if rem <= 0:
        return a, 0
    b = max(16, _next_pow2(rem))
    if b >= a:
        return max(16, _next_pow2(D)), 0
    return a, b


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 for the CPU interpreter), cached."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def row_config(D: int, kind: str = "ln", override: dict | None = None) -> dict:
    """kind: "ln", "ln_res" (with the residual add), "quant", "quant_res", "quant_res_int8", "rms"."""
    return _row_config(D, kind, override)


def _row_config(D: int, kind: str, override: dict | None) -> dict:
    """Launch configuration of the row kernels (LayerNorm family and RMSNorm/RoPE).

    Keys: block_m (rows per program), num_warps, split (two column tiles instead of one
    next_pow2 tile), persist (programs per SM of a persistent grid; 0 = one program per row
    block), prefetch (persistent only: load the next block before computing this one),
    stages (num_stages of the persistent loop when not prefetching), qv (the quantizer's
    instruction sequence, see ``triton_layernorm._quantize``; same codes either way), stats (0
    two-pass row statistics, 1 one shifted pass, see ``triton_layernorm._ln_block``), maxnreg
    (a register cap per thread for the compiler; None: its own choice).
    ``override`` (benchmarks, tests) replaces any key.
    """
    cfg = dict(block_m=1, num_warps=8, split=True, persist=0, prefetch=False, stages=1, qv=0, stats=0, maxnreg=None)
    width = sum(split_tiles(D))
    if kind == "rms" and 512 <= width <= 1024:
        # RMSNorm+RoPE pair words at Wan2.1-1.3B (768 words): 1 row x 2 warps 0.069 ms vs 4 x 4
        # 0.086 ms (H200 session 5 sweep, BENCH_D=1536)
        cfg["num_warps"] = 2
    elif width <= 1024:  # narrow rows: several rows per program, each program moves a few KB
        cfg["block_m"] = 1 << ((4096 // width).bit_length() - 1)  # a power of two
        cfg["num_warps"] = 4
    elif width <= 2048:
        # D = 1536 (H200 session 5 sweep): 2 rows x 4 warps is the best or near-best shape of every
        # site (ln_modulate 0.060 vs 0.074 ms at 2 x 8, gated residual 0.106 vs 0.127, INT8 quant
        # 0.072 vs 0.104); with the residual and a quantizer also the one-pass statistics (FP8 0.114
        # vs 0.153 ms)
        cfg["block_m"] = 2
        cfg["num_warps"] = 4
        if kind.startswith("quant_res"):
            cfg["stats"] = 1
    else:
        # Wide rows (D = 5120): best configs of the H200 sweep, benchmarks/RESULTS.md round 2.
        # 4 warps per row (40 elements per thread) keep the most rows in flight; two rows per
        # program where no y is read (ln_modulate 93.5%, LN affine 89.6%, head 95.8% of copy);
        # one row with the residual (94.8%; 2 rows: 73.7%); the residual + quant epilogue
        # keeps its fp32 row twice (x_new, h): 2 rows × 8 warps (67.2%).
        cfg["num_warps"] = 4
        if kind in ("ln", "quant"):
            cfg["block_m"] = 2
        elif kind.startswith("quant_res"):
            cfg["num_warps"] = 8
            cfg["block_m"] = 2
        # "ln_res", "rms": one row × 4 warps
    if kind.startswith("quant"):
        # lean quantizer: same codes, fewer instructions (H200 session 4: int8 per-token 0.448 ->
        # 0.401 ms, fp8 0.408 -> 0.395, residual int8 0.957 -> 0.912, residual fp8 0.925 -> 0.903)
        cfg["qv"] = 1
    if kind == "quant_res" and width > 2048:
        # residual + FP8 at D = 5120: capping the registers at 80 measured 0.803 ms (79.5% of copy)
        # vs 0.901 ms uncapped (96: 0.933, 128: 0.913); the cap slows every other quant site
        cfg["maxnreg"] = 80
    if kind == "quant_res_int8" and width > 2048:
        # residual + INT8 at D = 5120: one-pass statistics, 2 rows x 4 warps: 0.810 ms (79.2% of
        # copy) vs 0.912 ms; the same config is slower for FP8 (1.085 ms) and without the residual
        cfg.update(stats=1, block_m=2, num_warps=4)
    if override:
        cfg.update(override)
    return cfg
