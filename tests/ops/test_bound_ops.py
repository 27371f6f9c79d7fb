"""turbocompile::{ln_modulate_quant_bound, residual_ln_modulate_quant_bound} (the FFN norm writing the GELU GEMM's
"bound" row scales) and turbocompile::w8a8_linear_gelu_quant_rowscale (the GELU GEMM taking them): schemas, fake
kernels (opcheck), both backends against the references and against the unfolded ops, one-line errors."""

from __future__ import annotations

import pytest
import torch

from tests._env import kernel_device, triton_runs_here
from turbocompile.kernels.w8a8 import ref as wref
from turbocompile.ops import norms
from turbocompile.ops import w8a8 as W

OPS = torch.ops.turbocompile
triton_only = pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
B, L, D, N = 2, 5, 64, 96


def _norm_args(dev="cpu"):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, L, D, generator=g) * 3).bfloat16()
    a = dict(x=x, y=torch.randn(B, L, D, generator=g).bfloat16(), gate=torch.randn(B, 1, D, generator=g),
             sh=torch.randn(B, 1, D, generator=g), sc=torch.randn(B, 1, D, generator=g),
             wb=torch.tensor([0.8, 0.25]))
    return {k: v.to(dev) for k, v in a.items()}


def _gemm_args(fmt="fp8", m=B * L, dev="cpu"):
    g = torch.Generator().manual_seed(1)
    qx, sx = wref.quantize_ref(torch.randn(m, D, generator=g) * 2, fmt, "per_token")
    qw, sw = W.quantize_weight(torch.randn(N, D, generator=g) * 0.1, fmt, "per_channel")
    b = torch.randn(N, generator=g)
    wb = wref.gelu_bound_constants_ref(qw, sw, b, "per_channel")
    return [t.to(dev) for t in (qx, sx, qw, sw, b)], wb.to(dev)


# ------------------------------------------------------------------------------------------ norms


def _norm_cases(backend, dev="cpu"):
    a = _norm_args(dev)
    return [
        (OPS.ln_modulate_quant_bound.default,
         (a["x"], None, None, a["sh"], a["sc"], 1e-6, "fp8", "per_token", a["wb"], backend)),
        (OPS.residual_ln_modulate_quant_bound.default,
         (a["x"], a["y"], a["gate"], None, None, a["sh"], a["sc"], 1e-6, "fp8", "per_token", a["wb"], backend)),
    ]


@pytest.mark.parametrize("i", range(2))
def test_norm_opcheck_torch_backend(i):
    torch.library.opcheck(*_norm_cases("torch")[i])


@triton_only
@pytest.mark.parametrize("i", range(2))
def test_norm_opcheck_triton_backend(i):
    op, args = _norm_cases("triton", kernel_device())[i]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
def test_norm_ops_are_the_quant_ops_plus_the_reference_bound(backend):
    """q and scale equal the existing *_ln_modulate_quant ops' outputs; the bound scales equal
    ref.row_bound_scale_ref of those codes (torch: by construction; Triton: in the interpreter, and up to the
    boundary caveat compiled, see tests/kernels/test_norms_bound.py)."""
    from tests.kernels.test_norms_bound import assert_bound_scales

    dev = "cpu" if backend == "torch" else kernel_device()
    a = _norm_args(dev)
    q, s, sb = norms.ln_modulate_quant_bound(a["x"], shift=a["sh"], scale=a["sc"], wbound=a["wb"], backend=backend)
    q0, s0 = norms.ln_modulate_quant(a["x"], shift=a["sh"], scale=a["sc"], format="fp8", backend=backend)
    assert torch.equal(q.float(), q0.float()) and torch.equal(s, s0)
    assert_bound_scales(sb, q, s, a["wb"])
    xn, q, s, sb = norms.residual_ln_modulate_quant_bound(a["x"], a["y"], a["gate"], shift=a["sh"], scale=a["sc"],
                                                          wbound=a["wb"], backend=backend)
    xn0, q0, s0 = norms.residual_ln_modulate_quant(a["x"], a["y"], a["gate"], shift=a["sh"], scale=a["sc"],
                                                   format="fp8", backend=backend)
    assert torch.equal(xn, xn0) and torch.equal(q.float(), q0.float()) and torch.equal(s, s0)
    assert_bound_scales(sb, q, s, a["wb"])
    if backend == "torch":
        assert torch.equal(sb, wref.row_bound_scale_ref(q, s, a["wb"]))


