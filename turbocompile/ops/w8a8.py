"""W8A8 linear ops: 8-bit weights and activations (INT8, TurboDiffusion-compatible, or FP8 e4m3).

Ops (registered on import; every op ends with ``backend``: "auto" | "triton" | "torch"):

* ``turbocompile::quantize_activation(x, format, granularity, backend) -> (q, scale)``
* ``turbocompile::w8a8_linear(x, qweight, wscale, bias, format, act_granularity,
  weight_granularity, backend) -> y``: dynamic activation quantization + scaled GEMM + bias.
* ``turbocompile::w8a8_linear_prequant(qx, xscale, qweight, wscale, bias, format, act_granularity,
  weight_granularity, out_dtype, backend) -> y``: the GEMM on an already-quantized activation.
* ``turbocompile::w8a8_linear_prequant_sumsq(<the same arguments>) -> (y, sumsq)``: the same GEMM (per-token
  activations, per-channel weights) and the fp32 sums of squares of y's rows per 128-column granule, from
  the GEMM's epilogue on Hopper (the fused cross-attention's q RMSNorm statistic).

* ``turbocompile::w8a8_linear_gelu(qx, xscale, qweight, wscale, bias, format, act_granularity,
  weight_granularity, out_dtype, backend) -> h``: ``GELU_tanh(GEMM + bias)`` in one kernel (FFN ffn.0).
* ``turbocompile::w8a8_linear_gelu_quant(..., out_dtype, out_format, backend, out_scale="amax", wbound=None)
  -> (q, scale)``: the same, and the per-token quantization of h that the next ``w8a8_linear_prequant``
  consumes; ``out_scale`` "pow2" (FP8 only) rounds each row's scale up to a power of two, "bound" (FP8,
  per-token input) takes a power-of-two scale from an upper bound of the row known before the GEMM
  (``wbound``: the weight's constants). The arguments after ``backend`` are optional, so graphs saved
  without them keep loading.
* ``turbocompile::w8a8_linear_gelu_quant_rowscale(qx, xscale, qweight, wscale, bias, format, act_granularity,
  weight_granularity, out_dtype, row_scale, backend) -> q``: the same GEMM + GELU, FP8 codes at given
  power-of-two row scales ``row_scale [M, 1]`` (the "bound" scales that ``ln_modulate_quant_bound`` wrote
  beside qx, so no kernel re-reads qx for them); returns the codes only: the scales are ``row_scale``.
* ``turbocompile::w8a8_linear_residual(qx, xscale, qweight, wscale, bias, format, act_granularity,
  weight_granularity, residual, gate, backend) -> x_new``: ``residual + GEMM·gate`` in one kernel (the
  Wan blocks' residual stream after the o-projections and ffn.2).

Plus the offline helper :func:`quantize_weight`. Formats: "int8" | "fp8" (torch.float8_e4m3fn).
Activation granularity: "block128" (128 tokens x 128 channels per scale, TD's scheme) |
"per_token". Weight granularity: "block128" | "per_channel". Any activation/weight pair works.
The quantizer math is documented in :mod:`turbocompile.kernels.w8a8.ref`.

Example::

    qw, sw = quantize_weight(linear.weight, "int8", "block128")
    y = torch.ops.turbocompile.w8a8_linear(x, qw, sw, linear.bias, "int8", "block128", "block128", "auto")
"""

from __future__ import annotations

import torch

from turbocompile.kernels.w8a8 import ref
from turbocompile.ops._backend import check_backend, resolve_backend
from turbocompile.ops._registry import define

__all__ = [
    "FORMATS",
    "ACT_GRANULARITIES",
    "WEIGHT_GRANULARITIES",
    "FUSE_ACT_QUANT",
    "OUT_SCALES",
    "quantize_weight",
    "quantize_activation",
    "w8a8_linear",
    "w8a8_linear_prequant",
    "w8a8_linear_prequant_sumsq",
    "w8a8_linear_gelu",
    "w8a8_linear_gelu_quant",
    "w8a8_linear_gelu_quant_rowscale",
    "w8a8_linear_residual",
]

