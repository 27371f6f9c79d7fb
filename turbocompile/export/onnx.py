"""ONNX translations of every ``torch.ops.turbocompile`` op for torch's ONNX exporter.

The exporter (``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``) traces each
function below with the op's tensors as symbolic ONNX values and its scalar arguments as
Python values, so each translation branches on ``format`` / ``granularity`` / ``quant`` in
Python and emits only standard ONNX ops (default domain, opset 18 unless FP8 needs 19+):

* quantizers: Abs / ReduceMax / Max(1e-8) / Div / Mul / Round (half to even) / Clip / Cast,
  exactly the reference's two fp32 roundings (``128/amax`` then ``x * inv``), so the INT8 codes
  are the op's bit for bit; block-128 groups are a Pad + Reshape into 128x128 tiles.
* W8A8 GEMMs: INT8 as ``MatMulInteger`` (int8 x int8 -> int32, exact) per 128-wide K block
  (or one product when both scales are row-wise), then the scales in float64 like the
  reference. The int32 result is cast to *double*: onnxruntime's MatMulIntegerToFloat fusion
  (ORT_ENABLE_EXTENDED) fires on MatMulInteger -> Cast(float) -> Mul with row-wise activation
  scales and computes a wrong result (5% error seen with ORT 1.31), and the double cast also
  matches the reference's float64 accumulation. FP8: Cast to FLOAT8E4M3FN (opset >= 19),
  then the GEMM on the dequantized codes in double (exact for e4m3 products).
  ``w8a8_linear_prequant_sumsq`` adds the float32 sums of squares of the rounded y per 128 columns
  (Mul, Pad, Reshape, ReduceSum).
* fused norms: decomposed (ReduceMean, Sub, Mul, Sqrt, Reciprocal, Add; Slice/Concat RoPE);
  math in float32 with explicit Casts wherever the reference rounds to the activation dtype.
* ``sagesla``: either the full reference computation in standard ops (``attention="standard"``:
  pooled block scores, TopK, ScatterElements block mask, masked Softmax, the int8/e4m3
  fake-quantization emulated with Round/Floor/Log/Pow, the linear branch) — the same function
  as the op, with O(L^2) memory per head — or (``attention="custom"``) one
  ``turbocompile.SageSLA`` node of the custom domain ``turbocompile`` (see the README).
* merged padding keys: ``key_tail_start`` as Equal / Not / position-weighted ReduceMax;
  ``tail_merged_attention`` as dense attention over all keys with a bias row (0 before the tail
  start, ln(multiplicity) on it, -inf after): the op's function in float32.
* fused cross-attention: ``value_bound`` as Abs / ReduceMax / Max(1e-8); ``norm_attention_quant`` as the
  RMSNorm, the (tail-merged) attention above and the FP8 codes at ``448 / v_bound[b]`` (opset >= 19); its
  optional ``sumsq`` input is not read: the translation takes the RMSNorm statistic from z itself.
* ``sagesla_quant``: ``sagesla``'s translation (standard ops or the custom node, per ``attention``), then the
  per-sample output bound (Abs / ReduceMax over v, proj_l's row sums) and the FP8 codes at ``448 / bound_b``
  (opset >= 19).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import onnx
import onnxscript
from onnxscript import opset18 as op

from turbocompile.kernels.sagesla import ref as _sla_ref
from turbocompile.kernels.w8a8.ref import BOUND_MARGIN

__all__ = ["translation_table", "CUSTOM_DOMAIN", "SAGESLA_SCHEMA", "FP8_MIN_OPSET"]

CUSTOM_DOMAIN = "turbocompile"
FP8_MIN_OPSET = 19

_T = onnx.TensorProto
FLOAT, DOUBLE, INT8, INT64, FLOAT16 = _T.FLOAT, _T.DOUBLE, _T.INT8, _T.INT64, _T.FLOAT16
FP8 = _T.FLOAT8E4M3FN


# ----------------------------------------------------------------------------- small helpers
def _ints(*v: int):
    return op.Constant(value_ints=[int(i) for i in v])


def _f(v: float):
    return op.Constant(value_float=float(v))


def _f32(x):
    return x if x.dtype == FLOAT else op.Cast(x, to=FLOAT)


def _round_to(xf, dtype):
    """Round a float32 value to ``dtype`` and back (what an op in that dtype would produce)."""
    if dtype is None or int(dtype) in (FLOAT, DOUBLE):
        return xf
    return op.Cast(op.Cast(xf, to=dtype), to=FLOAT)


def _rows(x):
    """1-element int64 tensor: the first dim of x (dynamic when the batch is)."""
    return op.Shape(x, start=0, end=1)


def _pad_rows_to(x, block: int):
    """Zero-pad dim 0 of a 2-D x to a multiple of ``block`` (row count may be dynamic)."""
    m = _rows(x)
    pad = op.Mod(op.Sub(_ints(block), op.Mod(m, _ints(block))), _ints(block))
    return op.Pad(x, op.Concat(_ints(0, 0), pad, _ints(0), axis=0))


def _e4m3(x):
    """Round float32 values (already within +-448) to the float8 e4m3fn grid, RNE, in opset 18.

    step = 2^(max(floor(log2|x|), -6) - 3): 3 mantissa bits, subnormals below 2^-6. Round() is
    half to even like the e4m3 cast. log2 may be off by one only within ~1e-7 of a power of two,
    where both candidate steps give the same rounded value.
    """
    e = op.Floor(op.Div(op.Log(op.Abs(x)), _f(math.log(2.0))))
    e = op.Max(e, _f(-6.0))
    step = op.Pow(_f(2.0), op.Sub(e, _f(3.0)))
    return op.Mul(op.Round(op.Div(x, step)), step)


# ----------------------------------------------------------------------------- W8A8
def _codes(xf, amax, fmt: str):
    """8-bit codes of xf given its (broadcastable) group amax, as quantize_ref computes them."""
    if fmt == "int8":
        inv = op.Div(_f(128.0), amax)
        return op.Cast(op.Clip(op.Round(op.Mul(xf, inv)), _f(-128.0), _f(127.0)), to=INT8)
    inv = op.Div(_f(448.0), amax)
    return op.Cast(op.Clip(op.Mul(xf, inv), _f(-448.0), _f(448.0)), to=FP8)


def _quantize(x2, fmt: str, granularity: str, k: int):
    """(q [M, K], scale) for a 2-D activation [M, k], per the ``quantize_activation`` contract.

    (Shapes of intermediate values are not known while tracing, so k is passed in.)
    """
    qmax = 128.0 if fmt == "int8" else 448.0
    xf = _f32(x2)
    if granularity in ("per_token", "per_channel"):
        amax = op.Max(op.ReduceMax(op.Abs(xf), _ints(1), keepdims=1), _f(1e-8))
        return _codes(xf, amax, fmt), op.Div(amax, _f(qmax))
    kb = -(-k // 128)
    xp = _pad_rows_to(xf, 128)
    if kb * 128 != k:
        xp = op.Pad(xp, _ints(0, 0, 0, kb * 128 - k))
    tiles = op.Reshape(xp, _ints(-1, 128, kb, 128))
    amax = op.Max(op.ReduceMax(op.Abs(tiles), _ints(1, 3), keepdims=1), _f(1e-8))  # [Mb, 1, Kb, 1]
    q = op.Reshape(_codes(tiles, amax, fmt), _ints(-1, kb * 128))
    q = op.Slice(q, _ints(0, 0), op.Concat(_rows(x2), _ints(k), axis=0), _ints(0, 1))
    return q, op.Reshape(op.Div(amax, _f(qmax)), _ints(-1, kb))


def _expand_block_rows(scale, rows, kb: int):
    """[ceil(R/128), Kb] block scales -> [R, Kb] (each row repeated over its 128 rows)."""
    s = op.Expand(op.Unsqueeze(scale, _ints(1)), _ints(1, 128, 1))
    s = op.Reshape(s, _ints(-1, kb))
    return op.Slice(s, _ints(0), rows, _ints(0))


def _dequant_codes(q, fmt: str):
    """8-bit codes as double (exact), for the FP8 GEMM."""
    if fmt == "int8":
        return op.Cast(q, to=DOUBLE)
    return op.Cast(op.Cast(q, to=FLOAT), to=DOUBLE)


def _gemm(qa, sa, qw, sw, bias, fmt: str, act_gran: str, w_gran: str, out_dtype):
    """y [M, N] = sum_kb sA(m,kb) sW(n,kb) (qA_kb . qW_kb) + bias, like w8a8_gemm_ref (float64)."""
    n, k = int(qw.shape[0]), int(qw.shape[1])

    def product(a, w):  # a [M, k'] codes, w [N, k'] codes -> double [M, N], exact
        wt = op.Transpose(w, perm=[1, 0])
        if fmt == "int8":  # int32 -> int64 -> double: keeps ORT's MatMulIntegerToFloat fusion off
            return op.Cast(op.Cast(op.MatMulInteger(a, wt), to=INT64), to=DOUBLE)
        return op.MatMul(_dequant_codes(a, fmt), _dequant_codes(wt, fmt))

    sa_d, sw_d = op.Cast(sa, to=DOUBLE), op.Cast(sw, to=DOUBLE)
    if act_gran == "per_token" and w_gran == "per_channel":
        y = op.Mul(product(qa, qw), op.Mul(sa_d, op.Transpose(sw_d, perm=[1, 0])))
    else:
        kb_count = -(-k // 128)
        sa_full = _expand_block_rows(sa_d, _rows(qa), kb_count) if act_gran == "block128" else sa_d  # [M, Kb|1]
        sw_full = _expand_block_rows(sw_d, _ints(n), kb_count) if w_gran == "block128" else sw_d  # [N, Kb|1]
        y = None
        for kb in range(kb_count):  # unrolled: O(M*N) memory, the reference's summation order
            lo, hi = kb * 128, min(k, (kb + 1) * 128)
            part = product(op.Slice(qa, _ints(lo), _ints(hi), _ints(1)),
                           op.Slice(qw, _ints(lo), _ints(hi), _ints(1)))
            ca = op.Slice(sa_full, _ints(kb), _ints(kb + 1), _ints(1)) if act_gran == "block128" else sa_full
            cw = op.Slice(sw_full, _ints(kb), _ints(kb + 1), _ints(1)) if w_gran == "block128" else sw_full
            term = op.Mul(part, op.Mul(ca, op.Transpose(cw, perm=[1, 0])))
            y = term if y is None else op.Add(y, term)
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=DOUBLE))
    return op.Cast(y, to=out_dtype)


def quantize_activation(x, format: str, granularity: str, backend: str):
    """turbocompile::quantize_activation -> standard ops."""
    return _quantize(x, format, granularity, int(x.shape[1]))


def w8a8_linear(x, qweight, wscale, bias, format: str, act_granularity: str, weight_granularity: str,
                backend: str):
    """turbocompile::w8a8_linear: dynamic quantization + integer GEMM, output in x's dtype."""
    k = int(x.shape[-1])
    x2 = op.Reshape(x, _ints(-1, k))
    qa, sa = _quantize(x2, format, act_granularity, k)
    y = _gemm(qa, sa, qweight, wscale, bias, format, act_granularity, weight_granularity, x.dtype)
    out_shape = op.Concat(op.Shape(x, start=0, end=-1), _ints(int(qweight.shape[0])), axis=0)
    return op.Reshape(y, out_shape)