@pytest.mark.parametrize("call,match", [
    (lambda a: norms.ln_modulate_quant_bound(a["x"], wbound=a["wb"], format="int8"),
     "ln_modulate_quant_bound: format 'int8' is not supported: the bound row scales are for FP8 codes; valid: fp8"),
    (lambda a: norms.ln_modulate_quant_bound(a["x"], wbound=a["wb"], format="int4"), "unknown format 'int4'"),
    (lambda a: norms.residual_ln_modulate_quant_bound(a["x"], a["y"], wbound=a["wb"], granularity="block128"),
     "granularity 'block128' is not supported: the bound row scales need one scale per row; valid: per_token"),
    (lambda a: norms.ln_modulate_quant_bound(a["x"], wbound=torch.zeros(3)),
     r"wbound must be the \[2\] float32 \[C, b\] of the GELU GEMM"),
    (lambda a: norms.ln_modulate_quant_bound(a["x"], wbound=torch.zeros(2, dtype=torch.float64)),
     r"wbound must be the \[2\] float32 \[C, b\]"),
    (lambda a: norms.ln_modulate_quant_bound(a["x"], wbound=torch.zeros(2, device="meta")),
     "wbound is on meta, x on cpu; both must share one device"),
    (lambda a: norms.ln_modulate_quant_bound(a["x"][..., :0], wbound=a["wb"]), r"x has no channels \(D = 0\)"),
    (lambda a: norms.residual_ln_modulate_quant_bound(a["x"], a["y"][:1], wbound=a["wb"]), "y .* must match x"),
])
def test_norm_errors_are_one_line(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call(_norm_args())
    assert "\n" not in str(err.value)


def test_norm_fake_kernels_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 7, D, dtype=torch.bfloat16)
        q, s, sb = OPS.ln_modulate_quant_bound(x, None, None, None, None, 1e-6, "fp8", "per_token",
                                               torch.empty(2), "triton")
        xn, q2, s2, sb2 = OPS.residual_ln_modulate_quant_bound(x, x, None, None, None, None, None, 1e-6, "fp8",
                                                               "per_token", torch.empty(2), "auto")
    assert q.shape == q2.shape == (21, D) and q.dtype == torch.float8_e4m3fn
    assert s.shape == sb.shape == s2.shape == sb2.shape == (21, 1) and sb.dtype == torch.float32
    assert xn.shape == x.shape


# ------------------------------------------------------------------------------------------ GELU GEMM


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
def test_rowscale_opcheck(backend):
    # INT8 inputs (opcheck's schema test cannot multiply FP8 input tensors on CPU); the FP8 output is the point
    dev = "cpu" if backend == "torch" else kernel_device()
    ops, _ = _gemm_args("int8", dev=dev)
    rs = wref.row_bound_scale_ref(ops[0], ops[1], torch.tensor([0.5, 0.1], device=dev))
    torch.library.opcheck(OPS.w8a8_linear_gelu_quant_rowscale.default,
                          (*ops, "int8", "per_token", "per_channel", torch.bfloat16, rs, backend))


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_rowscale_torch_backend_equals_the_bound_op(fmt):
    """With row_scale = ref.row_bound_scale_ref(qx, sx, wbound): the codes of w8a8_linear_gelu_quant(out_scale=
    "bound", wbound) bit for bit, the scales being row_scale (INT8 inputs work too: only the output is FP8)."""
    ops, wb = _gemm_args(fmt)
    ops[0][3] = 0  # a zero input row: the bias term alone
    rs = wref.row_bound_scale_ref(ops[0], ops[1], wb)
    q = W.w8a8_linear_gelu_quant_rowscale(*ops, fmt, row_scale=rs, backend="torch")
    q_b, s_b = W.w8a8_linear_gelu_quant(*ops, fmt, "per_token", "per_channel", torch.bfloat16, "fp8", "torch",
                                        "bound", wb)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (B * L, N)
    assert torch.equal(s_b, rs) and torch.equal(q.float(), q_b.float())
    h = wref.w8a8_gemm_gelu_ref(*ops, "per_token", "per_channel", torch.bfloat16)
    assert torch.equal(q.float(), wref.quantize_at_scale_ref(h, rs).float())
    q2 = W.w8a8_linear_gelu_quant_rowscale(*ops, fmt, row_scale=rs * 2, backend="torch")  # the scales are used
    assert not torch.equal(q2.float(), q.float())


