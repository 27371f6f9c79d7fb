"""Ops turbocompile::w8a8_linear_gelu / w8a8_linear_gelu_quant: dispatch, exactness vs the unfused ops,
fake kernels (opcheck), error messages."""

from __future__ import annotations

import pytest
import torch

from tests._env import kernel_device, triton_runs_here
from turbocompile.errors import KernelUnavailableError
from turbocompile.ops import w8a8 as W


def _operands(m=19, k=200, n=150, fmt="int8", ag="per_token", wg="per_channel", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2).to(torch.bfloat16)
    qw, sw = W.quantize_weight(torch.randn(n, k, generator=g) * 0.1, fmt, wg)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    qx, sx = W.quantize_activation(x, fmt, ag, "torch")
    return qx, sx, qw, sw, b


def _on(backend, *tensors):
    """The tensors where ``backend`` runs them: 'triton' on kernel_device() (CUDA when present; on CPU it
    runs only in the interpreter), 'torch' on CPU. None stays None."""
    dev = kernel_device() if backend == "triton" else "cpu"
    return tuple(t if t is None else t.to(dev) for t in tensors)


@pytest.mark.parametrize("fmt,ag,wg", [("int8", "per_token", "per_channel"), ("fp8", "per_token", "per_channel"),
                                       ("int8", "block128", "block128")])
def test_torch_backend_is_the_unfused_chain_bit_for_bit(fmt, ag, wg):
    qx, sx, qw, sw, b = _operands(fmt=fmt, ag=ag, wg=wg)
    y = W.w8a8_linear_prequant(qx, sx, qw, sw, b, fmt, ag, wg, torch.bfloat16, "torch")
    h = torch.nn.functional.gelu(y, approximate="tanh")
    got = W.w8a8_linear_gelu(qx, sx, qw, sw, b, fmt, ag, wg, torch.bfloat16, "torch")
    assert torch.equal(got, h)
    q_ref, s_ref = W.quantize_activation(h, fmt, "per_token", "torch")
    q, s = W.w8a8_linear_gelu_quant(qx, sx, qw, sw, b, fmt, ag, wg, torch.bfloat16, fmt, "torch")
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_triton_backend_within_bf16_rounding_of_unfused():
    from tests._env import kernel_device

    dev = kernel_device()
    qx, sx, qw, sw, b = (t.to(dev) for t in _operands(m=40, k=256, n=260))
    h_ref = W.w8a8_linear_gelu(qx.cpu(), sx.cpu(), qw.cpu(), sw.cpu(), b.cpu(), "int8", "per_token",
                               "per_channel", torch.bfloat16, "torch").float()
    h = W.w8a8_linear_gelu(qx, sx, qw, sw, b, "int8", "per_token", "per_channel", torch.bfloat16, "triton")
    assert ((h.cpu().float() - h_ref).norm() / h_ref.norm()).item() < 5e-3
    q, s = W.w8a8_linear_gelu_quant(qx, sx, qw, sw, b, "int8", "per_token", "per_channel", torch.bfloat16, "int8",
                                    "triton")
    deq = q.cpu().float() * s.cpu()
    assert ((deq - h_ref).norm() / h_ref.norm()).item() < 2e-2  # int8 per-token quantization noise


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if triton_runs_here() else []))
def test_opcheck(backend):
    qx, sx, qw, sw, b = _on(backend, *_operands(m=7, k=130, n=129))
    torch.library.opcheck(torch.ops.turbocompile.w8a8_linear_gelu.default,
                          (qx, sx, qw, sw, b, "int8", "per_token", "per_channel", torch.bfloat16, backend))
    torch.library.opcheck(torch.ops.turbocompile.w8a8_linear_gelu_quant.default,
                          (qx, sx, qw, sw, None, "int8", "per_token", "per_channel", torch.float32, "fp8", backend))


