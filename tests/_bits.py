"""Bit-level comparisons that hold in Triton's CPU interpreter and, to a stated last-bits bound, on a GPU.

In the interpreter a kernel's arithmetic is numpy's: one rounding per operation, reductions in numpy's
order, exact division and square root. So the kernels are written to reproduce the PyTorch references
bit for bit there, and CI asserts exactly that. Compiled for CUDA, the same source differs in the last
bits, for three reasons the kernel cannot control without giving up speed:

- FMA contraction: Triton compiles ``a * b + c`` to one fused multiply-add (one rounding, not two);
- reduction order: ``tl.sum`` / ``tl.max`` reduce in a tree across lanes and warps;
- approximate special functions: ``rsqrt``, ``exp2`` and division lower to PTX approximations
  (relative error ~2^-22 .. 2^-23).

`assert_same_bits` and `assert_same_codes` are therefore exact on CPU and bounded on CUDA: floats within
a few units in the last place of their own dtype, quantization codes within one step on a small share
of elements (a row scale one ulp apart moves a value across a rounding boundary only rarely).
"""

from __future__ import annotations

import torch

from tests._env import kernel_device

COMPILED = kernel_device() == "cuda"  # kernels run compiled (CUDA), not in the interpreter


def _same_kind(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, \
        f"{what} dtype/shape differ: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in units of the last place of dtype(a) at max(|a|, |b|) (0 where both are equal, inf where
    exactly one is non-finite)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        raise AssertionError(f"dtype/shape differ: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}")
    info = torch.finfo(a.dtype)
    x, y = a.double(), b.double()
    mag = torch.maximum(x.abs(), y.abs()).clamp_min(info.tiny)
    _, exp = torch.frexp(mag)  # mag = m · 2^exp, m in [0.5, 1): one ulp is eps · 2^(exp − 1)
    ulp = info.eps * torch.pow(2.0, (exp - 1).double())
    d = (x - y).abs() / ulp
    same = (x == y) | (torch.isnan(x) & torch.isnan(y))
    return torch.where(same, torch.zeros_like(d), torch.nan_to_num(d, nan=float("inf")))


def assert_same_bits(out: torch.Tensor, ref: torch.Tensor, max_ulps: float = 4, what: str = "") -> None:
    """Bit-identical in the interpreter; on CUDA, every element within ``max_ulps`` ulps of ``ref``."""
    _same_kind(out, ref, what)
    if not COMPILED:
        assert torch.equal(out, ref), f"{what} not bit-identical: max |Δ| {(out.double() - ref.double()).abs().max()}"
        return
    d = ulps(out, ref)
    assert d.max().item() <= max_ulps, f"{what} differs by up to {d.max().item():.1f} ulps (bound {max_ulps})"


def _code_steps(q: torch.Tensor) -> torch.Tensor:
    """Codes as integers where adjacent representable values differ by 1: int8 as is; fp8 is sign-magnitude,
    so its magnitude bits carry the sign (±0 both map to 0)."""
    if q.dtype == torch.int8:
        return q.int()
    bits = q.view(torch.int8).int()
    mag = bits & 0x7F
    return torch.where(bits < 0, -mag, mag)


def assert_same_codes(q: torch.Tensor, q_ref: torch.Tensor, max_share: float = 0.01, what: str = "") -> None:
    """Quantization codes (int8, or fp8 e4m3): identical bits in the interpreter; on CUDA at most one code
    step apart on at most ``max_share`` of them."""
    _same_kind(q, q_ref, what)
    a, b = _code_steps(q), _code_steps(q_ref)
    if not COMPILED:
        bits_equal = torch.equal(q.view(torch.int8), q_ref.view(torch.int8))
        assert bits_equal, f"{what} codes differ at {(a != b).sum().item()} of {a.numel()}"
        return
    diff = (a - b).abs()
    share = (diff > 0).float().mean().item()
    assert diff.max().item() <= 1 and share <= max_share, f"{what} codes: max step {diff.max().item()}, share {share:.4f}"