FORMATS = ("int8", "fp8")
ACT_GRANULARITIES = ("block128", "per_token")
WEIGHT_GRANULARITIES = ("block128", "per_channel")
OUT_SCALES = ref.SCALE_MODES  # per-token output scale of w8a8_linear_gelu_quant: "amax" | "pow2" | "bound"
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Triton w8a8_linear with block128 activations: quantize inside the GEMM (True) or run the one-pass
# quantizer then the GEMM (False). Measured on an H200 (benchmarks/RESULTS.md, W8A8): fusing is
# 4x slower (each of the N/128 column tiles re-quantizes its A tile), so it stays off.
FUSE_ACT_QUANT = {"int8": False, "fp8": False}


def _cdiv(a, b):
    return (a + b - 1) // b


def _check_choice(what: str, value: str, choices: tuple[str, ...], op: str) -> None:
    if value not in choices:
        raise ValueError(f"{op}: unknown {what} '{value}'; valid choices: {', '.join(choices)}")


def _check_modes(op: str, fmt: str, act_gran: str | None, w_gran: str | None, backend: str) -> None:
    _check_choice("format", fmt, FORMATS, op)
    if act_gran is not None:
        _check_choice("activation granularity", act_gran, ACT_GRANULARITIES, op)
    if w_gran is not None:
        _check_choice("weight granularity", w_gran, WEIGHT_GRANULARITIES, op)
    check_backend(backend)


def _scale_shape(rows, k, granularity: str):
    if granularity == "block128":
        return (_cdiv(rows, 128), _cdiv(k, 128))
    return (rows, 1)


def _check_q(op: str, name: str, q: torch.Tensor, s: torch.Tensor, fmt: str, granularity: str) -> None:
    want = ref.quant_dtype(fmt)
    if q.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(q.shape)}")
    if q.dtype != want:
        raise ValueError(f"{op}: {name} must be {want} for format '{fmt}', got {q.dtype}")
    exp = _scale_shape(q.shape[0], q.shape[1], granularity)
    if s.dtype != torch.float32 or tuple(s.shape) != tuple(exp):
        raise ValueError(
            f"{op}: {name} scale must be float32 of shape {tuple(exp)} for granularity '{granularity}' "
            f"and {name} shape {tuple(q.shape)}; got {s.dtype} {tuple(s.shape)}"
        )


def _check_bias(op: str, bias: torch.Tensor | None, n) -> None:
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"{op}: bias must have shape ({n},), got {tuple(bias.shape)}")
    if bias is not None and not bias.is_floating_point():
        raise ValueError(f"{op}: bias must be a float tensor, got {bias.dtype}")


# ----------------------------------------------------------------------------------- quantizers


