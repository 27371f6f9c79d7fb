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
"""

from __future__ import annotations

import math

import torch

__all__ = ["key_tail_start_ref", "tail_merged_attention_ref"]


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
