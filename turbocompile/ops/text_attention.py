"""Attention over text keys with the trailing run of repeated keys merged into one.

Two ops, emitted together by the ``merge_padding_keys`` pass for Wan's cross-attention:

* ``torch.ops.turbocompile.key_tail_start(k, v, backend) -> int32 [B, H]``: n, the first index of
  the trailing run of rows whose k and v equal the last row's (0 when all rows are equal; a NaN
  row is never equal). Wan's zero padding of the prompt makes that run the padding tokens.
* ``torch.ops.turbocompile.tail_merged_attention(q, k, v, tail_start, backend) -> [B, L, H, D]``:
  softmax attention over keys 0 .. n-1 and key n with multiplicity Lk - n (logit + ln(Lk - n)).
  With the n of ``key_tail_start`` this equals attention over all Lk keys, and its cost follows
  the prompt's real length instead of the padded one.

See ``turbocompile.kernels.text_attention.ref`` for the exact math. Layout ``[B, L, H, D]``.
"""

from __future__ import annotations

import torch

from turbocompile.kernels.text_attention import ref as _ref
from turbocompile.ops._backend import check_backend, resolve_backend
from turbocompile.ops._registry import define

__all__ = ["key_tail_start", "tail_merged_attention"]

_DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (16, 32, 64, 128, 256)


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
