"""Attention over text keys with the trailing run of repeated keys merged into one.

Two ops, emitted together by the ``merge_padding_keys`` pass for Wan's cross-attention:

* ``torch.ops.turbocompile.key_tail_start(k, v, backend) -> int32 [B, H]``: n, the first index of
  the trailing run of rows whose k and v equal the last row's (0 when all rows are equal; a NaN
  row is never equal). Wan's zero padding of the prompt makes that run the padding tokens.
* ``torch.ops.turbocompile.tail_merged_attention(q, k, v, tail_start, backend) -> [B, L, H, D]``:
  softmax attention over keys 0 .. n-1 and key n with multiplicity Lk - n (logit + ln(Lk - n)).
  With the n of ``key_tail_start`` this equals attention over all Lk keys, and its cost follows
  the prompt's real length instead of the padded one.

A third op, emitted by the ``fuse_text_attention`` pass, runs the whole cross-attention between the q and
o projections as one op (with the triton backend: an rstd pass over z, or none given ``sumsq``, then one attention
kernel, Triton's or, on Hopper, a persistent Gluon one with the same codes):

* ``torch.ops.turbocompile.norm_attention_quant(z, weight, k, v, v_bound, tail_start, num_heads, eps,
  backend, sumsq=None) -> (codes [B*L, D], scales [B*L, 1])``: q RMSNorm of the raw projection ``z [B, L, D]``,
  attention over k, v (tail-merged when ``tail_start`` is given), and FP8 codes of the result at the scale
  ``v_bound[b] / 448`` for the o projection's ``w8a8_linear_prequant``; ``sumsq`` (optional, so graphs
  saved without it keep loading): z's granule sums of squares from the q GEMM
  (``w8a8_linear_prequant_sumsq``), which replace the op's own pass over z for the RMSNorm statistic;
* ``torch.ops.turbocompile.value_bound(v) -> [B]``: that bound, ``max |v|`` per sample (text only).

See ``turbocompile.kernels.text_attention.ref`` for the exact math. Layout ``[B, L, H, D]``.
"""

from __future__ import annotations

from typing import Optional

import torch

from turbocompile.kernels.text_attention import ref as _ref
from turbocompile.kernels.w8a8 import ref as _w8a8_ref
from turbocompile.ops._backend import check_backend, resolve_backend
from turbocompile.ops._registry import define

__all__ = ["key_tail_start", "norm_attention_quant", "tail_merged_attention", "value_bound"]

_DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (16, 32, 64, 128, 256)
# columns per entry of norm_attention_quant's sumsq: the q GEMM epilogue's granule (kernels/w8a8, 128)
_SUMSQ_GRANULE = _w8a8_ref.BLOCK


def _validate_kv(name: str, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"{name}: k and v must be [B, Lk, H, D] of one shape, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.dtype not in _DTYPES or v.dtype != k.dtype:
        raise ValueError(f"{name}: k and v must share one dtype among bfloat16, float16; got {k.dtype}, {v.dtype}")
    if k.shape[1] < 1:
        raise ValueError(f"{name}: k and v need at least one key (Lk >= 1), got shape {tuple(k.shape)}")
    if k.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{name}: head dim D={k.shape[-1]} unsupported; valid choices: "
                         f"{', '.join(map(str, HEAD_DIMS))}")
    if v.device != k.device:
        raise ValueError(f"{name}: v is on {v.device}, k on {k.device}; both must share one device")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@define("turbocompile::key_tail_start")
def _key_tail_start_op(k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    _validate_kv("key_tail_start", k, v)
    check_backend(backend)
    if resolve_backend(backend, k.device, "key_tail_start") == "triton":
        from turbocompile.kernels.text_attention.triton_tail_merged import key_tail_start_triton

        return key_tail_start_triton(_unit_last(k), _unit_last(v))
    return _ref.key_tail_start_ref(k, v)


@_key_tail_start_op.register_fake
def _key_tail_start_fake(k, v, backend):
    _validate_kv("key_tail_start", k, v)
    return k.new_empty((k.shape[0], k.shape[2]), dtype=torch.int32)


def _validate_attention(q, k, v, tail_start) -> None:
    _validate_kv("tail_merged_attention", k, v)
    if q.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"tail_merged_attention: q must be [B, L, H, D] with k's B, H, D; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"tail_merged_attention: q must share k's dtype and device; got {q.dtype} on {q.device}, "
                         f"k {k.dtype} on {k.device}")
    B, H = k.shape[0], k.shape[2]
    if tuple(tail_start.shape) != (B, H) or tail_start.dtype != torch.int32 or tail_start.device != k.device:
        raise ValueError(f"tail_merged_attention: tail_start must be int32 [B, H] = [{B}, {H}] on {k.device}; got "
                         f"{tail_start.dtype} {tuple(tail_start.shape)} on {tail_start.device}")


