"""Fused norm ops for the Wan DiT: ``torch.ops.turbocompile.{ln_modulate, residual_ln_modulate,
rmsnorm_rope, rmsnorm_rope_pool, ln_modulate_quant, residual_ln_modulate_quant, ln_modulate_quant_bound,
residual_ln_modulate_quant_bound}``.

Each op has a fake kernel (shapes/dtypes only), the PyTorch reference
(:mod:`turbocompile.kernels.norms.ref`) and a Triton kernel (imported lazily); the final
``backend`` argument picks one ("auto" | "triton" | "torch", see :mod:`turbocompile.ops._backend`).

Numerics: LayerNorm, affine and ``(1 + scale) + shift`` stay in fp32 with a single rounding to
the output dtype. TurboDiffusion (and the canonical model) round the LN output to bf16 before
the modulation, so these ops are slightly *more* accurate and not bit-identical to it. The
residual add, the RMSNorm and the quantizers reproduce the eager rounding exactly.

Example::

    from turbocompile.ops import norms
    h = norms.ln_modulate(x, shift=sh_a, scale=sc_a)           # x [B, L, D] bf16, sh/sc [B, 1, D] fp32
    x, h = norms.residual_ln_modulate(x, y, gate=g_a, shift=sh_f, scale=sc_f)
    q = norms.rmsnorm_rope(q_proj, w_q, cos, sin, num_heads=40)
"""

from __future__ import annotations

from typing import Optional

import torch

from turbocompile.kernels.norms import ref
from turbocompile.ops._backend import resolve_backend
from turbocompile.ops._registry import define

__all__ = [
    "ln_modulate",
    "residual_ln_modulate",
    "rmsnorm_rope",
    "rmsnorm_rope_pool",
    "ln_modulate_quant",
    "residual_ln_modulate_quant",
    "ln_modulate_quant_bound",
    "residual_ln_modulate_quant_bound",
    "QUANT_FORMATS",
    "QUANT_GRANULARITIES",
]

QUANT_FORMATS = ("int8", "fp8")
QUANT_GRANULARITIES = ("per_token", "block128")
_QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- validation
def _check_x(op: str, x: torch.Tensor) -> int:
    if x.dim() not in (2, 3):
        raise ValueError(f"{op}: x must be [B, L, D] or [M, D], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{op}: x dtype {x.dtype} not supported (float32, bfloat16, float16)")
    return x.shape[-1]


def _check_vec(op: str, name: str, t: Optional[torch.Tensor], D: int) -> None:
    if t is not None and (t.dim() != 1 or t.shape[0] != D):
        raise ValueError(f"{op}: {name} must be [D={D}], got shape {tuple(t.shape)}")


def _check_rowvec(op: str, name: str, t: Optional[torch.Tensor], x: torch.Tensor) -> None:
    """shift/scale/gate broadcast to x: [B,1,D], [1,1,D], [B,L,D], [D] ... (last dim D)."""
    if t is None:
        return
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")
    # broadcasts to x without growing it: right-aligned, every dim 1 or x's (torch.broadcast_shapes
    # gives the same answer at ~10x the host time, paid on every call of these ops)
    ts, xs = t.shape, x.shape
    nt = len(ts)
    ok = 0 < nt <= len(xs) and ts[-1] == xs[-1] and all(a == 1 or a == b for a, b in zip(ts, xs[len(xs) - nt:]))
    if not ok:
        raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} does not broadcast to x {tuple(x.shape)} "
                         "with a full last dim")


def _check_ln_args(op, x, weight, bias, shift, scale, gate=None):
    D = _check_x(op, x)
    _check_vec(op, "weight", weight, D)
    _check_vec(op, "bias", bias, D)
    for name, t in (("shift", shift), ("scale", scale), ("gate", gate)):
        _check_rowvec(op, name, t, x)
    return D


