"""SageSLA attention op: ``torch.ops.turbocompile.sagesla``.

Block-sparse attention with INT8 Q·Kᵀ and FP8 (or fp16) P·V over the top-k key blocks of
each query block, plus a linear-attention branch over all keys (TurboDiffusion's SageSLA,
main-branch semantics); see ``turbocompile.kernels.sagesla.ref`` for the exact math.

Layout is the model's own: q, k, v and the output are ``[B, L, H, D]`` (no transposes).
"""

from __future__ import annotations

import math

import torch

from turbocompile.kernels.sagesla import ref as _ref
from turbocompile.ops._backend import check_backend, resolve_backend

__all__ = ["sagesla", "QUANT_MODES", "HEAD_DIMS", "BLOCK_SIZES"]

QUANT_MODES = _ref.QUANT_MODES
HEAD_DIMS = (64, 128)
BLOCK_SIZES = (16, 32, 64, 128, 256)
_DTYPES = (torch.bfloat16, torch.float16)


def _validate(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend) -> None:
    """One-line ValueErrors naming the offending argument and the valid choices."""
    if quant not in QUANT_MODES:
        raise ValueError(f"sagesla: unknown quant '{quant}'; valid choices: {', '.join(QUANT_MODES)}")
    check_backend(backend)
    if q.dim() != 4:
        raise ValueError(f"sagesla: q must be [B, L, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"sagesla: q, k, v must have the same shape [B, L, H, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"sagesla: q, k, v must share one dtype among bfloat16, float16; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}")
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"sagesla: head dim D={D} unsupported; valid choices: {', '.join(map(str, HEAD_DIMS))}")
    if q.shape[1] < 1 or q.shape[0] < 1 or q.shape[2] < 1:
        raise ValueError(f"sagesla: B, L and H must be >= 1, got shape {tuple(q.shape)}")
    if not (isinstance(topk, (int, float)) and 0.0 < topk <= 1.0):
        raise ValueError(f"sagesla: topk must satisfy 0 < topk <= 1, got {topk}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk not in BLOCK_SIZES:
            raise ValueError(f"sagesla: {name}={blk} unsupported; valid choices: {', '.join(map(str, BLOCK_SIZES))}")
    if proj_weight is not None and tuple(proj_weight.shape) != (D, D):
        raise ValueError(f"sagesla: proj_weight must be [D, D] = [{D}, {D}], got {tuple(proj_weight.shape)}")
    if proj_bias is not None and tuple(proj_bias.shape) != (D,):
        raise ValueError(f"sagesla: proj_bias must be [D] = [{D}], got {tuple(proj_bias.shape)}")
    for name, t in (("k", k), ("v", v), ("proj_weight", proj_weight), ("proj_bias", proj_bias)):
        if t is not None and t.device != q.device:
            raise ValueError(f"sagesla: {name} is on {t.device}, q on {q.device}; all must share one device")


@torch.library.custom_op("turbocompile::sagesla", mutates_args=())
def _sagesla_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: float,
    proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None,
    block_q: int, block_k: int, quant: str, backend: str,
) -> torch.Tensor:
    _validate(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend)
    if resolve_backend(backend, q.device, "sagesla") == "triton":
        from turbocompile.kernels.sagesla.triton_attn import sagesla_triton

        return sagesla_triton(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant)
    out = _ref.sagesla_ref(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant)
    return out.contiguous()


@_sagesla_op.register_fake
def _sagesla_fake(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend):
    _validate(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend)
    return q.new_empty(q.shape)


def sagesla(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float,
    proj_weight: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
    block_q: int = 64, block_k: int = 128, quant: str = "int8-fp8",
    return_density: bool = False, backend: str = "auto",
):
    """SageSLA attention: sparse (top-k key blocks) quantized attention + linear branch.

    Args:
        q, k, v: ``[B, L, H, D]`` bfloat16/float16, D in {64, 128}, any L >= 1, any strides.
        topk: fraction of key blocks kept per query block, ``0 < topk <= 1``; at least one
            block is kept (``max(1, int(topk * Kb))``). ``1.0`` = dense SageAttention.
        proj_weight, proj_bias: the linear branch's ``proj_l`` (``[D, D]`` as nn.Linear, ``[D]``);
            absent = zero (the linear branch then contributes nothing).
        block_q, block_k: query / key block sizes (block map and quantization groups);
            defaults 64 / 128 are TurboDiffusion's SM90 geometry.
        quant: ``"int8-fp8"`` (INT8 QK, FP8 e4m3 PV), ``"int8-fp16"`` or ``"none"`` (plain SLA).
        return_density: also return the kept fraction of key blocks.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        ``out`` ``[B, L, H, D]`` in the input dtype, or ``(out, density)``.

    Example:
        >>> out = sagesla(q, k, v, topk=0.1, proj_weight=w, proj_bias=b)
    """
    out = torch.ops.turbocompile.sagesla(q, k, v, float(topk), proj_weight, proj_bias,
                                         int(block_q), int(block_k), quant, backend)
    if return_density:
        kb = math.ceil(q.shape[1] / block_k)
        return out, _ref.num_kept_blocks(topk, kb) / kb
    return out
