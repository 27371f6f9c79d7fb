"""PyTorch references for attention with a merged tail of repeated keys.

Notation (per batch b and head h): keys ``k[j]``, values ``v[j]``, ``j = 0 .. Lk-1``; ``n`` is the
*tail start*, the first index of the trailing run of rows whose (k, v) equal the last row's.

* :func:`key_tail_start_ref` finds n: one past the last row that differs from row Lk-1 in k or v
  (0 when every row equals the last one). Equality is bitwise (NaN never equals anything, so a
  NaN row is never merged).
* :func:`tail_merged_attention_ref` is softmax attention over keys 0 .. n-1 plus key n standing
  for the whole tail with multiplicity m = Lk - n, i.e. with logit ``s_n + ln m``::

      out = (sum_{j<n} e^{s_j} v_j + m e^{s_n} v_n) / (sum_{j<n} e^{s_j} + m e^{s_n}),   s_j = q.k_j / sqrt(D)

  For any n in [0, Lk] this is a well-defined function (n = Lk: plain attention); when rows
  n .. Lk-1 really are equal it is exactly the attention over all Lk keys.
* :func:`norm_attention_quant_ref` is Wan's cross-attention between its q and o projections: q RMSNorm,
  attention (tail-merged or over all keys), and FP8 codes of the result for the o projection at one
  scale per sample from :func:`value_bound_ref` (an upper bound of every output, known from v alone).
"""

from __future__ import annotations

import math

import torch

__all__ = ["key_tail_start_ref", "norm_attention_quant_ref", "tail_merged_attention_ref", "value_bound_ref"]


def key_tail_start_ref(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k, v ``[B, Lk, H, D]`` -> int32 ``[B, H]``: start of the trailing run of rows equal to the last."""
    B, Lk, H, _ = k.shape
    differs = (k != k[:, -1:]).any(-1) | (v != v[:, -1:]).any(-1)  # [B, Lk, H]
    pos = torch.arange(1, Lk + 1, device=k.device, dtype=torch.int64).view(1, Lk, 1)
    return (differs.to(torch.int64) * pos).amax(dim=1).to(torch.int32)  # [B, H]


def tail_merged_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              tail_start: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q ``[B, L, H, D]`` over k, v ``[B, Lk, H, D]`` with keys n.. merged into
    key n (n = ``tail_start[b, h]``, int ``[B, H]``); fp32 math, output in q's dtype, ``[B, L, H, D]``."""
    B, L, H, D = q.shape
    Lk = k.shape[1]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, *, D]
    n = tail_start.to(torch.int64).view(B, H, 1, 1)
    j = torch.arange(Lk, device=q.device).view(1, 1, 1, Lk)
    # keys beyond n are dropped; key n (if it exists) carries the tail's multiplicity Lk - n
    mult = (Lk - n).clamp(min=1).to(torch.float32)
    bias = torch.where(j < n, torch.zeros((), device=q.device),
                       torch.where(j == n, torch.log(mult), torch.full((), -math.inf, device=q.device)))
    s = qf @ kf.transpose(-1, -2) / math.sqrt(D) + bias
    out = torch.softmax(s, dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype).contiguous()


def value_bound_ref(v: torch.Tensor) -> torch.Tensor:
    """``max(max |v[b]|, 1e-8)`` per sample of v ``[B, Lk, H, d]``, fp32 ``[B]``: an upper bound of every
    softmax-attention output over these values (a convex combination of value rows). Exact for 16-bit v;
    the floor is the quantizer's, so an all-zero v gives finite scales."""
    return v.abs().amax(dim=(1, 2, 3)).float().clamp_min(1e-8)


def _q_rmsnorm(z: torch.Tensor, weight: torch.Tensor, num_heads: int, eps: float,
               sumsq: torch.Tensor | None) -> torch.Tensor:
    """The q RMSNorm (no RoPE) in z's dtype: ``rmsnorm_rope_ref``'s formula, the mean square taken from z or,
    with ``sumsq [B*L, G]``, as ``sum_g sumsq / D`` (the granule sums of squares of z's rows)."""
    from turbocompile.kernels.norms.ref import rmsnorm_rope_ref

    if sumsq is None:
        return rmsnorm_rope_ref(z, weight, None, None, num_heads, eps)
    B, L, D = z.shape
    dt = z.dtype
    # the same fp32 expression as rmsnorm_rope_ref (mean = sum / D there too); only the sum's order differs
    ms = (sumsq.float().sum(-1) / D).view(B, L, 1)
    return ((z.float() * torch.rsqrt(ms + eps)).to(dt) * weight).to(dt)


def norm_attention_quant_ref(z: torch.Tensor, weight: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             v_bound: torch.Tensor, tail_start: torch.Tensor | None, num_heads: int,
                             eps: float, sumsq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q RMSNorm -> attention -> FP8 e4m3 codes at one scale per sample, each step rounded to z's dtype as
    the unfused graph stores it.

    Args:
        z: ``[B, L, D]`` the raw q projection (D = num_heads * d); weight ``[D]`` the RMSNorm weight.
        k, v: ``[B, Lk, H, d]`` the text keys and values (already normalized / projected).
        v_bound: fp32 ``[B]``, an upper bound of |v| per sample (:func:`value_bound_ref`).
        tail_start: int ``[B, H]`` (keys n.. merged, see :func:`tail_merged_attention_ref`) or None
            (plain attention over all Lk keys).
        sumsq: None, or fp32 ``[B*L, G]``: the sums of squares of z's rows per column granule (the q GEMM's
            epilogue output); the RMSNorm then takes its mean square as ``sum_g sumsq / D`` instead of from z.

    Returns:
        ``(codes [B*L, D] float8_e4m3fn, scales fp32 [B*L, 1])``: the quantizer's FP8 formula
        (``e4m3(clamp(x · (448 / a), ±448))``, scale ``a / 448``) with ``a = v_bound[b]`` for every token of
        sample b instead of the token's abs-max.
    """
    from turbocompile.kernels.w8a8.ref import codes_at_amax_ref, dequant_scale_ref

    B, L, D = z.shape
    q = _q_rmsnorm(z, weight, num_heads, eps, sumsq).unflatten(-1, (num_heads, D // num_heads))
    if tail_start is None:
        tail_start = torch.full((B, num_heads), k.shape[1], dtype=torch.int32, device=z.device)
    o = tail_merged_attention_ref(q, k, v, tail_start).reshape(B * L, D).float()
    a = v_bound.float().repeat_interleave(L).unsqueeze(1)  # [B*L, 1]
    return codes_at_amax_ref(o, a, "fp8"), dequant_scale_ref(a, "fp8")