def quantize_weight(w: torch.Tensor, format: str, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a linear weight offline (same quantizer as the activations; TD-compatible for int8).

    Storage layout: the codes keep nn.Linear's [N, K] layout (K contiguous). That is already the
    K-major B operand that Hopper's 8-bit wgmma wants, for int8 and for fp8, so no transposed copy
    is stored; the reference GEMM uses the same [N, K] layout.

    Args:
        w: [N, K] float weight.
        format: "int8" | "fp8".
        granularity: "block128" -> scale [ceil(N/128), ceil(K/128)]; "per_channel" -> scale [N, 1].

    Returns:
        (q [N, K] int8 | float8_e4m3fn, contiguous; scale float32).
    """
    _check_modes("quantize_weight", format, None, granularity, "torch")
    if w.dim() != 2 or w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_weight: w must be a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    q, s = ref.quantize_ref(w.detach(), format, granularity)
    return q.contiguous(), s


def _quantize_impl(x: torch.Tensor, fmt: str, granularity: str, impl: str):
    if impl == "triton":
        from turbocompile.kernels.w8a8.triton_quant import quantize_triton

        return quantize_triton(x, fmt, granularity)
    return ref.quantize_ref(x, fmt, granularity)


@define("turbocompile::quantize_activation")
def _quantize_activation_op(
    x: torch.Tensor, format: str, granularity: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "turbocompile::quantize_activation"
    _check_modes(op, format, granularity, None, backend)
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be 2-D [M, K] bf16/fp16/fp32, got {x.dtype} {tuple(x.shape)}")
    impl = resolve_backend(backend, x.device, op)
    return _quantize_impl(x, format, granularity, impl)


@_quantize_activation_op.register_fake
def _(x, format, granularity, backend):
    _check_modes("turbocompile::quantize_activation", format, granularity, None, backend)
    m, k = x.shape
    q = x.new_empty((m, k), dtype=ref.quant_dtype(format))
    return q, x.new_empty(_scale_shape(m, k, granularity), dtype=torch.float32)


def quantize_activation(
    x: torch.Tensor, format: str = "int8", granularity: str = "block128", backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D activation [M, K] (bf16/fp16/fp32) dynamically.

    Returns ``(q, scale)``: q [M, K] int8 or float8_e4m3fn; scale fp32 [M, 1] for "per_token"
    (INT8 per-token = the block formula over a whole row: amax floor 1e-8, ``round(x*128/amax)``
    saturated to [-128, 127], scale amax/128), or [ceil(M/128), ceil(K/128)] for "block128"
    (TurboDiffusion-exact for INT8). FP8: scale amax/448, same 1e-8 floor.
    """
    return torch.ops.turbocompile.quantize_activation(x, format, granularity, backend)


# ---------------------------------------------------------------------------------------- GEMMs


def _gemm_impl(qa, sa, qw, sw, bias, act_gran, w_gran, out_dtype, impl):
    if impl == "triton":
        from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton

        return w8a8_gemm_triton(qa, sa, qw, sw, bias, act_gran, w_gran, out_dtype)
    return ref.w8a8_gemm_ref(qa, sa, qw, sw, bias, act_gran, w_gran, out_dtype)


def _check_gemm_args(op, qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity,
                     out_dtype, backend):
    _check_modes(op, format, act_granularity, weight_granularity, backend)
    _check_q(op, "qx", qx, xscale, format, act_granularity)
    _check_q(op, "qweight", qweight, wscale, format, weight_granularity)
    if qx.shape[1] != qweight.shape[1]:
        raise ValueError(f"{op}: K mismatch, qx {tuple(qx.shape)} vs qweight {tuple(qweight.shape)}")
    _check_bias(op, bias, qweight.shape[0])
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be one of bf16/fp16/fp32, got {out_dtype}")


@define("turbocompile::w8a8_linear_prequant")
def _w8a8_linear_prequant_op(
    qx: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    format: str,
    act_granularity: str,
    weight_granularity: str,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    op = "turbocompile::w8a8_linear_prequant"
    _check_gemm_args(op, qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity,
                     out_dtype, backend)
    impl = resolve_backend(backend, qx.device, op)
    return _gemm_impl(qx, xscale, qweight, wscale, bias, act_granularity, weight_granularity, out_dtype, impl)


@_w8a8_linear_prequant_op.register_fake
def _(qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity, out_dtype, backend):
    _check_modes("turbocompile::w8a8_linear_prequant", format, act_granularity, weight_granularity, backend)
    return qx.new_empty((qx.shape[0], qweight.shape[0]), dtype=out_dtype)


def _check_sumsq_modes(op: str, act_granularity: str, weight_granularity: str) -> None:
    if act_granularity != "per_token":
        raise ValueError(f"{op}: activation granularity '{act_granularity}' is not supported; valid choices: "
                         "per_token")
    if weight_granularity != "per_channel":
        raise ValueError(f"{op}: weight granularity '{weight_granularity}' is not supported; valid choices: "
                         "per_channel")


@define("turbocompile::w8a8_linear_prequant_sumsq")
def _w8a8_linear_prequant_sumsq_op(
    qx: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    format: str,
    act_granularity: str,
    weight_granularity: str,
    out_dtype: torch.dtype,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "turbocompile::w8a8_linear_prequant_sumsq"
    _check_gemm_args(op, qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity,
                     out_dtype, backend)
    _check_sumsq_modes(op, act_granularity, weight_granularity)
    if resolve_backend(backend, qx.device, op) == "triton":
        from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_sumsq_triton

        return w8a8_gemm_sumsq_triton(qx, xscale, qweight, wscale, bias, out_dtype)
    return ref.w8a8_gemm_sumsq_ref(qx, xscale, qweight, wscale, bias, act_granularity, weight_granularity,
                                   out_dtype)


@_w8a8_linear_prequant_sumsq_op.register_fake
def _(qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity, out_dtype, backend):
    op = "turbocompile::w8a8_linear_prequant_sumsq"
    _check_modes(op, format, act_granularity, weight_granularity, backend)
    _check_sumsq_modes(op, act_granularity, weight_granularity)
    m, n = qx.shape[0], qweight.shape[0]
    return (qx.new_empty((m, n), dtype=out_dtype),
            qx.new_empty((m, _cdiv(n, ref.BLOCK)), dtype=torch.float32))


@define("turbocompile::w8a8_linear")
def _w8a8_linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    format: str,
    act_granularity: str,
    weight_granularity: str,
    backend: str,
) -> torch.Tensor:
    op = "turbocompile::w8a8_linear"
    _check_modes(op, format, act_granularity, weight_granularity, backend)
    if x.dtype not in _FLOAT_DTYPES or x.dim() < 1:
        raise ValueError(f"{op}: x must be a float tensor [..., K] (bf16/fp16/fp32), got {x.dtype} {tuple(x.shape)}")
    _check_q(op, "qweight", qweight, wscale, format, weight_granularity)
    k = x.shape[-1]
    if qweight.shape[1] != k:
        raise ValueError(f"{op}: K mismatch, x {tuple(x.shape)} vs qweight {tuple(qweight.shape)}")
    _check_bias(op, bias, qweight.shape[0])
    impl = resolve_backend(backend, x.device, op)
    x2 = x.reshape(-1, k)
    if impl == "triton" and act_granularity == "block128" and FUSE_ACT_QUANT[format]:
        from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton

        y = w8a8_gemm_triton(x2, None, qweight, wscale, bias, act_granularity, weight_granularity, x.dtype,
                             fuse_quant=True)
    else:
        qa, sa = _quantize_impl(x2, format, act_granularity, impl)
        y = _gemm_impl(qa, sa, qweight, wscale, bias, act_granularity, weight_granularity, x.dtype, impl)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


@_w8a8_linear_op.register_fake
def _(x, qweight, wscale, bias, format, act_granularity, weight_granularity, backend):
    _check_modes("turbocompile::w8a8_linear", format, act_granularity, weight_granularity, backend)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def w8a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None = None,
    format: str = "int8",
    act_granularity: str = "block128",
    weight_granularity: str = "block128",
    backend: str = "auto",
) -> torch.Tensor:
    """W8A8 linear: ``x [..., K] -> y [..., N]`` in x.dtype, quantizing x on the fly.

    ``y[m, n] = sum_kb sA(m, kb) * sW(n, kb) * sum_{k in kb} qA[m, k] * qW[n, k] + bias[n]``.
    Block-128 scales are applied per 128-wide K block inside the GEMM loop (int32 partial -> fp32),
    row-wise ones in the epilogue; bias is fused in the epilogue. K and N need not be multiples
    of 128 (tails are masked).

    Args:
        x: [..., K] bf16/fp16/fp32.
        qweight, wscale: from :func:`quantize_weight` with the same ``format``/``weight_granularity``.
        bias: optional [N].
    """
    return torch.ops.turbocompile.w8a8_linear(
        x, qweight, wscale, bias, format, act_granularity, weight_granularity, backend
    )


def w8a8_linear_prequant(
    qx: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None = None,
    format: str = "int8",
    act_granularity: str = "block128",
    weight_granularity: str = "block128",
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> torch.Tensor:
    """The W8A8 GEMM on an already-quantized activation ``qx [M, K]`` with ``xscale``.

    ``qx``/``xscale`` follow :func:`quantize_activation`'s contract (e.g. produced by a fused norm
    kernel). Returns y [M, N] in ``out_dtype``.
    """
    return torch.ops.turbocompile.w8a8_linear_prequant(
        qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity, out_dtype, backend
    )


def w8a8_linear_prequant_sumsq(
    qx: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None = None,
    format: str = "fp8",
    act_granularity: str = "per_token",
    weight_granularity: str = "per_channel",
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`w8a8_linear_prequant` that also returns the sums of squares of its output's rows by granule.

    Returns ``(y [M, N] out_dtype, sumsq [M, ceil(N/128)] fp32)``: y as :func:`w8a8_linear_prequant` computes
    it, and ``sumsq[m, g] = sum of y[m, c].float()²`` over the columns c of granule g (128g .. 128g+127, the
    last one partial), squared and summed in fp32 from y as stored (already rounded to ``out_dtype``), so
    ``sum_g sumsq[m, g] / N`` is the row's mean square, the statistic of an RMSNorm of y
    (:func:`turbocompile.ops.text_attention.norm_attention_quant` takes it and skips its own pass over y).

    INT8 or FP8 codes; per-token activations and per-channel weights only (other granularities are
    refused). The torch backend is the prequant reference then :func:`turbocompile.kernels.w8a8.ref.granule_sumsq_ref`;
    the Triton backend writes the sums from the TMA GEMM's epilogue on Hopper and otherwise computes them
    with torch ops from the pointer GEMM's y: equal to the reference up to fp32 summation order.
    """
    return torch.ops.turbocompile.w8a8_linear_prequant_sumsq(
        qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity, out_dtype, backend
    )


# ------------------------------------------------------------------- GEMM + GELU epilogue (FFN)


@define("turbocompile::w8a8_linear_gelu")
def _w8a8_linear_gelu_op(
    qx: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    format: str,
    act_granularity: str,
    weight_granularity: str,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    op = "turbocompile::w8a8_linear_gelu"
    _check_gemm_args(op, qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity,
                     out_dtype, backend)
    if resolve_backend(backend, qx.device, op) == "triton":
        from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_triton

        return w8a8_gemm_gelu_triton(qx, xscale, qweight, wscale, bias, act_granularity, weight_granularity,
                                     out_dtype)[0]
    return ref.w8a8_gemm_gelu_ref(qx, xscale, qweight, wscale, bias, act_granularity, weight_granularity, out_dtype)


@_w8a8_linear_gelu_op.register_fake
def _(qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity, out_dtype, backend):
    _check_modes("turbocompile::w8a8_linear_gelu", format, act_granularity, weight_granularity, backend)
    return qx.new_empty((qx.shape[0], qweight.shape[0]), dtype=out_dtype)


@define("turbocompile::w8a8_linear_gelu_quant")
def _w8a8_linear_gelu_quant_op(
    qx: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    format: str,
    act_granularity: str,
    weight_granularity: str,
    out_dtype: torch.dtype,
    out_format: str,
    backend: str,
    out_scale: str = "amax",
    wbound: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "turbocompile::w8a8_linear_gelu_quant"
    _check_gemm_args(op, qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity,
                     out_dtype, backend)
    _check_out_quant(op, out_format, out_scale, act_granularity, wbound, qx.device)
    if resolve_backend(backend, qx.device, op) == "triton":
        from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_quant_triton

        return w8a8_gemm_gelu_quant_triton(qx, xscale, qweight, wscale, bias, act_granularity, weight_granularity,
                                           out_dtype, out_format, out_scale=out_scale, wbound=wbound)
    return ref.w8a8_gemm_gelu_quant_ref(qx, xscale, qweight, wscale, bias, act_granularity, weight_granularity,
                                        out_dtype, out_format, out_scale, wbound)


def _check_out_quant(op: str, out_format: str, out_scale: str, act_granularity: str = "per_token",
                     wbound: torch.Tensor | None = None, device: torch.device | None = None) -> None:
    _check_choice("output format", out_format, FORMATS, op)
    _check_choice("output scale", out_scale, OUT_SCALES, op)
    if out_scale in ("pow2", "bound") and out_format != "fp8":
        raise ValueError(f"{op}: output scale '{out_scale}' needs output format 'fp8', got '{out_format}'; "
                         f"valid output scales for '{out_format}': amax")
    if out_scale == "bound" and act_granularity != "per_token":
        raise ValueError(f"{op}: output scale 'bound' needs per_token activations, got '{act_granularity}'; "
                         f"valid output scales for '{act_granularity}': amax, pow2")
    if wbound is not None and (out_scale != "bound" or tuple(wbound.shape) != (2,)
                               or wbound.dtype != torch.float32):
        raise ValueError(f"{op}: wbound is the [2] fp32 [C, b] of output scale 'bound' "
                         f"(ref.gelu_bound_constants_ref), got {wbound.dtype} {list(wbound.shape)} with "
                         f"output scale '{out_scale}'")
    if wbound is not None and device is not None and wbound.device != device:
        raise ValueError(f"{op}: wbound is on {wbound.device}, qx on {device}; both must share one device")


@_w8a8_linear_gelu_quant_op.register_fake
def _(qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity, out_dtype, out_format,
      backend, out_scale="amax", wbound=None):
    op = "turbocompile::w8a8_linear_gelu_quant"
    _check_modes(op, format, act_granularity, weight_granularity, backend)
    _check_out_quant(op, out_format, out_scale, act_granularity, wbound, qx.device)
    m, n = qx.shape[0], qweight.shape[0]
    return (qx.new_empty((m, n), dtype=ref.quant_dtype(out_format)),
            qx.new_empty((m, 1), dtype=torch.float32))


def w8a8_linear_gelu(qx, xscale, qweight, wscale, bias=None, format="int8", act_granularity="per_token",
                     weight_granularity="per_channel", out_dtype=torch.bfloat16, backend="auto") -> torch.Tensor:
    """``GELU_tanh(w8a8_linear_prequant(...))`` [M, N] in ``out_dtype``, the GELU in the GEMM epilogue.

    The torch backend is bit-identical to the unfused ops (GEMM rounded to ``out_dtype``, then
    ``F.gelu(approximate="tanh")``); the Triton kernel applies GELU to the fp32 accumulator and
    rounds once (differs by bf16 rounding).
    """
    return torch.ops.turbocompile.w8a8_linear_gelu(qx, xscale, qweight, wscale, bias, format, act_granularity,
                                                   weight_granularity, out_dtype, backend)


def w8a8_linear_gelu_quant(qx, xscale, qweight, wscale, bias=None, format="int8", act_granularity="per_token",
                           weight_granularity="per_channel", out_dtype=torch.bfloat16, out_format="int8",
                           backend="auto", out_scale="amax",
                           wbound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`w8a8_linear_gelu` then per-token quantization (``out_format``) of its ``out_dtype`` output.

    Returns ``(q [M, N], scale [M, 1] fp32)`` with :func:`quantize_activation`'s per-token contract,
    ready for :func:`w8a8_linear_prequant` with ``act_granularity="per_token"``.

    ``out_scale``: "amax" (default; scale amax/qmax as :func:`quantize_activation`) or "pow2" (FP8
    only): scale ``2^ceil(log2(amax/448))``, a power of two, codes ``e4m3(h / scale)``
    (``kernels.w8a8.ref.quantize_pow2_ref``; the torch backend is exactly that). Its Triton path on
    Hopper writes FP8 codes from the GEMM epilogue instead of bf16 h and skips the quantizer's read of
    h; codes that are e4m3 subnormals at the row scale may then be one subnormal step off
    (``kernels/w8a8/triton_pow2.py``). "bound" (FP8, per-token ``qx``): scale ``2^e`` covering an upper
    bound of the row's |h| computed from ``qx`` before the GEMM (``ref.row_bound_scale_ref``; ``wbound``
    = ``ref.gelu_bound_constants_ref`` of the weight, computed per call when None), so the Hopper
    epilogue stores the final codes: no bf16 h, no amax, no requantization (``kernels/w8a8/triton_bound.py``).
    The torch backend is the reference; the Triton codes equal ``ref.quantize_at_scale_ref`` of its own h.
    """
    return torch.ops.turbocompile.w8a8_linear_gelu_quant(qx, xscale, qweight, wscale, bias, format,
                                                         act_granularity, weight_granularity, out_dtype,
                                                         out_format, backend, out_scale, wbound)


def _check_rowscale_args(op: str, qx, act_granularity: str, row_scale: torch.Tensor) -> None:
    if act_granularity != "per_token":
        raise ValueError(f"{op}: activation granularity '{act_granularity}' is not supported; valid choices: "
                         "per_token")
    ref.check_row_scale(op, row_scale, qx.shape[0], qx.device)


@define("turbocompile::w8a8_linear_gelu_quant_rowscale")
def _w8a8_linear_gelu_quant_rowscale_op(
    qx: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    format: str,
    act_granularity: str,
    weight_granularity: str,
    out_dtype: torch.dtype,
    row_scale: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    op = "turbocompile::w8a8_linear_gelu_quant_rowscale"
    _check_gemm_args(op, qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity,
                     out_dtype, backend)
    _check_rowscale_args(op, qx, act_granularity, row_scale)
    if resolve_backend(backend, qx.device, op) == "triton":
        from turbocompile.kernels.w8a8.triton_bound import gelu_quant_bound

        return gelu_quant_bound(qx, xscale, qweight, wscale, bias, act_granularity, weight_granularity, out_dtype,
                                None, row_scale=row_scale)[0]
    return ref.w8a8_gemm_gelu_rowscale_ref(qx, xscale, qweight, wscale, bias, act_granularity, weight_granularity,
                                           out_dtype, row_scale)


@_w8a8_linear_gelu_quant_rowscale_op.register_fake
def _(qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity, out_dtype, row_scale,
      backend):
    op = "turbocompile::w8a8_linear_gelu_quant_rowscale"
    _check_modes(op, format, act_granularity, weight_granularity, backend)
    _check_rowscale_args(op, qx, act_granularity, row_scale)
    return qx.new_empty((qx.shape[0], qweight.shape[0]), dtype=torch.float8_e4m3fn)


def w8a8_linear_gelu_quant_rowscale(qx, xscale, qweight, wscale, bias=None, format="fp8",
                                    act_granularity="per_token", weight_granularity="per_channel",
                                    out_dtype=torch.bfloat16, *, row_scale: torch.Tensor,
                                    backend="auto") -> torch.Tensor:
    """:func:`w8a8_linear_gelu` with FP8 e4m3 codes ``[M, N]`` out, at given per-row scales: ``e4m3_rne(clamp(h /
    row_scale, ±448))`` of the ``out_dtype``-rounded h (``kernels.w8a8.ref.w8a8_gemm_gelu_rowscale_ref``).

    ``row_scale [M, 1]`` fp32 must hold powers of two (the division is then exact and the Hopper epilogue
    multiplies by ``1 / s``; values are not checked). It is what the "bound" variant of
    :func:`w8a8_linear_gelu_quant` computes before its GEMM, here computed by the norm that quantized qx
    (:func:`turbocompile.ops.norms.ln_modulate_quant_bound`), so no kernel re-reads qx for it: pass that
    norm's ``bound_scale``, and give the next ``w8a8_linear_prequant`` ``(q, row_scale)``. With
    ``row_scale = ref.row_bound_scale_ref(qx, xscale, wbound)`` the codes equal ``w8a8_linear_gelu_quant(...,
    out_scale="bound", wbound=wbound)``'s. Returns the codes only (an op may not return its input; the
    scales are ``row_scale``). ``qx``: INT8 or FP8 codes with per-token scales; any weight granularity.
    """
    return torch.ops.turbocompile.w8a8_linear_gelu_quant_rowscale(qx, xscale, qweight, wscale, bias, format,
                                                                  act_granularity, weight_granularity, out_dtype,
                                                                  row_scale, backend)


# ------------------------------------------------------------ GEMM + gated residual epilogue (o, ffn.2)


def _check_residual_args(op, qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity,
                         residual, gate, backend):
    if residual.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: residual must be bf16/fp16/fp32 (it is also the output dtype), got {residual.dtype}")
    _check_gemm_args(op, qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity,
                     residual.dtype, backend)
    m, n = qx.shape[0], qweight.shape[0]
    if residual.dim() not in (2, 3) or residual.shape[-1] != n or residual.numel() != m * n:
        raise ValueError(f"{op}: residual must be [M={m}, N={n}] or [B, L, N={n}] with B*L = M, "
                         f"got {tuple(residual.shape)}")
    if residual.device != qx.device:
        raise ValueError(f"{op}: residual is on {residual.device}, qx on {qx.device}; both must share one device")
    if gate is None:
        return
    if not gate.is_floating_point() or gate.device != residual.device:
        raise ValueError(f"{op}: gate must be a float tensor on {residual.device}, got {gate.dtype} on {gate.device}")
    try:
        ok = torch.broadcast_shapes(gate.shape, residual.shape) == residual.shape and gate.shape[-1] == n
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{op}: gate of shape {tuple(gate.shape)} does not broadcast to residual "
                         f"{tuple(residual.shape)} with a full last dim (e.g. [B, 1, N] or [N])")


@define("turbocompile::w8a8_linear_residual")
def _w8a8_linear_residual_op(
    qx: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    format: str,
    act_granularity: str,
    weight_granularity: str,
    residual: torch.Tensor,
    gate: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    op = "turbocompile::w8a8_linear_residual"
    _check_residual_args(op, qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity,
                         residual, gate, backend)
    if resolve_backend(backend, qx.device, op) == "triton":
        from turbocompile.kernels.w8a8.triton_gemm_residual import w8a8_gemm_residual_triton

        return w8a8_gemm_residual_triton(qx, xscale, qweight, wscale, bias, act_granularity, weight_granularity,
                                         residual, gate)
    from turbocompile.kernels.norms.ref import gated_residual_ref

    # the unfused graph, op for op: w8a8_linear_prequant's reference rounded to the residual's dtype, then
    # residual_ln_modulate's residual step (x + y * gate.to(dt), eager roundings)
    y = ref.w8a8_gemm_ref(qx, xscale, qweight, wscale, bias, act_granularity, weight_granularity, residual.dtype)
    return gated_residual_ref(residual, y.reshape(residual.shape), gate).contiguous()


@_w8a8_linear_residual_op.register_fake
def _(qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity, residual, gate, backend):
    _check_modes("turbocompile::w8a8_linear_residual", format, act_granularity, weight_granularity, backend)
    return residual.new_empty(residual.shape)


def w8a8_linear_residual(qx: torch.Tensor, xscale: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                         bias: torch.Tensor | None = None, format: str = "int8", act_granularity: str = "per_token",
                         weight_granularity: str = "per_channel", *, residual: torch.Tensor,
                         gate: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``residual + w8a8_linear_prequant(...)·gate`` in one GEMM: the epilogue reads x, writes x_new.

    Replaces ``y = w8a8_linear_prequant(qx, ..., out_dtype=residual.dtype)`` followed by the residual
    step of ``turbocompile::residual_ln_modulate`` (``x + y * gate.to(x.dtype)``, or ``x + y``), bit for
    bit: y is rounded to the residual's dtype first, then the product and the sum are each rounded,
    as the eager ops do, on the torch and the Triton backend alike.

    Args:
        qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity: as
            :func:`w8a8_linear_prequant` (qx [M, K]).
        residual: x, [M, N] or [B, L, N] with B*L = M, bf16/fp16/fp32; also the output dtype. Rows may
            be strided.
        gate: None, or a float tensor broadcasting to ``residual`` with a full last dim (AdaLN's
            [B, 1, N] gate, fp32; it is rounded to the residual's dtype first).

    Returns x_new in ``residual``'s shape and dtype (contiguous).

    Example (a Wan block's self-attention output projection)::

        x = w8a8_linear_residual(qa, sa, qw_o, sw_o, b_o, "fp8", residual=x, gate=gate_a)
    """
    return torch.ops.turbocompile.w8a8_linear_residual(qx, xscale, qweight, wscale, bias, format, act_granularity,
                                                       weight_granularity, residual, gate, backend)