def test_errors_are_one_line_and_name_the_problem():
    qx, sx, qw, sw, b = _operands()
    with pytest.raises(ValueError, match="output format 'int4'"):
        W.w8a8_linear_gelu_quant(qx, sx, qw, sw, b, "int8", "per_token", "per_channel", torch.bfloat16, "int4")
    with pytest.raises(ValueError, match="K mismatch"):
        W.w8a8_linear_gelu(qx[:, :128], sx, qw, sw, b, "int8", "per_token", "per_channel", torch.bfloat16)
    with pytest.raises(ValueError, match="bias must have shape"):
        W.w8a8_linear_gelu(qx, sx, qw, sw, b[:3], "int8", "per_token", "per_channel", torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype"):
        W.w8a8_linear_gelu(qx, sx, qw, sw, b, "int8", "per_token", "per_channel", torch.int8)
    with pytest.raises(KernelUnavailableError, match="unknown backend"):
        W.w8a8_linear_gelu(qx, sx, qw, sw, b, "int8", "per_token", "per_channel", torch.bfloat16, "cuda")


# --------------------------------------------------------------- out_scale="pow2" (FP8 output only)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_pow2_torch_backend_is_gelu_then_pow2_quantization(fmt):
    from turbocompile.kernels.w8a8 import ref

    qx, sx, qw, sw, b = _operands(fmt=fmt)
    h = W.w8a8_linear_gelu(qx, sx, qw, sw, b, fmt, "per_token", "per_channel", torch.bfloat16, "torch")
    q, s = W.w8a8_linear_gelu_quant(qx, sx, qw, sw, b, fmt, "per_token", "per_channel", torch.bfloat16, "fp8",
                                    "torch", out_scale="pow2")
    q_ref, s_ref = ref.quantize_pow2_ref(h)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert torch.all(torch.frexp(s)[0] == 0.5)  # powers of two
    # the default stays the amax scale
    q_a, s_a = W.w8a8_linear_gelu_quant(qx, sx, qw, sw, b, fmt, "per_token", "per_channel", torch.bfloat16, "fp8",
                                        "torch")
    assert torch.equal(s_a, W.quantize_activation(h, "fp8", "per_token", "torch")[1])


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_pow2_triton_backend_scales_equal_the_torch_backend():
    from tests._env import kernel_device
    from turbocompile.kernels.w8a8 import ref

    dev = kernel_device()
    qx, sx, qw, sw, b = (t.to(dev) for t in _operands(m=40, k=256, n=272, fmt="fp8"))
    args = (qx, sx, qw, sw, b, "fp8", "per_token", "per_channel", torch.bfloat16, "fp8")
    q, s = W.w8a8_linear_gelu_quant(*args, "triton", out_scale="pow2")
    h = W.w8a8_linear_gelu(*args[:-1], "triton")  # the same (bf16-rounded) h
    q_ref, s_ref = ref.quantize_pow2_ref(h.cpu())
    assert torch.equal(s.cpu(), s_ref)
    diff = q.cpu().float() != q_ref.float()
    assert torch.all(q_ref.float()[diff].abs() < 2.0 ** -6)  # only subnormal codes may differ (GPU route)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if triton_runs_here() else []))
def test_pow2_opcheck(backend):
    # INT8 inputs (opcheck's schema test cannot multiply FP8 input tensors on CPU); the FP8 output is the point
    qx, sx, qw, sw, _ = _on(backend, *_operands(m=7, k=130, n=129))
    torch.library.opcheck(torch.ops.turbocompile.w8a8_linear_gelu_quant.default,
                          (qx, sx, qw, sw, None, "int8", "per_token", "per_channel", torch.bfloat16, "fp8", backend,
                           "pow2"))


def test_pow2_errors_are_one_line_and_name_the_choices():
    qx, sx, qw, sw, b = _operands()
    args = (qx, sx, qw, sw, b, "int8", "per_token", "per_channel", torch.bfloat16)
    with pytest.raises(ValueError, match=r"output scale 'pow2' needs output format 'fp8', got 'int8'; "
                                         r"valid output scales for 'int8': amax$"):
        W.w8a8_linear_gelu_quant(*args, "int8", "torch", out_scale="pow2")
    with pytest.raises(ValueError, match=r"unknown output scale 'log2'; valid choices: amax, pow2, bound$"):
        W.w8a8_linear_gelu_quant(*args, "fp8", "torch", out_scale="log2")
    # the fake kernel (tracing) validates the same way
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (qx, sx, qw, sw)]
        q, s = torch.ops.turbocompile.w8a8_linear_gelu_quant(*fake, None, "int8", "per_token", "per_channel",
                                                              torch.bfloat16, "fp8", "torch", "pow2")
        assert q.dtype == torch.float8_e4m3fn and s.shape == (qx.shape[0], 1)
        with pytest.raises(ValueError, match="output scale 'pow2' needs output format 'fp8'"):
            torch.ops.turbocompile.w8a8_linear_gelu_quant(*fake, None, "int8", "per_token", "per_channel",
                                                          torch.bfloat16, "int8", "torch", "pow2")


