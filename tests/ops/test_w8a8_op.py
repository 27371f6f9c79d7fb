"""turbocompile::quantize_activation / w8a8_linear / w8a8_linear_prequant: dispatch, errors, fakes."""

from __future__ import annotations

import pytest
import torch

from tests._env import kernel_device, triton_runs_here
from turbocompile.errors import KernelUnavailableError
from turbocompile.kernels.w8a8 import ref
from turbocompile.ops import w8a8 as W

BACKENDS_HERE = ["torch", "auto"] + (["triton"] if triton_runs_here() else [])


def _dev(backend: str) -> str:
    """Where a backend's test tensors live: 'triton' on kernel_device() (CUDA when present; on CPU it runs
    only in the interpreter), the torch and auto backends on CPU."""
    return kernel_device() if backend == "triton" else "cpu"


def _weights(n=96, k=200, fmt="int8", wg="block128"):
    w = torch.randn(n, k) * 0.05
    return w, *W.quantize_weight(w, fmt, wg)


def test_ops_registered():
    for name in ("quantize_activation", "w8a8_linear", "w8a8_linear_prequant"):
        assert hasattr(torch.ops.turbocompile, name)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_w8a8_linear_3d_input_matches_reference(backend, fmt):
    w, qw, sw = _weights(fmt=fmt)
    bias = torch.randn(96, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 200, dtype=torch.bfloat16)
    dev = _dev(backend)
    y = W.w8a8_linear(x.to(dev), qw.to(dev), sw.to(dev), bias.to(dev), fmt, "block128", "block128", backend)
    assert y.shape == (2, 5, 96) and y.dtype == torch.bfloat16 and y.device.type == dev
    y = y.cpu()
    want = ref.w8a8_linear_ref(x.reshape(10, 200).float(), qw, sw, bias, fmt, "block128", "block128")
    rel = (y.reshape(10, 96).double() - want.double()).norm() / want.double().norm()
    assert rel < 8e-3
    y_float = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    assert (y.double() - y_float).norm() / y_float.norm() < (0.02 if fmt == "int8" else 0.06)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_prequant_equals_linear(backend):
    dev = _dev(backend)
    _, qw, sw = (t.to(dev) for t in _weights(wg="per_channel"))
    x = torch.randn(7, 200, dtype=torch.float16).to(dev)
    qx, sx = W.quantize_activation(x, "int8", "per_token", backend)
    assert qx.dtype == torch.int8 and sx.shape == (7, 1)
    y1 = W.w8a8_linear_prequant(qx, sx, qw, sw, None, "int8", "per_token", "per_channel", torch.float16, backend)
    y2 = W.w8a8_linear(x, qw, sw, None, "int8", "per_token", "per_channel", backend)
    assert y1.dtype == torch.float16 and torch.equal(y1, y2)


def test_quantize_weight_layout_and_errors():
    w = torch.randn(300, 200)
    q, s = W.quantize_weight(w, "fp8", "block128")
    assert q.shape == (300, 200) and q.dtype == torch.float8_e4m3fn and q.is_contiguous()
    assert s.shape == (3, 2) and s.dtype == torch.float32
    q, s = W.quantize_weight(w, "int8", "per_channel")
    assert s.shape == (300, 1)
    with pytest.raises(ValueError, match="weight granularity 'per_token'"):
        W.quantize_weight(w, "int8", "per_token")


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        ({"format": "int4"}, ValueError, r"unknown format 'int4'; valid choices: int8, fp8"),
        ({"act_granularity": "per_block"}, ValueError, r"unknown activation granularity 'per_block'"),
        ({"weight_granularity": "per_token"}, ValueError, r"unknown weight granularity 'per_token'"),
        ({"backend": "cuda"}, KernelUnavailableError, r"unknown backend 'cuda'; valid choices"),
    ],
)
def test_dispatch_errors(kwargs, exc, msg):
    _, qw, sw = _weights()
    args = dict(format="int8", act_granularity="block128", weight_granularity="block128", backend="torch")
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        W.w8a8_linear(torch.randn(4, 200), qw, sw, None, **args)


def test_shape_and_dtype_errors():
    _, qw, sw = _weights()
    with pytest.raises(ValueError, match="K mismatch"):
        W.w8a8_linear(torch.randn(4, 128), qw, sw, None, "int8", "block128", "block128", "torch")
    with pytest.raises(ValueError, match="must be torch.float8_e4m3fn for format 'fp8'"):
        W.w8a8_linear(torch.randn(4, 200), qw, sw, None, "fp8", "block128", "block128", "torch")
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(96, 1\)"):
        W.w8a8_linear(torch.randn(4, 200), qw, sw, None, "int8", "block128", "per_channel", "torch")
    with pytest.raises(ValueError, match=r"bias must have shape \(96,\)"):
        W.w8a8_linear(torch.randn(4, 200), qw, sw, torch.zeros(5), "int8", "block128", "block128", "torch")
    with pytest.raises(ValueError, match="x must be 2-D"):
        W.quantize_activation(torch.randn(2, 3, 4), "int8", "per_token", "torch")
    with pytest.raises(ValueError, match="out_dtype"):
        qx, sx = W.quantize_activation(torch.randn(4, 200), "int8", "per_token", "torch")
        W.w8a8_linear_prequant(qx, sx, qw, sw, None, "int8", "per_token", "block128", torch.int32, "torch")


@pytest.mark.skipif(triton_runs_here(), reason="checks the error when Triton cannot run on CPU")
def test_triton_on_cpu_without_interpreter_is_an_error():
    _, qw, sw = _weights()
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"):
        W.w8a8_linear(torch.randn(4, 200), qw, sw, None, "int8", "block128", "block128", "triton")


def test_fake_kernels_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, qw, sw = _weights(n=96, k=200, fmt="fp8")
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(3, 130, 200, dtype=torch.bfloat16)
        y = torch.ops.turbocompile.w8a8_linear(x, qw, sw, None, "fp8", "block128", "block128", "auto")
        assert y.shape == (3, 130, 96) and y.dtype == torch.bfloat16
        q, s = torch.ops.turbocompile.quantize_activation(x[0], "fp8", "block128", "auto")
        assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 2)
        y2 = torch.ops.turbocompile.w8a8_linear_prequant(q, s, qw, sw, None, "fp8", "block128", "block128",
                                                         torch.float32, "auto")
        assert y2.shape == (130, 96) and y2.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_opcheck(backend):
    dev = _dev(backend)
    _, qw, sw = (t.to(dev) for t in _weights(n=96, k=200, fmt="int8", wg="block128"))
    x = torch.randn(7, 200, dtype=torch.bfloat16).to(dev)
    bias = torch.randn(96, dtype=torch.bfloat16).to(dev)
    torch.library.opcheck(torch.ops.turbocompile.quantize_activation.default, (x, "int8", "block128", backend))
    torch.library.opcheck(torch.ops.turbocompile.w8a8_linear.default,
                          (x, qw, sw, bias, "int8", "block128", "block128", backend))
    qx, sx = W.quantize_activation(x, "int8", "block128", "torch")
    torch.library.opcheck(torch.ops.turbocompile.w8a8_linear_prequant.default,
                          (qx, sx, qw, sw, None, "int8", "block128", "block128", torch.float32, backend))
