"""SageSLA attention op: ``torch.ops.turbocompile.sagesla``.

Block-sparse attention with INT8 Q·Kᵀ and FP8 (or fp16) P·V over the top-k key blocks of
each query block, plus a linear-attention branch over all keys (TurboDiffusion's SageSLA,
main-branch semantics); see ``turbocompile.kernels.sagesla.ref`` for the exact math.

Layout is the model's own: q, k, v and the output are ``[B, L, H, D]`` (no transposes).

Optional precomputed block statistics (``q_pool``, ``k_blocksum``, ``v_absmax``; see
:func:`sagesla`) let the Triton path skip its pooling kernel: the ``fuse_attention_pooling`` pass
has the q/k RMSNorm+RoPE kernels produce them (``turbocompile::rmsnorm_rope_pool``). The reference
backend validates them and recomputes everything from q, k, v.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from turbocompile.kernels.sagesla import ref as _ref
from turbocompile.ops._backend import check_backend, resolve_backend
from turbocompile.ops._registry import define

__all__ = ["sagesla", "QUANT_MODES", "HEAD_DIMS", "BLOCK_SIZES"]

QUANT_MODES = _ref.QUANT_MODES
HEAD_DIMS = (64, 128)
BLOCK_SIZES = (16, 32, 64, 128, 256)
_DTYPES = (torch.bfloat16, torch.float16)


def _validate(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend,
              q_pool=None, k_blocksum=None, v_absmax=None) -> None:
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
    _validate_pooled(q, topk, block_q, block_k, q_pool, k_blocksum, v_absmax)


def _validate_pooled(q, topk, block_q, block_k, q_pool, k_blocksum, v_absmax) -> None:
    """The precomputed block statistics: none, or k_blocksum + v_absmax (+ q_pool, which only a
    dense op, keeping every key block, may leave out: it feeds the block map alone)."""
    if q_pool is None and k_blocksum is None and v_absmax is None:
        return
    if k_blocksum is None or v_absmax is None:
        raise ValueError("sagesla: precomputed pooling needs k_blocksum and v_absmax together (q_pool with them); "
                         f"got q_pool {_given(q_pool)}, k_blocksum {_given(k_blocksum)}, v_absmax {_given(v_absmax)}")
    B, L, H, D = q.shape
    Qb, Kb = math.ceil(L / block_q), math.ceil(L / block_k)
    if q_pool is None and _ref.num_kept_blocks(topk, Kb) < Kb:
        raise ValueError(f"sagesla: q_pool is required with k_blocksum and v_absmax when topk={topk} keeps "
                         f"{_ref.num_kept_blocks(topk, Kb)} of {Kb} key blocks (only a dense op may omit it)")
    shapes = (("q_pool", q_pool, (B * H, Qb, D), f"[B*H, ceil(L/block_q), D] = [{B * H}, {Qb}, {D}]"),
              ("k_blocksum", k_blocksum, (B * H, Kb, D), f"[B*H, ceil(L/block_k), D] = [{B * H}, {Kb}, {D}]"))
    for name, t, shape, text in shapes:
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"sagesla: {name} must be {text}, got {tuple(t.shape)}")
    if v_absmax.dim() != 3 or v_absmax.shape[0] != B * H or v_absmax.shape[2] != D or v_absmax.shape[1] < 1:
        raise ValueError(f"sagesla: v_absmax must be [B*H, NC, D] = [{B * H}, NC >= 1, {D}], got {tuple(v_absmax.shape)}")
    for name, t in (("q_pool", q_pool), ("k_blocksum", k_blocksum), ("v_absmax", v_absmax)):
        if t is None:
            continue
        if t.dtype != torch.float32:
            raise ValueError(f"sagesla: {name} must be float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"sagesla: {name} is on {t.device}, q on {q.device}; all must share one device")


def _given(t) -> str:
    return "given" if t is not None else "None"


@define("turbocompile::sagesla")
def _sagesla_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: float,
    proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None,
    block_q: int, block_k: int, quant: str, backend: str,
    q_pool: Optional[torch.Tensor] = None, k_blocksum: Optional[torch.Tensor] = None,
    v_absmax: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    _validate(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend, q_pool, k_blocksum, v_absmax)
    if resolve_backend(backend, q.device, "sagesla") == "triton":
        from turbocompile.kernels.sagesla.triton_attn import sagesla_triton

        pooled = (q_pool, k_blocksum, v_absmax) if k_blocksum is not None else None
        return sagesla_triton(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, pooled=pooled)
    # the reference recomputes the block statistics from q, k, v (they were validated above)
    out = _ref.sagesla_ref(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant)
    return out.contiguous()


@_sagesla_op.register_fake
def _sagesla_fake(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend,
                  q_pool=None, k_blocksum=None, v_absmax=None):
    _validate(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend, q_pool, k_blocksum, v_absmax)
    return q.new_empty(q.shape)


def sagesla(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float,
    proj_weight: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
    block_q: int = 64, block_k: int = 128, quant: str = "int8-fp8",
    return_density: bool = False, backend: str = "auto",
    q_pool: torch.Tensor | None = None, k_blocksum: torch.Tensor | None = None,
    v_absmax: torch.Tensor | None = None,
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
        q_pool, k_blocksum, v_absmax: optional precomputed block statistics of these q, k, v (fp32,
            row b*H + h = batch b, head h), so that the Triton path launches no pooling kernel of its
            own: ``q_pool`` ``[B*H, ceil(L/block_q), D]`` the mean of q's rows per query block (over
            the actual rows of the last, partial block), ``k_blocksum`` ``[B*H, ceil(L/block_k), D]``
            the sum of k's rows per key block, ``v_absmax`` ``[B*H, NC, D]`` the max |v| per channel
            over any NC >= 1 chunks of v's rows (reduced over NC; e.g. one per key block).
            ``k_blocksum`` and ``v_absmax`` go together; ``q_pool`` is needed with them unless the op
            is dense (topk keeps every key block). They must match q, k, v (they are trusted); the
            torch backend validates them and recomputes everything. See
            ``turbocompile::rmsnorm_rope_pool``, which computes them in the q/k norm kernels.

    Returns:
        ``out`` ``[B, L, H, D]`` in the input dtype, or ``(out, density)``.

    Example:
        >>> out = sagesla(q, k, v, topk=0.1, proj_weight=w, proj_bias=b)
    """
    # Python-level types first: the op schema would coerce (0.1 from "0.1", 64 from 64.5) or fail deep inside
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"sagesla: {name} must be a tensor [B, L, H, D], got {type(t).__name__}")
    if isinstance(topk, bool) or not isinstance(topk, (int, float)):
        raise ValueError(f"sagesla: topk must be a number with 0 < topk <= 1, got {topk!r}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(blk, bool) or not isinstance(blk, int):
            raise ValueError(f"sagesla: {name} must be an integer, one of {', '.join(map(str, BLOCK_SIZES))}; "
                             f"got {blk!r}")
    out = torch.ops.turbocompile.sagesla(q, k, v, float(topk), proj_weight, proj_bias,
                                         int(block_q), int(block_k), quant, backend, q_pool, k_blocksum, v_absmax)
    if return_density:
        kb = math.ceil(q.shape[1] / block_k)
        return out, _ref.num_kept_blocks(topk, kb) / kb
    return out