# ------------------------------------------------------------------ out_scale="bound"


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_bound_torch_backend_is_gelu_then_quantization_at_the_bound_scale(fmt):
    from turbocompile.kernels.w8a8 import ref

    qx, sx, qw, sw, b = _operands(fmt=fmt)
    h = W.w8a8_linear_gelu(qx, sx, qw, sw, b, fmt, "per_token", "per_channel", torch.bfloat16, "torch")
    wb = ref.gelu_bound_constants_ref(qw, sw, b, "per_channel")
    q, s = W.w8a8_linear_gelu_quant(qx, sx, qw, sw, b, fmt, "per_token", "per_channel", torch.bfloat16, "fp8",
                                    "torch", out_scale="bound", wbound=wb)
    assert torch.equal(s, ref.row_bound_scale_ref(qx, sx, wb))
    assert torch.equal(q.float(), ref.quantize_at_scale_ref(h, s).float())
    assert (h.float().abs().amax(1, keepdim=True) <= 448 * s).all()  # no code clips
    # without wbound the op derives the same constants from the weight
    q2, s2 = W.w8a8_linear_gelu_quant(qx, sx, qw, sw, b, fmt, "per_token", "per_channel", torch.bfloat16, "fp8",
                                      "torch", out_scale="bound")
    assert torch.equal(s2, s) and torch.equal(q2.float(), q.float())


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_bound_triton_backend_matches_the_torch_backend():
    from tests._env import kernel_device
    from turbocompile.kernels.w8a8 import ref

    dev = kernel_device()
    qx, sx, qw, sw, b = (t.to(dev) for t in _operands(m=40, k=256, n=272, fmt="fp8"))
    wb = ref.gelu_bound_constants_ref(qw.cpu(), sw.cpu(), b.cpu(), "per_channel").to(dev)
    args = (qx, sx, qw, sw, b, "fp8", "per_token", "per_channel", torch.bfloat16, "fp8")
    q, s = W.w8a8_linear_gelu_quant(*args, "triton", out_scale="bound", wbound=wb)
    q_t, s_t = W.w8a8_linear_gelu_quant(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in args), "torch",
                                        out_scale="bound", wbound=wb.cpu())
    assert torch.equal(s.cpu(), s_t)
    h = W.w8a8_linear_gelu(*args[:-1], "triton")  # the Triton h differs from the torch one by bf16 rounding
    assert torch.equal(q.cpu().float(), ref.quantize_at_scale_ref(h.cpu(), s.cpu()).float())
    rel = (q.cpu().float() - q_t.float()).norm() / q_t.float().norm()
    assert rel < 0.02


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if triton_runs_here() else []))
def test_bound_opcheck(backend):
    from turbocompile.kernels.w8a8 import ref

    qx, sx, qw, sw, _ = _operands(m=7, k=130, n=129)
    wb = ref.gelu_bound_constants_ref(qw, sw, None, "per_channel")
    qx, sx, qw, sw, wb = _on(backend, qx, sx, qw, sw, wb)
    torch.library.opcheck(torch.ops.turbocompile.w8a8_linear_gelu_quant.default,
                          (qx, sx, qw, sw, None, "int8", "per_token", "per_channel", torch.bfloat16, "fp8", backend,
                           "bound", wb))


def test_bound_errors_are_one_line_and_name_the_choices():
    qx, sx, qw, sw, b = _operands(fmt="int8")
    args = (qx, sx, qw, sw, b, "int8", "per_token", "per_channel", torch.bfloat16)
    with pytest.raises(ValueError, match=r"output scale 'bound' needs output format 'fp8', got 'int8'; "
                                         r"valid output scales for 'int8': amax$"):
        W.w8a8_linear_gelu_quant(*args, "int8", "torch", out_scale="bound")
    qb, sb, qwb, swb, bb = _operands(ag="block128", wg="block128")
    with pytest.raises(ValueError, match=r"output scale 'bound' needs per_token activations, got 'block128'; "
                                         r"valid output scales for 'block128': amax, pow2$"):
        W.w8a8_linear_gelu_quant(qb, sb, qwb, swb, bb, "int8", "block128", "block128", torch.bfloat16, "fp8", "torch",
                                 out_scale="bound")
    with pytest.raises(ValueError, match=r"wbound is the \[2\] fp32 \[C, b\] of output scale 'bound'"):
        W.w8a8_linear_gelu_quant(*args, "fp8", "torch", out_scale="pow2", wbound=torch.zeros(2))
    with pytest.raises(ValueError, match=r"wbound is the \[2\] fp32"):
        W.w8a8_linear_gelu_quant(*args, "fp8", "torch", out_scale="bound", wbound=torch.zeros(3))
    with pytest.raises(ValueError, match=r"wbound is on meta, qx on cpu; both must share one device"):
        W.w8a8_linear_gelu_quant(*args, "fp8", "torch", out_scale="bound", wbound=torch.zeros(2, device="meta"))