def _check_quant(op: str, fmt: str, granularity: str) -> None:
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"{op}: unknown format '{fmt}'; valid: {', '.join(QUANT_FORMATS)}")
    if granularity not in QUANT_GRANULARITIES:
        raise ValueError(f"{op}: unknown granularity '{granularity}'; valid: {', '.join(QUANT_GRANULARITIES)}")


def _scale_shape(M: int, D: int, granularity: str) -> tuple[int, int]:
    return (M, 1) if granularity == "per_token" else (-(-M // 128), -(-D // 128))


# ----------------------------------------------------------------------------- ln_modulate
@define("turbocompile::ln_modulate")
def _ln_modulate(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], eps: float,
    out_dtype: Optional[torch.dtype], backend: str,
) -> torch.Tensor:
    op = "turbocompile::ln_modulate"
    _check_ln_args(op, x, weight, bias, shift, scale)
    out_dtype = out_dtype or x.dtype
    if resolve_backend(backend, x.device, op) == "triton":
        from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton

        return ln_modulate_triton(x, weight, bias, shift, scale, eps, out_dtype)
    return ref.layer_norm_modulate_ref(x, weight, bias, shift, scale, eps, out_dtype).contiguous()


@_ln_modulate.register_fake
def _(x, weight, bias, shift, scale, eps, out_dtype, backend):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


def ln_modulate(
    x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None, eps: float = 1e-6,
    out_dtype: Optional[torch.dtype] = None, backend: str = "auto",
) -> torch.Tensor:
    """``(LayerNorm(x)·weight + bias)·(1 + scale) + shift`` over the last dim, in fp32.

    Args:
        x: [B, L, D] or [M, D], fp32/bf16/fp16.
        weight, bias: optional LN affine [D].
        shift, scale: optional AdaLN modulation broadcasting to x ([B,1,D] or [1,1,D] fp32; per-token
            [B,L,D] works too).
        eps: LN epsilon (Wan: 1e-6).
        out_dtype: output dtype, default x.dtype (the head uses float32).
        backend: "auto" | "triton" | "torch".

    Example: ``h = ln_modulate(x, shift=sh_a, scale=sc_a)`` replaces
    ``(F.layer_norm(x.float(), (D,), eps=1e-6).to(dt).float() * (1 + sc_a) + sh_a).to(dt)``.
    """
    return torch.ops.turbocompile.ln_modulate(x, weight, bias, shift, scale, eps, out_dtype, backend)


# ----------------------------------------------------------------------------- residual_ln_modulate
@define("turbocompile::residual_ln_modulate")
def _residual_ln_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], shift: Optional[torch.Tensor], scale: Optional[torch.Tensor],
    eps: float, out_dtype: Optional[torch.dtype], backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "turbocompile::residual_ln_modulate"
    _check_ln_args(op, x, weight, bias, shift, scale, gate)
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"{op}: y {tuple(y.shape)} {y.dtype} must match x {tuple(x.shape)} {x.dtype}")
    out_dtype = out_dtype or x.dtype
    if resolve_backend(backend, x.device, op) == "triton":
        from turbocompile.kernels.norms.triton_layernorm import residual_ln_modulate_triton

        return residual_ln_modulate_triton(x, y, gate, weight, bias, shift, scale, eps, out_dtype)
    x_new, h = ref.residual_ln_modulate_ref(x, y, gate, weight, bias, shift, scale, eps, out_dtype)
    return x_new.contiguous(), h.contiguous()


@_residual_ln_modulate.register_fake
def _(x, y, gate, weight, bias, shift, scale, eps, out_dtype, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype or x.dtype)