def w8a8_linear_prequant(qx, xscale, qweight, wscale, bias, format: str, act_granularity: str,
                         weight_granularity: str, out_dtype: int, backend: str):
    """turbocompile::w8a8_linear_prequant: the GEMM on quantized activations."""
    return _gemm(qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity, out_dtype)


def w8a8_linear_prequant_sumsq(qx, xscale, qweight, wscale, bias, format: str, act_granularity: str,
                               weight_granularity: str, out_dtype: int, backend: str):
    """turbocompile::w8a8_linear_prequant_sumsq -> (y, sumsq): y as w8a8_linear_prequant, and the float32 sums of
    squares of y's values (rounded to out_dtype, as y holds them) per row and 128-column granule, the last
    granule zero-padded: ``ref.granule_sumsq_ref``."""
    y = _gemm(qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity, out_dtype)
    n = int(qweight.shape[0])
    g = -(-n // 128)
    yf = op.Cast(y, to=FLOAT)  # exact: y is already rounded to out_dtype
    sq = op.Mul(yf, yf)
    if g * 128 != n:
        sq = op.Pad(sq, _ints(0, 0, 0, g * 128 - n))
    return y, op.ReduceSum(op.Reshape(sq, _ints(-1, g, 128)), _ints(2), keepdims=0)


def w8a8_linear_residual(qx, xscale, qweight, wscale, bias, format: str, act_granularity: str,
                         weight_granularity: str, residual, gate, backend: str):
    """turbocompile::w8a8_linear_residual: the GEMM rounded to the residual's dtype, then x + y·gate (eager ops)."""
    y = _gemm(qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity, residual.dtype)
    return _gated_residual(residual, op.Reshape(y, op.Shape(residual)), gate)


def _gelu_tanh(x):
    """GELU with the tanh approximation in float32 (standard ops; ONNX Gelu needs opset 20)."""
    xf = _f32(x)
    inner = op.Mul(_f(0.7978845608028654), op.Add(xf, op.Mul(_f(0.044715), op.Mul(op.Mul(xf, xf), xf))))
    return op.Mul(op.Mul(_f(0.5), xf), op.Add(_f(1.0), op.Tanh(inner)))


def w8a8_linear_gelu(qx, xscale, qweight, wscale, bias, format: str, act_granularity: str,
                     weight_granularity: str, out_dtype: int, backend: str):
    """turbocompile::w8a8_linear_gelu: the GEMM rounded to out_dtype, then GELU (tanh), like the reference."""
    y = _gemm(qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity, out_dtype)
    return op.Cast(_gelu_tanh(y), to=out_dtype)


def _quantize_pow2(h):
    """Per-token FP8 with power-of-two scales (``ref.quantize_pow2_ref``): scale 2^e, codes e4m3(h * 2^-e).

    e = ceil(log2(amax / 448)) from a float log2 estimate, corrected by exact comparisons (448 * 2^e is
    exact): the estimate can be one off only next to a power of two, and then one step fixes it.
    """
    xf = _f32(h)
    e = _pow2_exponent(op.ReduceMax(op.Abs(xf), _ints(1), keepdims=1))
    return op.Cast(op.Mul(xf, op.Pow(_f(2.0), op.Neg(e))), to=FP8), op.Pow(_f(2.0), e)


def _pow2_exponent(a):
    """float ``e = ceil(log2(max(a, 1e-8) / 448))`` per element of ``a`` (``ref.pow2_exponent_ref``)."""
    a = op.Max(a, _f(1e-8))
    e = op.Ceil(op.Div(op.Log(op.Div(a, _f(448.0))), _f(math.log(2.0))))
    too_big = op.LessOrEqual(a, op.Mul(_f(448.0), op.Pow(_f(2.0), op.Sub(e, _f(1.0)))))  # e - 1 suffices
    e = op.Sub(e, op.Cast(too_big, to=FLOAT))
    too_small = op.Greater(a, op.Mul(_f(448.0), op.Pow(_f(2.0), e)))
    return op.Add(e, op.Cast(too_small, to=FLOAT))


def _bound_row_scale(qx, xscale, wbound):
    """The "bound" row scales [M, 1] of 8-bit codes qx with per-token scales xscale (``ref.row_bound_scale_ref``):
    2^e covering ``(xscale·sqrt(Σ qx²)·C + b)·BOUND_MARGIN`` at 448, ``wbound = [C, b]``."""
    n2 = op.ReduceSum(op.Mul(_f32(qx), _f32(qx)), _ints(1), keepdims=1)
    c = op.Gather(wbound, op.Constant(value_int=0))
    b = op.Gather(wbound, op.Constant(value_int=1))
    bound = op.Mul(op.Add(op.Mul(op.Mul(_f32(xscale), op.Sqrt(n2)), c), b), _f(BOUND_MARGIN))
    return op.Pow(_f(2.0), _pow2_exponent(bound))


def _codes_at_scale(h, s):
    """e4m3 codes of h at power-of-two row scales s (``ref.quantize_at_scale_ref``; the division is exact)."""
    return op.Cast(op.Clip(op.Div(_f32(h), s), _f(-448.0), _f(448.0)), to=FP8)


def _quantize_bound(h, qx, xscale, wbound):
    """FP8 at the "bound" row scales (``ref.row_bound_scale_ref`` / ``ref.quantize_at_scale_ref``)."""
    s = _bound_row_scale(qx, xscale, wbound)
    return _codes_at_scale(h, s), s


def w8a8_linear_gelu_quant(qx, xscale, qweight, wscale, bias, format: str, act_granularity: str,
                           weight_granularity: str, out_dtype: int, out_format: str, backend: str,
                           out_scale: str = "amax", wbound=None):
    """turbocompile::w8a8_linear_gelu_quant: w8a8_linear_gelu, then the per-token quantizer
    (amax scales, power-of-two ones for ``out_scale="pow2"``, or the "bound" ones)."""
    h = w8a8_linear_gelu(qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity,
                         out_dtype, backend)
    if out_scale == "pow2":
        return _quantize_pow2(h)
    if out_scale == "bound":
        if wbound is None:
            raise ValueError("ONNX export of w8a8_linear_gelu_quant with out_scale 'bound' needs the graph's wbound "
                             "constant (fuse_gemm_epilogues stores it); valid out_scale without it: amax, pow2")
        return _quantize_bound(h, qx, xscale, wbound)
    return _quantize(h, out_format, "per_token", int(qweight.shape[0]))


def w8a8_linear_gelu_quant_rowscale(qx, xscale, qweight, wscale, bias, format: str, act_granularity: str,
                                    weight_granularity: str, out_dtype: int, row_scale, backend: str):
    """turbocompile::w8a8_linear_gelu_quant_rowscale: w8a8_linear_gelu, then FP8 codes at the given row scales."""
    h = w8a8_linear_gelu(qx, xscale, qweight, wscale, bias, format, act_granularity, weight_granularity,
                         out_dtype, backend)
    return _codes_at_scale(h, row_scale)


# ----------------------------------------------------------------------------- norms
def _ln_mod_f32(x, weight, bias, shift, scale, eps: float):
    """float32 ``(LN(x)·w + b)·(1 + scale) + shift`` over the last dim (layer_norm_modulate_ref)."""
    xf = _f32(x)
    mean = op.ReduceMean(xf, _ints(-1), keepdims=1)
    d = op.Sub(xf, mean)
    var = op.ReduceMean(op.Mul(d, d), _ints(-1), keepdims=1)
    h = op.Mul(d, op.Reciprocal(op.Sqrt(op.Add(var, _f(eps)))))
    if weight is not None:
        h = op.Mul(h, _f32(weight))
    if bias is not None:
        h = op.Add(h, _f32(bias))
    if scale is not None:
        h = op.Mul(h, op.Add(_f(1.0), _f32(scale)))
    if shift is not None:
        h = op.Add(h, _f32(shift))
    return h


def _out_dtype(out_dtype, x):
    return x.dtype if out_dtype is None or int(out_dtype) < 0 else out_dtype


def _gated_residual(x, y, gate):
    """x + y * gate.to(x.dtype) with the eager roundings (computed in float32, rounded to x's dtype)."""
    dt = x.dtype
    if gate is None:
        s = op.Add(_f32(x), _f32(y))
    else:
        g = _round_to(_f32(gate), dt)
        s = op.Add(_f32(x), _round_to(op.Mul(_f32(y), g), dt))
    return op.Cast(s, to=dt)


def ln_modulate(x, weight, bias, shift, scale, eps: float, out_dtype: int = -1, backend: str = "auto"):
    """turbocompile::ln_modulate -> decomposed LayerNorm + modulation, one rounding at the end."""
    return op.Cast(_ln_mod_f32(x, weight, bias, shift, scale, eps), to=_out_dtype(out_dtype, x))


def residual_ln_modulate(x, y, gate, weight, bias, shift, scale, eps: float, out_dtype: int = -1,
                         backend: str = "auto"):
    """turbocompile::residual_ln_modulate -> (x_new, h)."""
    x_new = _gated_residual(x, y, gate)
    h = op.Cast(_ln_mod_f32(x_new, weight, bias, shift, scale, eps), to=_out_dtype(out_dtype, x))
    return x_new, h


def _ln_quant(x, weight, bias, shift, scale, eps, fmt, granularity, d: int, dtype):
    h = _round_to(_ln_mod_f32(x, weight, bias, shift, scale, eps), dtype)
    return _quantize(op.Reshape(h, _ints(-1, d)), fmt, granularity, d)


def ln_modulate_quant(x, weight, bias, shift, scale, eps: float, format: str, granularity: str,
                      backend: str):
    """turbocompile::ln_modulate_quant -> (q [M, D], scale)."""
    return _ln_quant(x, weight, bias, shift, scale, eps, format, granularity, int(x.shape[-1]), x.dtype)


def residual_ln_modulate_quant(x, y, gate, weight, bias, shift, scale, eps: float, format: str,
                               granularity: str, backend: str):
    """turbocompile::residual_ln_modulate_quant -> (x_new, q, scale)."""
    x_new = _gated_residual(x, y, gate)
    q, s = _ln_quant(x_new, weight, bias, shift, scale, eps, format, granularity, int(x.shape[-1]), x.dtype)
    return x_new, q, s


def ln_modulate_quant_bound(x, weight, bias, shift, scale, eps: float, format: str, granularity: str, wbound,
                            backend: str):
    """turbocompile::ln_modulate_quant_bound -> (q [M, D] FP8, scale, bound scale [M, 1])."""
    q, s = ln_modulate_quant(x, weight, bias, shift, scale, eps, format, granularity, backend)
    return q, s, _bound_row_scale(q, s, wbound)


def residual_ln_modulate_quant_bound(x, y, gate, weight, bias, shift, scale, eps: float, format: str,
                                     granularity: str, wbound, backend: str):
    """turbocompile::residual_ln_modulate_quant_bound -> (x_new, q, scale, bound scale)."""
    x_new, q, s = residual_ln_modulate_quant(x, y, gate, weight, bias, shift, scale, eps, format, granularity,
                                             backend)
    return x_new, q, s, _bound_row_scale(q, s, wbound)


def rmsnorm_rope(z, weight, cos, sin, num_heads: int, eps: float, backend: str):
    """turbocompile::rmsnorm_rope -> RMSNorm (rounded to z's dtype, then · weight) + interleaved RoPE."""
    dt = z.dtype
    zf = _f32(z)
    rms = op.Reciprocal(op.Sqrt(op.Add(op.ReduceMean(op.Mul(zf, zf), _ints(-1), keepdims=1), _f(eps))))
    n = _round_to(op.Mul(zf, rms), dt)
    n = op.Mul(n, _f32(weight))
    if int(weight.dtype) == int(dt):  # dt x dt product rounds to dt; dt x float32 stays float32
        n = _round_to(n, dt)
    if cos is None:
        return op.Cast(n, to=dt)
    L, D = int(z.shape[1]), int(z.shape[2])
    half = D // num_heads // 2
    pairs = op.Reshape(n, _ints(-1, L, num_heads, half, 2))
    a = op.Slice(pairs, _ints(0), _ints(1), _ints(4))
    b = op.Slice(pairs, _ints(1), _ints(2), _ints(4))
    c = op.Reshape(_f32(cos), _ints(1, L, 1, half, 1))
    s = op.Reshape(_f32(sin), _ints(1, L, 1, half, 1))
    out = op.Concat(op.Sub(op.Mul(a, c), op.Mul(b, s)), op.Add(op.Mul(a, s), op.Mul(b, c)), axis=4)
    return op.Cast(op.Reshape(out, _ints(-1, L, D)), to=dt)


def rmsnorm_rope_pool(z, weight, cos, sin, num_heads: int, eps: float, pool_rows: int, mean: bool, v,
                      backend: str):
    """turbocompile::rmsnorm_rope_pool -> (out, per-head block sums/means of out, per-head block max |v|
    or an empty [0] float tensor without v), as ``kernels.norms.ref.rmsnorm_rope_pool_ref``."""
    out = rmsnorm_rope(z, weight, cos, sin, num_heads, eps, backend)
    L, D = int(z.shape[1]), int(z.shape[2])
    d = D // num_heads

    def heads(x):  # [B, L, D] -> [B, H, L, d] float32
        return op.Transpose(op.Reshape(_f32(x), _ints(-1, L, num_heads, d)), perm=[0, 2, 1, 3])

    nb = -(-L // pool_rows)
    pooled = _pool(heads(out), pool_rows, L, num_heads, d)
    if not mean:  # block sums: undo _pool's division by the rows of each block
        cnt = [float(min(pool_rows, L - i * pool_rows)) for i in range(nb)]
        pooled = op.Mul(pooled, op.Constant(value=onnx.helper.make_tensor("cnt", FLOAT, [nb, 1], cnt)))
    pooled = op.Reshape(pooled, _ints(-1, nb, d))
    if v is None:
        vmax = op.Constant(value=onnx.helper.make_tensor("no_vmax", FLOAT, [0], []))
    else:
        va = op.Pad(op.Abs(heads(v)), _ints(0, 0, 0, 0, 0, 0, nb * pool_rows - L, 0))
        vmax = op.Reshape(op.ReduceMax(op.Reshape(va, _ints(-1, num_heads, nb, pool_rows, d)), _ints(3), keepdims=0),
                          _ints(-1, nb, d))
    return out, pooled, vmax


# ----------------------------------------------------------------------------- sagesla
def _pool(x, block: int, L: int, H: int, D: int):
    """Mean over each ``block`` of rows of x [B, H, L, D] (divides by the real row count)."""
    nb = -(-L // block)
    xp = op.Pad(x, _ints(0, 0, 0, 0, 0, 0, nb * block - L, 0))
    s = op.ReduceSum(op.Reshape(xp, _ints(-1, H, nb, block, D)), _ints(3), keepdims=0)
    cnt = [float(block)] * nb
    cnt[-1] = float(L - (nb - 1) * block)
    return op.Div(s, op.Constant(value=onnx.helper.make_tensor("cnt", FLOAT, [nb, 1], cnt)))


def _fake_int8_blocks(x, block: int, L: int, H: int, D: int):
    """quant_int8_blocks: int8 per ``block`` rows, round half away from zero, dequantized."""
    nb = -(-L // block)
    xp = op.Reshape(op.Pad(x, _ints(0, 0, 0, 0, 0, 0, nb * block - L, 0)), _ints(-1, H, nb, block * D))
    scale = op.Add(op.Div(op.ReduceMax(op.Abs(xp), _ints(-1), keepdims=1), _f(127.0)), _f(_sla_ref.EPS_SCALE))
    y = op.Div(xp, scale)
    y = op.Mul(op.Sign(y), op.Floor(op.Add(op.Abs(y), _f(0.5))))
    y = op.Mul(op.Clip(y, _f(-127.0), _f(127.0)), scale)
    return op.Slice(op.Reshape(y, _ints(-1, H, nb * block, D)), _ints(0), _ints(L), _ints(2))


def _fake_fp8(x):
    return _e4m3(op.Clip(x, _f(-448.0), _f(448.0)))


def _linear_branch(qf, kf, vf, pw, pb):
    pq = op.Softmax(qf, axis=-1)
    pk = op.Softmax(kf, axis=-1)
    kv = op.MatMul(op.Transpose(pk, perm=[0, 1, 3, 2]), vf)
    ksum = op.ReduceSum(pk, _ints(2), keepdims=1)
    den = op.Add(_f(_sla_ref.EPS_LINEAR), op.ReduceSum(op.Mul(pq, ksum), _ints(-1), keepdims=1))
    o = op.Div(op.MatMul(pq, kv), den)
    if pw is None:
        o = op.Mul(o, _f(0.0))
    else:
        o = op.MatMul(o, op.Transpose(_f32(pw), perm=[1, 0]))
    if pb is not None:
        o = op.Add(o, _f32(pb))
    return o


def sagesla_standard(q, k, v, topk: float, proj_weight, proj_bias, block_q: int, block_k: int,
                     quant: str, backend: str, q_pool=None, k_blocksum=None, v_absmax=None):
    """turbocompile::sagesla as standard ONNX ops: the reference's function (sagesla_ref). The
    optional precomputed block statistics are not used (recomputed from q, k, v, as the reference)."""
    L, H, D = int(q.shape[1]), int(q.shape[2]), int(q.shape[3])
    qf, kf, vf = (op.Transpose(_f32(t), perm=[0, 2, 1, 3]) for t in (q, k, v))  # [B, H, L, D]
    k_smooth = op.Sub(kf, op.ReduceMean(kf, _ints(2), keepdims=1))
    qb, kb = -(-L // block_q), -(-L // block_k)
    # block map: pooled scores, top-k key blocks per query block, as a 0/1 mask
    scores = op.MatMul(_pool(qf, block_q, L, H, D), op.Transpose(_pool(k_smooth, block_k, L, H, D),
                                                                   perm=[0, 1, 3, 2]))
    t = _sla_ref.num_kept_blocks(topk, kb)
    _, idx = op.TopK(scores, _ints(t), axis=-1)
    keep = op.ScatterElements(op.Mul(scores, _f(0.0)), idx, op.Add(op.Mul(op.Cast(idx, to=FLOAT), _f(0.0)),
                                                                    _f(1.0)), axis=-1)
    keep = op.Expand(op.Reshape(keep, _ints(-1, H, qb, 1, kb, 1)), _ints(1, 1, 1, block_q, 1, block_k))
    keep = op.Reshape(keep, _ints(-1, H, qb * block_q, kb * block_k))
    mask = op.Greater(op.Slice(keep, _ints(0, 0), _ints(L, L), _ints(2, 3)), _f(0.5))  # [B, H, L, L]

    if quant == "none":
        qd, kd, vd = qf, kf, vf
    else:
        qd = _fake_int8_blocks(qf, block_q, L, H, D)
        kd = _fake_int8_blocks(k_smooth, block_k, L, H, D)
        if quant == "int8-fp8":
            vs = op.Add(op.Div(op.ReduceMax(op.Abs(vf), _ints(2), keepdims=1), _f(448.0)), _f(_sla_ref.EPS_SCALE))
            vd = op.Mul(_fake_fp8(op.Div(vf, vs)), vs)
        else:
            vd = _round_to(vf, FLOAT16)
    s = op.Mul(op.MatMul(qd, op.Transpose(kd, perm=[0, 1, 3, 2])), _f(1.0 / math.sqrt(D)))
    s = op.Where(mask, s, _f(float("-inf")))
    p = op.Exp(op.Sub(s, op.ReduceMax(s, _ints(-1), keepdims=1)))
    denom = op.ReduceSum(p, _ints(-1), keepdims=1)
    if quant == "int8-fp8":
        p = op.Div(_fake_fp8(op.Mul(p, _f(448.0))), _f(448.0))
    elif quant == "int8-fp16":
        p = _round_to(p, FLOAT16)
    o = op.Add(op.Div(op.MatMul(p, vd), denom), _linear_branch(qf, kf, vf, proj_weight, proj_bias))
    return op.Cast(op.Transpose(o, perm=[0, 2, 1, 3]), to=q.dtype)


def _sagesla_schema() -> onnx.defs.OpSchema:
    P = onnx.defs.OpSchema.FormalParameter
    opt = onnx.defs.OpSchema.FormalParameterOption.Optional
    A = onnx.defs.OpSchema.Attribute
    AT = onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        "SageSLA", CUSTOM_DOMAIN, 1,
        doc="SageSLA attention (turbocompile::sagesla); see the turbocompile README.",
        inputs=[P("q", "T"), P("k", "T"), P("v", "T"),
                P("proj_weight", "TP", param_option=opt), P("proj_bias", "TP", param_option=opt)],
        outputs=[P("output", "T")],
        type_constraints=[("T", ["tensor(bfloat16)", "tensor(float16)"], "q, k, v and output"),
                          ("TP", ["tensor(float)", "tensor(bfloat16)", "tensor(float16)"], "proj_l")],
        attributes=[A("topk", AT.FLOAT, "fraction of key blocks kept per query block"),
                    A("block_q", AT.INT, "query block size"), A("block_k", AT.INT, "key block size"),
                    A("quant", AT.STRING, "int8-fp8 | int8-fp16 | none")],
    )


SAGESLA_SCHEMA = _sagesla_schema()
_TC_OPSET = onnxscript.values.Opset(CUSTOM_DOMAIN, 1)
_SAGESLA_OP = onnxscript.values.Op(_TC_OPSET, "SageSLA", SAGESLA_SCHEMA)


def sagesla_custom(q, k, v, topk: float, proj_weight, proj_bias, block_q: int, block_k: int,
                   quant: str, backend: str, q_pool=None, k_blocksum=None, v_absmax=None):
    """turbocompile::sagesla as one custom-domain ``turbocompile.SageSLA`` node (the node's inputs are
    q, k, v and proj_l only: precomputed block statistics are an execution detail, left out)."""
    return _SAGESLA_OP(q, k, v, proj_weight, proj_bias, topk=float(topk), block_q=int(block_q),
                       block_k=int(block_k), quant=str(quant))


def _output_bound(v, proj_weight, proj_bias):
    """float32 [B]: ``448·max(vs_b)·(1 + 2^-4 + R) + max|bias|``, vs = max_L |v| / 448 + 1e-7 (``output_bound_ref``)."""
    vs = op.Add(op.Div(op.ReduceMax(op.Abs(_f32(v)), _ints(1), keepdims=0), _f(448.0)), _f(_sla_ref.EPS_SCALE))
    cap = op.Mul(op.ReduceMax(vs, _ints(1, 2), keepdims=0), _f(448.0))  # [B]
    gain = _f(1.0 + _sla_ref.P8_SLACK)
    if proj_weight is not None:
        gain = op.Add(gain, op.ReduceMax(op.ReduceSum(op.Abs(_f32(proj_weight)), _ints(1), keepdims=0),
                                         _ints(0), keepdims=0))
    bound = op.Mul(cap, gain)
    if proj_bias is not None:
        bound = op.Add(bound, op.ReduceMax(op.Abs(_f32(proj_bias)), _ints(0), keepdims=0))
    return bound


def _codes_at_sample_bound(o, v, proj_weight, proj_bias, L: int, HD: int):
    """(FP8 codes [B*L, HD], scales [B*L, 1]) of the attention output o (q's dtype) at each sample's bound."""
    bound = _output_bound(v, proj_weight, proj_bias)
    a = op.Reshape(op.Expand(op.Unsqueeze(bound, _ints(1, 2)), op.Concat(_rows(bound), _ints(L, 1), axis=0)),
                   _ints(-1, 1))  # [B*L, 1]: sample b's bound on each of its rows
    return _codes(op.Reshape(_f32(o), _ints(-1, HD)), a, "fp8"), op.Div(a, _f(448.0))


def sagesla_quant_standard(q, k, v, topk: float, proj_weight, proj_bias, block_q: int, block_k: int,
                           quant: str, backend: str, q_pool=None, k_blocksum=None, v_absmax=None):
    """turbocompile::sagesla_quant -> (FP8 codes, scales): :func:`sagesla_standard`, then the codes at each
    sample's output bound (``sagesla_quant_ref``)."""
    o = sagesla_standard(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend)
    L, H, D = int(q.shape[1]), int(q.shape[2]), int(q.shape[3])
    return _codes_at_sample_bound(o, v, proj_weight, proj_bias, L, H * D)


def sagesla_quant_custom(q, k, v, topk: float, proj_weight, proj_bias, block_q: int, block_k: int,
                         quant: str, backend: str, q_pool=None, k_blocksum=None, v_absmax=None):
    """turbocompile::sagesla_quant with the attention as the custom ``turbocompile.SageSLA`` node (its output in q's
    dtype), then the codes at each sample's output bound in standard ops."""
    o = sagesla_custom(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend)
    L, H, D = int(q.shape[1]), int(q.shape[2]), int(q.shape[3])
    return _codes_at_sample_bound(o, v, proj_weight, proj_bias, L, H * D)


# ----------------------------------------------------------------------------- merged padding keys
def key_tail_start(k, v, backend: str):
    """turbocompile::key_tail_start -> int32 [B, H]: one past the last row of k or v that differs from the
    last row (Equal over D, position-weighted ReduceMax over the keys), as ``key_tail_start_ref``."""
    lk = int(k.shape[1])
    last = _ints(lk - 1)
    kf, vf = _f32(k), _f32(v)  # exact for 16-bit floats (onnxruntime has no bfloat16 Equal)
    same = op.And(op.Equal(kf, op.Gather(kf, last, axis=1)), op.Equal(vf, op.Gather(vf, last, axis=1)))
    # Gather with a 1-element index keeps the key axis (size 1), so the comparison broadcasts over it
    differs = op.Cast(op.Not(same), to=INT64)  # [B, Lk, H, D]
    row = op.ReduceMax(differs, _ints(3), keepdims=0)  # [B, Lk, H]
    pos = op.Constant(value=onnx.helper.make_tensor("pos", INT64, [1, lk, 1], list(range(1, lk + 1))))
    return op.Cast(op.ReduceMax(op.Mul(row, pos), _ints(1), keepdims=0), to=_T.INT32)


def tail_merged_attention(q, k, v, tail_start, backend: str):
    """turbocompile::tail_merged_attention -> softmax attention with keys n.. as key n, logit + ln(Lk - n),
    in float32 (the reference's function)."""
    return op.Cast(_merged_attention_f32(q, k, v, tail_start, int(k.shape[1]), int(q.shape[3])), to=q.dtype)


def _merged_attention_f32(q, k, v, tail_start, lk: int, d: int):
    """float32 [B, L, H, d] softmax attention of q over keys 0..n-1 and key n with logit + ln(Lk - n)."""
    qf, kf, vf = (op.Transpose(_f32(t), perm=[0, 2, 1, 3]) for t in (q, k, v))  # [B, H, *, D]
    n = op.Unsqueeze(op.Cast(tail_start, to=INT64), _ints(2, 3))  # [B, H, 1, 1]
    j = op.Constant(value=onnx.helper.make_tensor("j", INT64, [1, 1, 1, lk], list(range(lk))))
    mult = op.Cast(op.Max(op.Sub(_ints(lk), n), _ints(1)), to=FLOAT)
    bias = op.Where(op.Less(j, n), _f(0.0), op.Where(op.Equal(j, n), op.Log(mult), _f(float("-inf"))))
    s = op.Add(op.Mul(op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2])), _f(1.0 / math.sqrt(d))), bias)
    return op.Transpose(op.MatMul(op.Softmax(s, axis=-1), vf), perm=[0, 2, 1, 3])


def value_bound(v):
    """turbocompile::value_bound -> float32 [B]: max(max |v[b]|, 1e-8)."""
    return op.Max(op.ReduceMax(op.Abs(_f32(v)), _ints(1, 2, 3), keepdims=0), _f(1e-8))


def norm_attention_quant(z, weight, k, v, v_bound, tail_start, num_heads: int, eps: float, backend: str,
                         sumsq=None):
    """turbocompile::norm_attention_quant -> (FP8 codes [B*L, D], scales [B*L, 1]): RMSNorm, attention over
    all keys (or the merged tail), codes at each sample's scale v_bound[b] / 448, as the op's reference."""
    # ``sumsq`` (the q GEMM's granule sums of squares of z) is accepted and left unread: the RMSNorm below takes
    # mean(z²) from z, the same statistic up to fp32 summation order. Reading z once more costs an ONNX runtime
    # nothing comparable to the GPU pass the argument saves, and it keeps one RMSNorm translation.
    L, D = int(z.shape[1]), int(z.shape[2])
    q = op.Reshape(rmsnorm_rope(z, weight, None, None, num_heads, eps, backend), _ints(0, L, num_heads, D // num_heads))
    if tail_start is None:  # tail start Lk: plain attention over every key
        tail_start = op.Constant(value=onnx.helper.make_tensor("lk", _T.INT32, [1, 1], [int(k.shape[1])]))
    o = _merged_attention_f32(q, k, v, tail_start, int(k.shape[1]), D // num_heads)
    o = op.Reshape(_round_to(o, z.dtype), _ints(-1, D))  # the attention output in z's dtype, as the op rounds it
    a = op.Reshape(op.Expand(op.Unsqueeze(v_bound, _ints(1, 2)), op.Concat(_rows(v_bound), _ints(L, 1), axis=0)),
                   _ints(-1, 1))  # [B*L, 1]: sample b's bound on each of its rows
    return _codes(o, a, "fp8"), op.Div(a, _f(448.0))


def translation_table(attention: str = "standard") -> dict:
    """``custom_translation_table`` for ``torch.onnx.export`` covering every turbocompile op."""
    import torch

    ops = torch.ops.turbocompile
    return {
        ops.quantize_activation.default: quantize_activation,
        ops.w8a8_linear.default: w8a8_linear,
        ops.w8a8_linear_prequant.default: w8a8_linear_prequant,
        ops.w8a8_linear_prequant_sumsq.default: w8a8_linear_prequant_sumsq,
        ops.w8a8_linear_gelu.default: w8a8_linear_gelu,
        ops.w8a8_linear_gelu_quant.default: w8a8_linear_gelu_quant,
        ops.w8a8_linear_gelu_quant_rowscale.default: w8a8_linear_gelu_quant_rowscale,
        ops.w8a8_linear_residual.default: w8a8_linear_residual,
        ops.ln_modulate.default: ln_modulate,
        ops.residual_ln_modulate.default: residual_ln_modulate,
        ops.rmsnorm_rope.default: rmsnorm_rope,
        ops.rmsnorm_rope_pool.default: rmsnorm_rope_pool,
        ops.ln_modulate_quant.default: ln_modulate_quant,
        ops.residual_ln_modulate_quant.default: residual_ln_modulate_quant,
        ops.ln_modulate_quant_bound.default: ln_modulate_quant_bound,
        ops.residual_ln_modulate_quant_bound.default: residual_ln_modulate_quant_bound,
        ops.sagesla.default: sagesla_custom if attention == "custom" else sagesla_standard,
        ops.sagesla_quant.default: sagesla_quant_custom if attention == "custom" else sagesla_quant_standard,
        ops.key_tail_start.default: key_tail_start,
        ops.tail_merged_attention.default: tail_merged_attention,
        ops.value_bound.default: value_bound,
        ops.norm_attention_quant.default: norm_attention_quant,
    }


# ----------------------------------------------------------------------------- writer
def _graph_ops(prog) -> list[tuple[str, tuple]]:
    """(op name, args) of every turbocompile op in the exported program."""
    out = []
    for node in prog.program.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("turbocompile."):
            out.append((node.target._schema.name.split("::")[1], node.args))
    return out


def _uses_fp8(ops) -> bool:
    return any(name in ("norm_attention_quant", "sagesla_quant") or "fp8" in [a for a in args if isinstance(a, str)]
               for name, args in ops)


def save_onnx(prog, out, *, attention: str = "standard", opset: int | None = None, overwrite: bool = True,
              log=None) -> dict:
    """Translate an :class:`~turbocompile.export.pt2.ExportedArtifact` to ONNX and write it atomically.

    The file records provenance in ``metadata_props`` (turbocompile version, recipe, input
    shapes with ``batch`` for a dynamic batch, attention mode). Returns a summary dict.
    """
    import torch

    from turbocompile.export import DEFAULT_OPSET, ExportError, atomic_write

    ops = _graph_ops(prog)
    fp8 = _uses_fp8(ops)
    if opset is None:
        opset = FP8_MIN_OPSET if fp8 else DEFAULT_OPSET
    if opset < 18:
        raise ExportError(f"opset {opset} is not supported; use --opset 18 or newer")
    if fp8 and opset < FP8_MIN_OPSET:
        raise ExportError(f"FP8 (float8 e4m3) W8A8 ops need ONNX opset >= {FP8_MIN_OPSET} (got {opset}); "
                          "INT8 recipes export at any supported opset")
    notes = list(prog.notes)
    if prog.manifest["signature"].get("activation_dtype") == "bfloat16":
        notes.append("bfloat16 graph: onnxruntime's CPU provider has no bfloat16 MatMul; for CPU inference export "
                     "an artifact optimized with --dtype float32")
    n_sla = sum(1 for name, _ in ops if name in ("sagesla", "sagesla_quant"))
    if n_sla:
        if attention == "custom":
            notes.append(f"{n_sla} sagesla ops exported as custom-domain '{CUSTOM_DOMAIN}.SageSLA' nodes: the "
                         "runtime must provide this op (onnxruntime does not)")
        else:
            notes.append(f"{n_sla} sagesla ops exported as standard ONNX ops computing the op's reference "
                         "function (block map + top-k + sparse softmax + linear branch), dense O(L^2) memory")
    if log:
        log(f"translating to ONNX (opset {opset}, attention {attention})")
    try:
        onnx_prog = torch.onnx.export(
            prog.program, prog.args, dynamo=True, custom_translation_table=translation_table(attention),
            opset_version=opset, input_names=list(prog.input_names), output_names=["output"],
            optimize=True, verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - the exporter's errors are long; report one line
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        first = next((ln for ln in str(root).splitlines() if ln.strip()), "")
        raise ExportError(f"ONNX translation failed: {type(root).__name__}: {first[:300]}") from None
    meta = prog.metadata()
    meta.update({"attention": attention, "opset": str(opset), "sagesla_ops": str(n_sla),
                 "notes": " | ".join(notes)})
    model = onnx_prog.model
    if n_sla and attention == "custom":
        model.opset_imports[CUSTOM_DOMAIN] = 1
    for key, value in meta.items():
        model.metadata_props[f"turbocompile.{key}"] = value

    nbytes = sum(t.numel() * t.element_size() for t in
                 list(prog.program.state_dict.values()) + list(prog.program.constants.values())
                 if isinstance(t, torch.Tensor))
    if nbytes < _EXTERNAL_DATA_BYTES:
        atomic_write(out, lambda tmp: onnx_prog.save(str(tmp), external_data=False), overwrite=overwrite)
    else:  # protobuf's 2 GiB limit: weights go to OUT.data beside OUT (both renamed into place)
        _write_with_external_data(onnx_prog, Path(out), overwrite)
        notes.append(f"weights stored in {Path(out).name}.data beside the model (keep them together)")
    if log:
        log(f"wrote {out}")
    return {"out": str(out), "format": "onnx", "opset": opset, "attention": attention,
            "dynamic_batch": prog.dynamic_batch, "input_shapes": json.loads(meta["input_shapes"]),
            "notes": notes}


_EXTERNAL_DATA_BYTES = 1800 << 20


def _write_with_external_data(onnx_prog, out: Path, overwrite: bool) -> None:
    """Atomic-ish write of a model with external data: both files are written to a temporary
    directory beside ``out`` and renamed into place, data first (the model names it ``OUT.data``)."""
    import os
    import shutil
    import uuid

    from turbocompile.export import ExportError

    if out.exists() and not overwrite:
        raise ExportError(f"output '{out}' already exists; choose another path or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmpdir.mkdir()
    try:
        onnx_prog.save(str(tmpdir / out.name), external_data=True)
        for f in tmpdir.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        data = [f for f in tmpdir.iterdir() if f.name != out.name]
        for f in data:
            os.replace(f, out.parent / f.name)
        os.replace(tmpdir / out.name, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