# ------------------------------------------------- w8a8_linear_prequant_sumsq (q GEMM + RMSNorm statistic)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_sumsq_torch_backend_is_prequant_then_granule_sums(fmt, out_dtype):
    from turbocompile.kernels.w8a8 import ref

    qx, sx, qw, sw, b = _operands(m=21, k=200, n=300, fmt=fmt)
    args = (qx, sx, qw, sw, b, fmt, "per_token", "per_channel", out_dtype)
    y, ss = W.w8a8_linear_prequant_sumsq(*args, "torch")
    assert torch.equal(y, W.w8a8_linear_prequant(*args, "torch"))
    assert ss.shape == (21, 3) and ss.dtype == torch.float32
    assert torch.equal(ss, ref.granule_sumsq_ref(y))
    # granule 2 holds columns 256..299 only; the granules add up to the row's sum of squares
    assert torch.allclose(ss[:, 2], y[:, 256:].float().square().sum(-1), rtol=1e-6)
    assert torch.allclose(ss.sum(-1), y.float().square().sum(-1), rtol=1e-5)


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("m,k,n", [(1, 128, 136), (40, 256, 392), (9, 200, 100)])  # TMA shapes and a fallback one
def test_sumsq_triton_backend_matches_the_torch_backend(fmt, m, k, n):
    from turbocompile.kernels.w8a8 import ref

    qx, sx, qw, sw, b = _operands(m=m, k=k, n=n, fmt=fmt, seed=3)
    args = (fmt, "per_token", "per_channel", torch.bfloat16)
    y_t, ss_t = W.w8a8_linear_prequant_sumsq(qx, sx, qw, sw, b, *args, "torch")
    y, ss = W.w8a8_linear_prequant_sumsq(*_on("triton", qx, sx, qw, sw, b), *args, "triton")
    assert y.shape == y_t.shape and ss.shape == ss_t.shape and ss.dtype == torch.float32
    assert ((y.cpu().float() - y_t.float()).norm() / y_t.float().norm()).item() < 5e-3  # one bf16 rounding
    # the sums are those of the y this backend stored (fp32 summation order apart) ...
    assert torch.allclose(ss.cpu(), ref.granule_sumsq_ref(y.cpu()), rtol=1e-5, atol=0)
    # ... and within the bf16 rounding of y of the torch backend's
    assert torch.allclose(ss.cpu(), ss_t, rtol=2e-2)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if triton_runs_here() else []))
def test_sumsq_opcheck(backend):
    # INT8 inputs: opcheck's schema test cannot multiply FP8 input tensors on CPU
    qx, sx, qw, sw, b = _on(backend, *_operands(m=7, k=128, n=136))
    torch.library.opcheck(torch.ops.turbocompile.w8a8_linear_prequant_sumsq.default,
                          (qx, sx, qw, sw, b, "int8", "per_token", "per_channel", torch.bfloat16, backend))


def test_sumsq_fake_shapes():
    qx, sx, qw, sw, b = (t.to("meta") for t in _operands(m=5, k=200, n=257, fmt="fp8"))
    y, ss = W.w8a8_linear_prequant_sumsq(qx, sx, qw, sw, b, "fp8", "per_token", "per_channel", torch.float16)
    assert y.shape == (5, 257) and y.dtype == torch.float16 and y.device.type == "meta"
    assert ss.shape == (5, 3) and ss.dtype == torch.float32


def test_sumsq_errors_are_one_line_and_name_the_choices():
    qx, sx, qw, sw, b = _operands()
    with pytest.raises(ValueError, match=r"activation granularity 'block128' is not supported; valid choices: "
                                         r"per_token$") as err:
        qb, sb, _, _, _ = _operands(ag="block128")
        W.w8a8_linear_prequant_sumsq(qb, sb, qw, sw, b, "int8", "block128", "per_channel", torch.bfloat16, "torch")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"weight granularity 'block128' is not supported; valid choices: "
                                         r"per_channel$"):
        _, _, qwb, swb, _ = _operands(wg="block128")
        W.w8a8_linear_prequant_sumsq(qx, sx, qwb, swb, b, "int8", "per_token", "block128", torch.bfloat16, "torch")
    with pytest.raises(ValueError, match="unknown format 'int4'; valid choices: int8, fp8"):
        W.w8a8_linear_prequant_sumsq(qx, sx, qw, sw, b, "int4", "per_token", "per_channel", torch.bfloat16, "torch")
    with pytest.raises(ValueError, match="out_dtype must be one of bf16/fp16/fp32"):
        W.w8a8_linear_prequant_sumsq(qx, sx, qw, sw, b, "int8", "per_token", "per_channel", torch.int32, "torch")
    with pytest.raises(ValueError, match="K mismatch"):
        W.w8a8_linear_prequant_sumsq(qx[:, :128], sx, qw, sw, b, "int8", "per_token", "per_channel", torch.bfloat16)
    with pytest.raises(KernelUnavailableError, match="unknown backend"):
        W.w8a8_linear_prequant_sumsq(qx, sx, qw, sw, b, "int8", "per_token", "per_channel", torch.bfloat16, "cuda")