def residual_ln_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None, eps: float = 1e-6,
    out_dtype: Optional[torch.dtype] = None, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated residual add then LN-modulate, one pass over x and y: returns ``(x_new, h)``.

    ``x_new = x + y * gate.to(x.dtype)`` rounded exactly like the eager ops (product rounded to
    x.dtype, then the sum); ``gate=None`` is the plain ``x + y``. ``h = ln_modulate(x_new, ...)``.

    Example (end of a block's FFN feeding the next block's attention pre-norm)::

        x, h = residual_ln_modulate(x, ffn_out, gate=g_f, shift=next_sh_a, scale=next_sc_a)
    """
    return torch.ops.turbocompile.residual_ln_modulate(
        x, y, gate, weight, bias, shift, scale, eps, out_dtype, backend)


# ----------------------------------------------------------------------------- rmsnorm_rope
def _check_rmsnorm_rope(op: str, z, weight, cos, sin, num_heads: int, heads_required: bool) -> None:
    """Arguments of the RMSNorm+RoPE ops (``heads_required``: num_heads must split D into even
    heads even without RoPE, as the pooled outputs are per head)."""
    if z.dim() != 3:
        raise ValueError(f"{op}: z must be [B, L, D], got shape {tuple(z.shape)}")
    if z.dtype not in _FLOATS:
        raise ValueError(f"{op}: z dtype {z.dtype} not supported (float32, bfloat16, float16)")
    B, L, D = z.shape
    _check_vec(op, "weight", weight, D)
    if weight.dtype not in (z.dtype, torch.float32):
        raise ValueError(f"{op}: weight dtype {weight.dtype} must be z.dtype ({z.dtype}) or float32")
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: cos and sin must both be given or both be None")
    if cos is not None or heads_required:
        if num_heads <= 0 or D % num_heads or (D // num_heads) % 2:
            raise ValueError(f"{op}: D={D} must split into num_heads={num_heads} heads of even size")
    if cos is not None:
        half = D // num_heads // 2
        for name, t in (("cos", cos), ("sin", sin)):
            if t.numel() != L * half or t.shape[-1] != half:
                raise ValueError(f"{op}: {name} must be [L={L}, d/2={half}], got shape {tuple(t.shape)}")


@define("turbocompile::rmsnorm_rope")
def _rmsnorm_rope(
    z: torch.Tensor, weight: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
    num_heads: int, eps: float, backend: str,
) -> torch.Tensor:
    op = "turbocompile::rmsnorm_rope"
    _check_rmsnorm_rope(op, z, weight, cos, sin, num_heads, heads_required=False)
    B, L, D = z.shape
    if resolve_backend(backend, z.device, op) == "triton":
        from turbocompile.kernels.norms.triton_rmsnorm_rope import rmsnorm_rope_triton

        return rmsnorm_rope_triton(z, weight, cos, sin, num_heads, eps)
    c = cos.reshape(L, -1) if cos is not None else None
    s = sin.reshape(L, -1) if sin is not None else None
    return ref.rmsnorm_rope_ref(z, weight, c, s, num_heads, eps).contiguous()


@_rmsnorm_rope.register_fake
def _(z, weight, cos, sin, num_heads, eps, backend):
    return z.new_empty(z.shape)


def rmsnorm_rope(
    z: torch.Tensor, weight: torch.Tensor, cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None, num_heads: int = 1, eps: float = 1e-6, backend: str = "auto",
) -> torch.Tensor:
    """Wan q/k RMSNorm over all D channels (weight applied after rounding to z.dtype), then
    interleaved RoPE on each of ``num_heads`` heads; ``cos=sin=None`` is RMSNorm only.

    Args:
        z: [B, L, D] projection output (rows may be strided, e.g. a slice of a fused qkv output).
        weight: [D], z.dtype or float32.
        cos, sin: [L, d/2] float32 tables (d = D / num_heads), angle θ[l, j] for pair (2j, 2j+1).
        num_heads: H. eps: 1e-6 in Wan.

    Returns [B, L, D] contiguous, z.dtype. Example: ``q = rmsnorm_rope(q, w_q, cos, sin, num_heads=40)``.
    """
    return torch.ops.turbocompile.rmsnorm_rope(z, weight, cos, sin, num_heads, eps, backend)


# ----------------------------------------------------------------------------- rmsnorm_rope_pool
@define("turbocompile::rmsnorm_rope_pool")
def _rmsnorm_rope_pool(
    z: torch.Tensor, weight: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
    num_heads: int, eps: float, pool_rows: int, mean: bool, v: Optional[torch.Tensor], backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "turbocompile::rmsnorm_rope_pool"
    _check_pool_args(op, z, weight, cos, sin, num_heads, pool_rows, v)
    B, L, D = z.shape
    if resolve_backend(backend, z.device, op) == "triton":
        from turbocompile.kernels.norms.triton_rmsnorm_rope_pool import rmsnorm_rope_pool_triton

        out, pooled, vmax = rmsnorm_rope_pool_triton(z, weight, cos, sin, num_heads, eps, pool_rows, mean, v)
    else:
        c = cos.reshape(L, -1) if cos is not None else None
        s = sin.reshape(L, -1) if sin is not None else None
        out, pooled, vmax = ref.rmsnorm_rope_pool_ref(z, weight, c, s, num_heads, eps, pool_rows, mean, v)
        out = out.contiguous()
    return out, pooled, (vmax if vmax is not None else _no_vmax(z))


def _check_pool_args(op, z, weight, cos, sin, num_heads, pool_rows, v) -> None:
    _check_rmsnorm_rope(op, z, weight, cos, sin, num_heads, heads_required=True)
    if isinstance(pool_rows, bool) or not isinstance(pool_rows, int) or pool_rows < 1:
        raise ValueError(f"{op}: pool_rows must be an integer >= 1, got {pool_rows!r}")
    if v is not None:
        if v.shape != z.shape or v.dtype not in _FLOATS:
            raise ValueError(f"{op}: v must be [B, L, D] = {tuple(z.shape)} in float32, bfloat16 or float16, got "
                             f"{tuple(v.shape)} {v.dtype}")
        if v.device != z.device:
            raise ValueError(f"{op}: v is on {v.device}, z on {z.device}; both must share one device")


def _no_vmax(z: torch.Tensor) -> torch.Tensor:
    """The vmax output without v: an empty [0] fp32 tensor (ops cannot return None)."""
    return z.new_empty((0,), dtype=torch.float32)


@_rmsnorm_rope_pool.register_fake
def _(z, weight, cos, sin, num_heads, eps, pool_rows, mean, v, backend):
    _check_pool_args("turbocompile::rmsnorm_rope_pool", z, weight, cos, sin, num_heads, pool_rows, v)
    B, L, D = z.shape
    shape = (B * num_heads, -(-L // pool_rows), D // num_heads)
    vmax = z.new_empty(shape, dtype=torch.float32) if v is not None else _no_vmax(z)
    return z.new_empty(z.shape), z.new_empty(shape, dtype=torch.float32), vmax


def rmsnorm_rope_pool(
    z: torch.Tensor, weight: torch.Tensor, cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None, num_heads: int = 1, eps: float = 1e-6, *, pool_rows: int,
    mean: bool, v: Optional[torch.Tensor] = None, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`rmsnorm_rope` that also pools its output per head and block of tokens (SageSLA's
    block statistics, computed while the rows pass through instead of by a kernel re-reading them).

    Args:
        z, weight, cos, sin, num_heads, eps: as :func:`rmsnorm_rope`; ``num_heads`` must split D
            into heads of even size (also without RoPE: the pooling is per head).
        pool_rows: tokens per block (SageSLA's block_q for q, block_k for k); blocks never cross
            batch elements, the last block of each may be partial.
        mean: True: the mean over the block's actual rows (SageSLA's q̄); False: the sum (its k
            block sums).
        v: optional [B, L, D] (rows may be strided, e.g. the v slice of a fused qkv output), read
            in the same pass for its per-block |v| channel maxima.

    Returns ``(out, pooled, vmax)``: ``out`` [B, L, D] contiguous in z.dtype (:func:`rmsnorm_rope`'s
    values; on the GPU the row's fp32 sum of squares may be reduced in another order, a last-bit
    difference in rare elements), ``pooled`` [B*H, ceil(L/pool_rows), D/H] fp32 computed from the stored
    (rounded to z.dtype) ``out`` values, ``vmax`` [B*H, ceil(L/pool_rows), D/H] fp32, or an empty
    [0] fp32 tensor when v is None. Row b*H + h of the pooled tensors is batch b, head h.

    Example: ``k, k_sum, v_max = rmsnorm_rope_pool(k, w_k, cos, sin, 12, pool_rows=128, mean=False, v=v)``.
    """
    return torch.ops.turbocompile.rmsnorm_rope_pool(z, weight, cos, sin, num_heads, eps, pool_rows, bool(mean), v,
                                                    backend)