@define("turbocompile::tail_merged_attention")
def _tail_merged_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tail_start: torch.Tensor,
                              backend: str) -> torch.Tensor:
    _validate_attention(q, k, v, tail_start)
    check_backend(backend)
    if resolve_backend(backend, q.device, "tail_merged_attention") == "triton":
        from turbocompile.kernels.text_attention.triton_tail_merged import tail_merged_attention_triton

        return tail_merged_attention_triton(_unit_last(q), _unit_last(k), _unit_last(v), tail_start.contiguous())
    return _ref.tail_merged_attention_ref(q, k, v, tail_start)


@_tail_merged_attention_op.register_fake
def _tail_merged_attention_fake(q, k, v, tail_start, backend):
    _validate_attention(q, k, v, tail_start)
    return q.new_empty(q.shape)


def key_tail_start(k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Start of the trailing run of key rows equal to the last one, per batch and head.

    Args:
        k, v: ``[B, Lk, H, D]`` bfloat16/float16, Lk >= 1.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        int32 ``[B, H]``: n such that rows n .. Lk-1 of k and v all equal row Lk-1 (as floating-point
        values) and row n-1 does not (n = 0 when every row does).
    """
    return torch.ops.turbocompile.key_tail_start(k, v, backend)


def tail_merged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tail_start: torch.Tensor, *,
                          backend: str = "auto") -> torch.Tensor:
    """Softmax attention (scale D^-1/2) with the keys from ``tail_start`` on merged into one.

    Args:
        q: ``[B, L, H, D]``; k, v: ``[B, Lk, H, D]``; one dtype (bfloat16/float16), any strides.
        tail_start: int32 ``[B, H]``, n in [0, Lk]: keys n .. Lk-1 count as Lk - n copies of key n
            (n = Lk: plain attention). From :func:`key_tail_start` the result equals attention over
            all Lk keys, computed over n + 1 of them.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        ``[B, L, H, D]`` in q's dtype.

    Example:
        >>> n = key_tail_start(k, v)           # once per prompt: k, v depend on the text only
        >>> out = tail_merged_attention(q, k, v, n)
    """
    return torch.ops.turbocompile.tail_merged_attention(q, k, v, tail_start, backend)


def _validate_norm_attention(z, weight, k, v, v_bound, tail_start, num_heads, eps, sumsq=None) -> None:
    op = "norm_attention_quant"
    _validate_kv(op, k, v)
    B, Lk, H, d = k.shape
    if z.dim() != 3 or z.shape[0] != B or z.shape[2] != H * d:
        raise ValueError(f"{op}: z must be [B, L, H*d] = [{B}, L, {H * d}] for k {tuple(k.shape)}, got "
                         f"{tuple(z.shape)}")
    if z.dtype != k.dtype or z.device != k.device:
        raise ValueError(f"{op}: z must share k's dtype and device; got {z.dtype} on {z.device}, "
                         f"k {k.dtype} on {k.device}")
    if num_heads != H:
        raise ValueError(f"{op}: num_heads={num_heads} but k has {H} heads")
    if weight.shape != (H * d,) or weight.dtype not in (z.dtype, torch.float32) or weight.device != z.device:
        raise ValueError(f"{op}: weight must be [{H * d}] in {z.dtype} or float32 on {z.device}; got "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
    if not eps > 0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")
    if tuple(v_bound.shape) != (B,) or v_bound.dtype != torch.float32 or v_bound.device != k.device:
        raise ValueError(f"{op}: v_bound must be float32 [B] = [{B}] on {k.device} (see value_bound); got "
                         f"{v_bound.dtype} {tuple(v_bound.shape)} on {v_bound.device}")
    if tail_start is not None and (tuple(tail_start.shape) != (B, H) or tail_start.dtype != torch.int32
                                   or tail_start.device != k.device):
        raise ValueError(f"{op}: tail_start must be int32 [B, H] = [{B}, {H}] on {k.device} or None; got "
                         f"{tail_start.dtype} {tuple(tail_start.shape)} on {tail_start.device}")
    if sumsq is not None:
        rows, g = z.shape[0] * z.shape[1], -(-z.shape[2] // _SUMSQ_GRANULE)
        if tuple(sumsq.shape) != (rows, g) or sumsq.dtype != torch.float32 or sumsq.device != z.device:
            raise ValueError(f"{op}: sumsq must be float32 [B*L, ceil(D/{_SUMSQ_GRANULE})] = [{rows}, {g}] on "
                             f"{z.device} (z's granule sums of squares, see w8a8_linear_prequant_sumsq) or None; "
                             f"got {sumsq.dtype} {tuple(sumsq.shape)} on {sumsq.device}")


@define("turbocompile::value_bound")
def _value_bound_op(v: torch.Tensor) -> torch.Tensor:
    _validate_kv("value_bound", v, v)
    # one small reduction per prompt (the baked sampler shares it between steps): torch's own kernel on
    # every device, there is nothing to fuse it with
    return _ref.value_bound_ref(v)


@_value_bound_op.register_fake
def _value_bound_fake(v):
    _validate_kv("value_bound", v, v)
    return v.new_empty((v.shape[0],), dtype=torch.float32)


@define("turbocompile::norm_attention_quant")
def _norm_attention_quant_op(z: torch.Tensor, weight: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             v_bound: torch.Tensor, tail_start: Optional[torch.Tensor], num_heads: int, eps: float,
                             backend: str, sumsq: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    _validate_norm_attention(z, weight, k, v, v_bound, tail_start, num_heads, eps, sumsq)
    check_backend(backend)
    if resolve_backend(backend, z.device, "norm_attention_quant") == "triton":
        from turbocompile.kernels.text_attention.triton_norm_attn_quant import norm_attention_quant_triton

        return norm_attention_quant_triton(_unit_last(z), weight.contiguous(), _unit_last(k), _unit_last(v),
                                           v_bound.contiguous(), None if tail_start is None else tail_start.contiguous(),
                                           num_heads, eps, sumsq=None if sumsq is None else _unit_last(sumsq))
    return _ref.norm_attention_quant_ref(z, weight, k, v, v_bound, tail_start, num_heads, eps, sumsq)


@_norm_attention_quant_op.register_fake
def _norm_attention_quant_fake(z, weight, k, v, v_bound, tail_start, num_heads, eps, backend, sumsq=None):
    _validate_norm_attention(z, weight, k, v, v_bound, tail_start, num_heads, eps, sumsq)
    m = z.shape[0] * z.shape[1]
    return z.new_empty((m, z.shape[2]), dtype=torch.float8_e4m3fn), z.new_empty((m, 1), dtype=torch.float32)


def value_bound(v: torch.Tensor) -> torch.Tensor:
    """``max(max |v[b]|, 1e-8)`` per sample of v ``[B, Lk, H, d]`` as float32 ``[B]``: an upper bound of every
    softmax-attention output over these values (each is a convex combination of value rows), the scale
    source of :func:`norm_attention_quant`. Depends on the text only (computed once per prompt)."""
    return torch.ops.turbocompile.value_bound(v)


def norm_attention_quant(z: torch.Tensor, weight: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         v_bound: torch.Tensor | None = None, tail_start: torch.Tensor | None = None, *,
                         num_heads: int, eps: float = 1e-6, backend: str = "auto",
                         sumsq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's cross-attention from the raw q projection to the o projection's FP8 input, fused.

    ``codes = e4m3(attention(rmsnorm(z) · w, k, v) · 448 / v_bound[b])`` with q and the attention output
    rounded to z's dtype as the unfused graph stores them; every token of sample b gets the scale
    ``v_bound[b] / 448`` (an upper bound of its outputs, so no clamping beyond rounding, and e4m3's relative
    precision is kept for all but subnormal values). Reference:
    :func:`turbocompile.kernels.text_attention.ref.norm_attention_quant_ref`.

    Args:
        z: ``[B, L, H*d]`` bfloat16/float16, the q projection before its RMSNorm.
        weight: ``[H*d]`` the RMSNorm weight, z's dtype or float32.
        k, v: ``[B, Lk, H, d]`` in z's dtype, d in 16/32/64/128/256.
        v_bound: float32 ``[B]`` from :func:`value_bound` (computed here when None).
        tail_start: optional int32 ``[B, H]`` from :func:`key_tail_start` (keys n.. merged into key n);
            None attends to all Lk keys.
        num_heads: H. eps: the RMSNorm epsilon.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.
        sumsq: optional float32 ``[B*L, ceil(H*d/128)]``: the sums of squares of z's rows per 128 columns,
            as :func:`turbocompile.ops.w8a8.w8a8_linear_prequant_sumsq` returns them with z. Given, the RMSNorm
            takes ``rstd = rsqrt(sum_g sumsq / (H*d) + eps)`` from them and the Triton backend skips its
            pass over z; the result equals the one without up to the fp32 summation order of the statistic
            (which may move a q element across a rounding boundary, rarely). None: computed from z.

    Returns:
        ``(codes [B*L, H*d] float8_e4m3fn, scales float32 [B*L, 1])``, what
        :func:`turbocompile.ops.w8a8.w8a8_linear_prequant` takes with ``format="fp8"``, per-token scales.
    """
    if v_bound is None:
        v_bound = value_bound(v)
    return torch.ops.turbocompile.norm_attention_quant(z, weight, k, v, v_bound, tail_start, int(num_heads),
                                                       float(eps), backend, sumsq)
