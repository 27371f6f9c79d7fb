"""TurboDiffusion's 128×128-block int8 weight format (``wan-architecture.md`` §2b, §3).

A quantized ``nn.Linear`` stores ``int8_weight`` [out, in] and ``scale`` fp32
[⌈out/128⌉, ⌈in/128⌉]; the float weight is ``q[o, i] · scale[o // 128, i // 128]``.
Quantization (TD's ``quant_cuda`` on the weight): per 128×128 block ``amax = max(1e-8, max|w|)``
in fp32, ``q = sat_int8(round_half_even(w · 128/amax))`` (so +amax saturates to 127),
``scale = amax / 128``. Used here to write test checkpoints and to dequantize on load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["BLOCK", "quantize_int8_block128", "dequantize_int8_block128"]

BLOCK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quantize_int8_block128(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight: returns (int8 [out, in], fp32 scale [⌈out/128⌉, ⌈in/128⌉])."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    rb, cb = _cdiv(out_f, BLOCK), _cdiv(in_f, BLOCK)
    w32 = w.float()
    padded = F.pad(w32.abs(), (0, cb * BLOCK - in_f, 0, rb * BLOCK - out_f))
    amax = padded.view(rb, BLOCK, cb, BLOCK).amax(dim=(1, 3)).clamp_min(1e-8)
    inv = (128.0 / amax).repeat_interleave(BLOCK, 0)[:out_f].repeat_interleave(BLOCK, 1)[:, :in_f]
    q = torch.round(w32 * inv).clamp(-128, 127).to(torch.int8)  # torch.round is half-to-even
    return q, amax / 128.0


def dequantize_int8_block128(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
                             ) -> torch.Tensor:
    """Float weight ``q · scale`` per 128×128 block (product in fp32, then cast to ``dtype``)."""
    out_f, in_f = q.shape
    rb, cb = _cdiv(out_f, BLOCK), _cdiv(in_f, BLOCK)
    if q.dtype != torch.int8 or tuple(scale.shape) != (rb, cb):
        raise ValueError(f"int8 weight {tuple(q.shape)} {q.dtype} needs an fp32 scale of shape ({rb}, {cb}), "
                         f"got {tuple(scale.shape)}")
    full = scale.float().repeat_interleave(BLOCK, 0)[:out_f].repeat_interleave(BLOCK, 1)[:, :in_f]
    return (q.float() * full).to(dtype)