# ----------------------------------------------------------------------------- quant epilogues
@define("turbocompile::ln_modulate_quant")
def _ln_modulate_quant(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], eps: float,
    format: str, granularity: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "turbocompile::ln_modulate_quant"
    _check_ln_args(op, x, weight, bias, shift, scale)
    _check_quant(op, format, granularity)
    if resolve_backend(backend, x.device, op) == "triton":
        from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton

        return ln_modulate_triton(x, weight, bias, shift, scale, eps, x.dtype, quant=(format, granularity))
    return ref.ln_modulate_quant_ref(x, weight, bias, shift, scale, eps, format, granularity)


@_ln_modulate_quant.register_fake
def _(x, weight, bias, shift, scale, eps, format, granularity, backend):
    D = x.shape[-1]
    M = x.numel() // D if D else 0
    return (x.new_empty((M, D), dtype=_QDTYPE[format]),
            x.new_empty(_scale_shape(M, D, granularity), dtype=torch.float32))


def ln_modulate_quant(
    x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None, eps: float = 1e-6,
    format: str = "int8", granularity: str = "per_token", backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ln_modulate`` rounded to x.dtype, then quantized for a W8A8 linear: returns
    ``(q [M, D], scale)`` with M = B·L rows.

    The quantizer is ``turbocompile::quantize_activation``'s: amax = max(1e-8, max|h|) per group
    in fp32. INT8: q = rint(h·(128/amax)) saturated to [-128, 127], scale = amax/128. FP8 e4m3:
    q = e4m3(clamp(h·(448/amax), ±448)), scale = amax/448. granularity "per_token" gives scale [M, 1],
    "block128" gives [ceil(M/128), ceil(D/128)] (TurboDiffusion's 128×128 blocks).

    Example: ``qx, sx = ln_modulate_quant(x, shift=sh_a, scale=sc_a, format="fp8")``.
    """
    return torch.ops.turbocompile.ln_modulate_quant(
        x, weight, bias, shift, scale, eps, format, granularity, backend)


@define("turbocompile::residual_ln_modulate_quant")
def _residual_ln_modulate_quant(
    x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], shift: Optional[torch.Tensor], scale: Optional[torch.Tensor],
    eps: float, format: str, granularity: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "turbocompile::residual_ln_modulate_quant"
    _check_ln_args(op, x, weight, bias, shift, scale, gate)
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"{op}: y {tuple(y.shape)} {y.dtype} must match x {tuple(x.shape)} {x.dtype}")
    _check_quant(op, format, granularity)
    if resolve_backend(backend, x.device, op) == "triton":
        from turbocompile.kernels.norms.triton_layernorm import residual_ln_modulate_triton

        return residual_ln_modulate_triton(x, y, gate, weight, bias, shift, scale, eps, x.dtype,
                                           quant=(format, granularity))
    x_new = ref.gated_residual_ref(x, y, gate)
    q, s = ref.ln_modulate_quant_ref(x_new, weight, bias, shift, scale, eps, format, granularity)
    return x_new.contiguous(), q, s


@_residual_ln_modulate_quant.register_fake
def _(x, y, gate, weight, bias, shift, scale, eps, format, granularity, backend):
    D = x.shape[-1]
    M = x.numel() // D if D else 0
    return (x.new_empty(x.shape), x.new_empty((M, D), dtype=_QDTYPE[format]),
            x.new_empty(_scale_shape(M, D, granularity), dtype=torch.float32))


def residual_ln_modulate_quant(
    x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None, eps: float = 1e-6,
    format: str = "int8", granularity: str = "per_token", backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`residual_ln_modulate` with the :func:`ln_modulate_quant` epilogue: returns
    ``(x_new, q [M, D], scale)``."""
    return torch.ops.turbocompile.residual_ln_modulate_quant(
        x, y, gate, weight, bias, shift, scale, eps, format, granularity, backend)


# ----------------------------------------------------------------------------- quant epilogue + bound scales
#
# The FFN's pre-norm quantizes ffn.0's input; with ``out_scale="bound"`` the GELU GEMM of ffn.0 needs, per row,
# the power of two covering (s·||q_row||·C + b)·BOUND_MARGIN at 448 (kernels/w8a8/ref.py). These variants
# compute it from the codes the kernel just made, so no kernel has to read q back for it. Separate ops (not
# an optional argument of the *_ln_modulate_quant ops): a third (fourth) output, and the existing schemas
# stay as saved graphs call them.
def _check_bound(op: str, x: torch.Tensor, fmt: str, granularity: str, wbound: torch.Tensor) -> None:
    _check_quant(op, fmt, granularity)
    if fmt != "fp8":
        raise ValueError(f"{op}: format '{fmt}' is not supported: the bound row scales are for FP8 codes; valid: fp8")
    if granularity != "per_token":
        raise ValueError(f"{op}: granularity '{granularity}' is not supported: the bound row scales need one scale "
                         "per row; valid: per_token")
    if tuple(wbound.shape) != (2,) or wbound.dtype != torch.float32:
        raise ValueError(f"{op}: wbound must be the [2] float32 [C, b] of the GELU GEMM "
                         f"(kernels.w8a8.ref.gelu_bound_constants_ref), got {wbound.dtype} {list(wbound.shape)}")
    if wbound.device != x.device:
        raise ValueError(f"{op}: wbound is on {wbound.device}, x on {x.device}; both must share one device")
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: x has no channels (D = 0); the LayerNorm needs D >= 1")


@define("turbocompile::ln_modulate_quant_bound")
def _ln_modulate_quant_bound(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], eps: float,
    format: str, granularity: str, wbound: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "turbocompile::ln_modulate_quant_bound"
    _check_ln_args(op, x, weight, bias, shift, scale)
    _check_bound(op, x, format, granularity, wbound)
    if resolve_backend(backend, x.device, op) == "triton":
        from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton

        return ln_modulate_triton(x, weight, bias, shift, scale, eps, x.dtype, quant=(format, granularity),
                                  wbound=wbound)
    return ref.ln_modulate_quant_bound_ref(x, weight, bias, shift, scale, eps, wbound)


@_ln_modulate_quant_bound.register_fake
def _(x, weight, bias, shift, scale, eps, format, granularity, wbound, backend):
    _check_bound("turbocompile::ln_modulate_quant_bound", x, format, granularity, wbound)
    D = x.shape[-1]
    M = x.numel() // D
    return (x.new_empty((M, D), dtype=_QDTYPE[format]), x.new_empty((M, 1), dtype=torch.float32),
            x.new_empty((M, 1), dtype=torch.float32))


def ln_modulate_quant_bound(
    x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None, eps: float = 1e-6, *,
    wbound: torch.Tensor, format: str = "fp8", granularity: str = "per_token", backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`ln_modulate_quant` (FP8, per token) that also returns the "bound" row scales of the GELU GEMM
    reading its codes: ``(q [M, D] e4m3, scale [M, 1], bound_scale [M, 1])``, all fp32 scales.

    ``bound_scale`` is ``kernels.w8a8.ref.row_bound_scale_ref(q, scale, wbound)``: per row the power of two
    ``2^e`` covering ``(scale·sqrt(Σ q²)·C + b)·BOUND_MARGIN`` at 448, with ``wbound = [C, b]`` the GEMM
    weight's constants (``ref.gelu_bound_constants_ref``); pass it to
    :func:`turbocompile.ops.w8a8.w8a8_linear_gelu_quant_rowscale` as ``row_scale``. The Triton kernel sums
    the squared codes while they are in registers (no second pass over q), in another order than torch: its
    exponent can differ from the reference's only where the bound lies within a few fp32 ulps of a
    power-of-two multiple of 448. ``q`` and ``scale`` are :func:`ln_modulate_quant`'s, bit for bit.

    Only ``format="fp8"`` and ``granularity="per_token"`` (the bound scales are FP8 per-row scales); anything
    else is refused. Example::

        qx, sx, s_ffn = ln_modulate_quant_bound(x, shift=sh_f, scale=sc_f, wbound=wb)  # wb: ffn.0's [C, b]
        q = w8a8_linear_gelu_quant_rowscale(qx, sx, qw, sw, b, "fp8", row_scale=s_ffn)  # ffn.2's input, scales s_ffn
    """
    return torch.ops.turbocompile.ln_modulate_quant_bound(
        x, weight, bias, shift, scale, eps, format, granularity, wbound, backend)


@define("turbocompile::residual_ln_modulate_quant_bound")
def _residual_ln_modulate_quant_bound(
    x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], shift: Optional[torch.Tensor], scale: Optional[torch.Tensor],
    eps: float, format: str, granularity: str, wbound: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "turbocompile::residual_ln_modulate_quant_bound"
    _check_ln_args(op, x, weight, bias, shift, scale, gate)
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"{op}: y {tuple(y.shape)} {y.dtype} must match x {tuple(x.shape)} {x.dtype}")
    _check_bound(op, x, format, granularity, wbound)
    if resolve_backend(backend, x.device, op) == "triton":
        from turbocompile.kernels.norms.triton_layernorm import residual_ln_modulate_triton

        return residual_ln_modulate_triton(x, y, gate, weight, bias, shift, scale, eps, x.dtype,
                                           quant=(format, granularity), wbound=wbound)
    x_new = ref.gated_residual_ref(x, y, gate)
    q, s, sb = ref.ln_modulate_quant_bound_ref(x_new, weight, bias, shift, scale, eps, wbound)
    return x_new.contiguous(), q, s, sb


@_residual_ln_modulate_quant_bound.register_fake
def _(x, y, gate, weight, bias, shift, scale, eps, format, granularity, wbound, backend):
    _check_bound("turbocompile::residual_ln_modulate_quant_bound", x, format, granularity, wbound)
    D = x.shape[-1]
    M = x.numel() // D
    return (x.new_empty(x.shape), x.new_empty((M, D), dtype=_QDTYPE[format]),
            x.new_empty((M, 1), dtype=torch.float32), x.new_empty((M, 1), dtype=torch.float32))


def residual_ln_modulate_quant_bound(
    x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None, eps: float = 1e-6, *,
    wbound: torch.Tensor, format: str = "fp8", granularity: str = "per_token", backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`residual_ln_modulate_quant` with the bound row scales of :func:`ln_modulate_quant_bound`:
    returns ``(x_new, q [M, D] e4m3, scale [M, 1], bound_scale [M, 1])``."""
    return torch.ops.turbocompile.residual_ln_modulate_quant_bound(
        x, y, gate, weight, bias, shift, scale, eps, format, granularity, wbound, backend)
