"""Op turbocompile::w8a8_linear_residual: exactness vs the unfused ops it replaces (w8a8_linear_prequant, then the
residual step of residual_ln_modulate(_quant)), the Triton backend, fake kernel (opcheck), error messages."""

from __future__ import annotations

import pytest
import torch

from tests._env import kernel_device, triton_runs_here
from turbocompile.errors import KernelUnavailableError
from turbocompile.ops import norms as NO
from turbocompile.ops import w8a8 as W

BF16 = torch.bfloat16


def _operands(b=2, seq=21, k=200, n=136, fmt="int8", ag="per_token", wg="per_channel", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(b * seq, k, generator=g) * 2).to(BF16)
    qw, sw = W.quantize_weight(torch.randn(n, k, generator=g) * 0.1, fmt, wg)
    bias = torch.randn(n, generator=g).to(BF16)
    qx, sx = W.quantize_activation(h, fmt, ag, "torch")
    x = (torch.randn(b, seq, n, generator=g) * 3).to(BF16)
    gate = torch.randn(b, 6, n, generator=g)[:, 2:3]  # AdaLN's fp32 [B, 1, N] gate, a strided slice
    return qx, sx, qw, sw, bias, x, gate


@pytest.mark.parametrize("fmt,ag,wg", [("int8", "per_token", "per_channel"), ("fp8", "per_token", "per_channel"),
                                       ("int8", "block128", "block128")])
@pytest.mark.parametrize("gated", [True, False])
def test_torch_backend_is_the_unfused_chain_bit_for_bit(fmt, ag, wg, gated):
    qx, sx, qw, sw, bias, x, gate = _operands(fmt=fmt, ag=ag, wg=wg)
    gate = gate if gated else None
    y = W.w8a8_linear_prequant(qx, sx, qw, sw, bias, fmt, ag, wg, BF16, "torch").reshape(x.shape)
    x_ref, _, _ = NO.residual_ln_modulate_quant(x, y, gate, format=fmt, backend="torch")
    x_ref2, _ = NO.residual_ln_modulate(x, y, gate, backend="torch")
    got = W.w8a8_linear_residual(qx, sx, qw, sw, bias, fmt, ag, wg, residual=x, gate=gate, backend="torch")
    assert got.shape == x.shape and got.dtype == BF16
    assert torch.equal(got.view(torch.int16), x_ref.view(torch.int16))
    assert torch.equal(x_ref, x_ref2)


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_triton_backend_matches_torch_within_one_rounding_of_y(fmt):
    """The Triton GEMM sums in fp32 (the reference in float64), so y may differ by one bf16 ulp now and then;
    x_new then differs by at most the rounding of that ulp through the residual steps."""
    from tests._env import kernel_device

    dev = kernel_device()
    qx, sx, qw, sw, bias, x, gate = _operands(fmt=fmt)
    want = W.w8a8_linear_residual(qx, sx, qw, sw, bias, fmt, residual=x, gate=gate, backend="torch")
    got = W.w8a8_linear_residual(*(t.to(dev) for t in (qx, sx, qw, sw, bias)), fmt, residual=x.to(dev),
                                 gate=gate.to(dev), backend="triton").cpu()
    y = W.w8a8_linear_prequant(qx, sx, qw, sw, bias, fmt, "per_token", "per_channel", torch.float32, "torch")
    y = y.reshape(x.shape)
    tol = (y.abs() * gate.abs() * 2 ** -7 + x.float().abs() * 2 ** -8).amax()  # an ulp of t and of x_new
    assert (got.float() - want.float()).abs().max() <= tol
    assert (got != want).float().mean() < 0.05


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if triton_runs_here() else []))
def test_opcheck(backend):
    dev = kernel_device() if backend == "triton" else "cpu"  # 'triton' on CPU runs only in the interpreter
    qx, sx, qw, sw, bias, x, gate = (t.to(dev) for t in _operands(b=1, seq=7, k=130, n=72))
    torch.library.opcheck(torch.ops.turbocompile.w8a8_linear_residual.default,
                          (qx, sx, qw, sw, bias, "int8", "per_token", "per_channel", x, gate, backend))
    torch.library.opcheck(torch.ops.turbocompile.w8a8_linear_residual.default,
                          (qx, sx, qw, sw, None, "int8", "per_token", "per_channel", x.reshape(7, 72).float(), None,
                           backend))


def test_errors_are_one_line_and_name_the_problem():
    qx, sx, qw, sw, bias, x, gate = _operands()

    def call(**kw):
        args = dict(qx=qx, xscale=sx, qweight=qw, wscale=sw, bias=bias, format="int8", residual=x, gate=gate)
        args.update(kw)
        return W.w8a8_linear_residual(**args)

    for kw, match in [
        (dict(residual=x[:, :5]), r"residual must be \[M=42, N=136\] or \[B, L, N=136\] with B\*L = M"),
        (dict(residual=x[..., :8]), r"residual must be \[M=42, N=136\]"),
        (dict(residual=x.to(torch.int32)), "residual must be bf16/fp16/fp32"),
        (dict(gate=gate[..., :7]), r"gate of shape \(2, 1, 7\) does not broadcast to residual"),
        (dict(gate=gate.to(torch.int32)), "gate must be a float tensor"),
        (dict(format="int4"), "unknown format 'int4'; valid choices: int8, fp8"),
        (dict(qx=qx[:, :128]), "K mismatch"),
        (dict(bias=bias[:3]), "bias must have shape"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            call(**kw)
        assert "\n" not in str(err.value)
    with pytest.raises(KernelUnavailableError, match="unknown backend"):
        call(backend="cuda")
