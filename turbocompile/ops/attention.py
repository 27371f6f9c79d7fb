"""SageSLA attention ops: ``torch.ops.turbocompile.sagesla`` and ``torch.ops.turbocompile.sagesla_quant``.

Block-sparse attention with INT8 Q·Kᵀ and FP8 (or fp16) P·V over the top-k key blocks of
each query block, plus a linear-attention branch over all keys (TurboDiffusion's SageSLA,
main-branch semantics); see ``turbocompile.kernels.sagesla.ref`` for the exact math.

Layout is the model's own: q, k, v and the output are ``[B, L, H, D]`` (no transposes).

Optional precomputed block statistics (``q_pool``, ``k_blocksum``, ``v_absmax``; see
:func:`sagesla`) let the Triton path skip its pooling kernel: the ``fuse_attention_pooling`` pass
has the q/k RMSNorm+RoPE kernels produce them (``turbocompile::rmsnorm_rope_pool``). The reference
backend validates them and recomputes everything from q, k, v.

``sagesla_quant`` takes the same arguments and returns the output as the o projection's FP8 input,
``(codes [B*L, H*D] float8_e4m3fn, scales float32 [B*L, 1])`` at one scale per sample (an upper bound of
the sample's outputs / 448, see :func:`sagesla_quant`), written by the attention kernel's epilogue.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from turbocompile.kernels.sagesla import ref as _ref
from turbocompile.ops._backend import check_backend, resolve_backend
from turbocompile.ops._registry import define

__all__ = ["sagesla", "sagesla_quant", "QUANT_MODES", "HEAD_DIMS", "BLOCK_SIZES"]

QUANT_MODES = _ref.QUANT_MODES
HEAD_DIMS = (64, 128)
BLOCK_SIZES = (16, 32, 64, 128, 256)
_DTYPES = (torch.bfloat16, torch.float16)


def _validate(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend,
              q_pool=None, k_blocksum=None, v_absmax=None, op: str = "sagesla") -> None:
    """One-line ValueErrors naming the offending argument and the valid choices (``op`` names the op)."""
    try:
        _validate_args(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend,
                       q_pool, k_blocksum, v_absmax)
    except ValueError as exc:
        msg = str(exc)
        if op == "sagesla" or not msg.startswith("sagesla:"):
            raise
        raise type(exc)(op + msg[len("sagesla"):]) from None


def _validate_args(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend,
                   q_pool=None, k_blocksum=None, v_absmax=None) -> None:
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


@define("turbocompile::sagesla_quant")
def _sagesla_quant_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: float,
    proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None,
    block_q: int, block_k: int, quant: str, backend: str,
    q_pool: Optional[torch.Tensor] = None, k_blocksum: Optional[torch.Tensor] = None,
    v_absmax: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend, q_pool, k_blocksum, v_absmax,
              op="sagesla_quant")
    if resolve_backend(backend, q.device, "sagesla_quant") == "triton":
        from turbocompile.kernels.sagesla.triton_attn import sagesla_triton

        pooled = (q_pool, k_blocksum, v_absmax) if k_blocksum is not None else None
        return sagesla_triton(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, pooled=pooled,
                              fp8_out=True)
    return _ref.sagesla_quant_ref(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant)


@_sagesla_quant_op.register_fake
def _sagesla_quant_fake(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend,
                        q_pool=None, k_blocksum=None, v_absmax=None):
    _validate(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend, q_pool, k_blocksum, v_absmax,
              op="sagesla_quant")
    B, L, H, D = q.shape
    return (q.new_empty((B * L, H * D), dtype=torch.float8_e4m3fn),
            q.new_empty((B * L, 1), dtype=torch.float32))


def _check_python_args(name: str, q, k, v, topk, block_q, block_k) -> None:
    """Python-level types first: the op schema would coerce (0.1 from "0.1", 64 from 64.5) or fail deep inside."""
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {arg} must be a tensor [B, L, H, D], got {type(t).__name__}")
    if isinstance(topk, bool) or not isinstance(topk, (int, float)):
        raise ValueError(f"{name}: topk must be a number with 0 < topk <= 1, got {topk!r}")
    for arg, blk in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(blk, bool) or not isinstance(blk, int):
            raise ValueError(f"{name}: {arg} must be an integer, one of {', '.join(map(str, BLOCK_SIZES))}; "
                             f"got {blk!r}")


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
    _check_python_args("sagesla", q, k, v, topk, block_q, block_k)
    out = torch.ops.turbocompile.sagesla(q, k, v, float(topk), proj_weight, proj_bias,
                                         int(block_q), int(block_k), quant, backend, q_pool, k_blocksum, v_absmax)
    if return_density:
        kb = math.ceil(q.shape[1] / block_k)
        return out, _ref.num_kept_blocks(topk, kb) / kb
    return out


def sagesla_quant(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float,
    proj_weight: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
    block_q: int = 64, block_k: int = 128, quant: str = "int8-fp8", backend: str = "auto",
    q_pool: torch.Tensor | None = None, k_blocksum: torch.Tensor | None = None,
    v_absmax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SageSLA attention whose output is the o projection's FP8 input: codes at one scale per sample.

    The same arguments and attention as :func:`sagesla`; instead of the output ``o [B, L, H, D]`` it returns
    what ``w8a8_linear_prequant(format="fp8", act_granularity="per_token")`` takes for ``o.flatten(2)``:

        bound_b = 448·max(vs_b) · (1 + 2^-4 + R) + max|proj_bias|,   R = max_r Σ_c |proj_weight[r, c]|
        codes   = e4m3_rne(clamp(o_bf16 · (448 / bound_b), ±448)),   scales = bound_b / 448 for every token of b

    with ``vs_b`` the FP8 V scales of sample b (max |v| / 448 + 1e-7 per head and channel, so 448·max(vs_b) >=
    max |v[b]|) and ``o_bf16`` the output rounded to q's dtype as :func:`sagesla` returns it. ``bound_b``
    bounds every output of sample b: the sparse branch is a convex combination of value rows up to P's
    e4m3 rounding (the 2^-4), the linear branch a convex combination of value rows through proj_l (R, the
    bias); the derivation and what it leaves to the saturating cast are in
    :func:`turbocompile.kernels.sagesla.ref.output_bound_ref`. e4m3 being floating point, the larger scale
    keeps each value's relative precision down to 2^-6 · bound_b / 448; the Triton and Gluon kernels write the
    codes from their epilogues, so the o projection launches no quantizer.

    Args:
        q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend, q_pool, k_blocksum,
            v_absmax: as :func:`sagesla`.

    Returns:
        ``(codes [B*L, H*D] float8_e4m3fn, scales float32 [B*L, 1])``.

    Example:
        >>> qx, sx = sagesla_quant(q, k, v, topk=0.1, proj_weight=w, proj_bias=b)
        >>> y = w8a8_linear_prequant(qx, sx, qw, sw, bias, "fp8", "per_token", "per_channel")
    """
    _check_python_args("sagesla_quant", q, k, v, topk, block_q, block_k)
    return torch.ops.turbocompile.sagesla_quant(q, k, v, float(topk), proj_weight, proj_bias, int(block_q),
                                                int(block_k), quant, backend, q_pool, k_blocksum, v_absmax)