@triton_only
@pytest.mark.parametrize("m", [1, 37])
def test_rowscale_triton_backend_launches_no_row_bound_kernel(m, monkeypatch):
    """Triton: the codes of the bound op's Triton path (same GEMM, same scales), without its row-bound kernel."""
    from turbocompile.kernels.w8a8 import triton_bound

    dev = kernel_device()
    ops, wb = _gemm_args("fp8", m=m, dev=dev)
    q_b, s_b = W.w8a8_linear_gelu_quant(*ops, "fp8", "per_token", "per_channel", torch.bfloat16, "fp8", "triton",
                                        "bound", wb)

    def no_row_bound(*a, **k):
        raise AssertionError("row_bound_scale_triton launched although row_scale was given")

    monkeypatch.setattr(triton_bound, "row_bound_scale_triton", no_row_bound)
    q = W.w8a8_linear_gelu_quant_rowscale(*ops, "fp8", row_scale=s_b.clone(), backend="triton")
    assert torch.equal(q.float(), q_b.float())
    q_t = W.w8a8_linear_gelu_quant_rowscale(*(t.cpu() for t in ops), "fp8", row_scale=s_b.cpu(), backend="torch")
    # the Triton GEMM applies GELU to the fp32 accumulator (h one bf16 rounding off): codes within one step
    assert (q.cpu().float() - q_t.float()).abs().le(q_t.float().abs() * 2.0**-3 + 2.0**-9).all()


def _rowscale(ops, fmt="fp8", act="per_token", **kw):
    return W.w8a8_linear_gelu_quant_rowscale(*ops, fmt, act, "per_channel", torch.bfloat16, backend="torch", **kw)


@pytest.mark.parametrize("bad,match", [
    (lambda m: torch.ones(m), r"row_scale must be \[M, 1\] = \[10, 1\] float32 \(one power-of-two scale per row\), "
                              r"got torch.float32 \[10\]"),
    (lambda m: torch.ones(m, 2), r"row_scale must be \[M, 1\] = \[10, 1\]"),
    (lambda m: torch.ones(m + 1, 1), r"row_scale must be \[M, 1\] = \[10, 1\]"),
    (lambda m: torch.ones(m, 1, dtype=torch.float64), r"row_scale must be .* got torch.float64"),
    (lambda m: torch.ones(m, 1, device="meta"), "row_scale is on meta, qx on cpu; both must share one device"),
])
def test_rowscale_errors_are_one_line(bad, match):
    ops, _ = _gemm_args()
    with pytest.raises(ValueError, match=match) as err:
        _rowscale(ops, row_scale=bad(B * L))
    assert "\n" not in str(err.value)


def test_rowscale_refuses_block128_activations_and_unknown_formats():
    ops, _ = _gemm_args()
    qb, sb = wref.quantize_ref(torch.randn(B * L, D), "fp8", "block128")
    with pytest.raises(ValueError, match="activation granularity 'block128' is not supported; valid choices: "
                                         "per_token"):
        _rowscale([qb, sb, *ops[2:]], act="block128", row_scale=torch.ones(B * L, 1))
    with pytest.raises(ValueError, match="unknown format 'int4'; valid choices: int8, fp8"):
        _rowscale(ops, fmt="int4", row_scale=torch.ones(B * L, 1))
    with pytest.raises(TypeError):  # row_scale is required (keyword-only in the Python wrapper)
        _rowscale(ops)
