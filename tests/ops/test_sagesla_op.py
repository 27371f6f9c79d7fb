"""torch.ops.turbocompile.sagesla: registration, dispatch, fake kernel, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests._env import has_cuda, triton_runs_here
from turbocompile.errors import KernelUnavailableError
from turbocompile.ops.attention import sagesla


def _qkv(L=40, D=64, dtype=torch.bfloat16):
    return [torch.randn(1, L, 2, D).to(dtype) for _ in range(3)]


def test_op_registered_and_wrapper_defaults():
    q, k, v = _qkv()
    a = torch.ops.turbocompile.sagesla(q, k, v, 0.5, None, None, 64, 128, "int8-fp8", "torch")
    b = sagesla(q, k, v, topk=0.5, backend="torch")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_opcheck():
    q, k, v = _qkv(L=70)
    w, bias = torch.randn(64, 64) * 0.1, torch.randn(64)
    torch.library.opcheck(torch.ops.turbocompile.sagesla.default,
                          (q, k, v, 0.5, w, bias, 32, 32, "int8-fp8", "torch"))
    torch.library.opcheck(torch.ops.turbocompile.sagesla.default,
                          (q, k, v, 1.0, None, None, 64, 128, "none", "torch"))


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 1000, 12, 128, dtype=torch.float16)
        out = torch.ops.turbocompile.sagesla(q, q, q, 0.1, None, None, 64, 128, "int8-fp8", "auto")
    assert out.shape == (2, 1000, 12, 128) and out.dtype == torch.float16


def test_auto_on_cpu_is_reference():
    q, k, v = _qkv()
    torch.testing.assert_close(sagesla(q, k, v, topk=0.5, backend="auto"),
                               sagesla(q, k, v, topk=0.5, backend="torch"), atol=0, rtol=0)


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
def test_triton_backend_dispatch():
    q, k, v = _qkv(L=20)
    if has_cuda():
        q, k, v = (t.cuda() for t in (q, k, v))
    out = sagesla(q, k, v, topk=1.0, backend="triton")
    ref = sagesla(q, k, v, topk=1.0, backend="torch")
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 0.02


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv(L=8)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"):
        sagesla(q, k, v, topk=1.0, backend="triton")


def test_density():
    q, k, v = _qkv(L=1000)  # Kb = 8 with block_k 128
    assert sagesla(q, k, v, topk=0.5, backend="torch", return_density=True)[1] == 0.5
    assert sagesla(q, k, v, topk=0.01, backend="torch", return_density=True)[1] == 1 / 8
    assert sagesla(q, k, v, topk=1.0, backend="torch", return_density=True)[1] == 1.0


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(quant="int4"), ValueError, "valid choices: int8-fp8, int8-fp16, none"),
    (dict(backend="cuda"), KernelUnavailableError, "valid choices: auto, triton, torch"),
    (dict(topk=0.0), ValueError, "0 < topk <= 1"),
    (dict(topk=1.5), ValueError, "0 < topk <= 1"),
    (dict(block_q=48), ValueError, "block_q=48 unsupported; valid choices"),
    (dict(block_k=512), ValueError, "block_k=512 unsupported"),
    (dict(proj_weight=torch.zeros(64, 32)), ValueError, r"proj_weight must be \[D, D\]"),
    (dict(proj_bias=torch.zeros(3)), ValueError, r"proj_bias must be \[D\]"),
])
def test_argument_errors(kwargs, exc, pattern):
    q, k, v = _qkv()
    kw = dict(topk=0.5, backend="torch") | kwargs
    with pytest.raises(exc, match=pattern) as ei:
        sagesla(q, k, v, **kw)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("make,pattern", [
    (lambda: _qkv(D=96), "D=96 unsupported; valid choices: 64, 128"),
    (lambda: _qkv(dtype=torch.float32), "bfloat16, float16"),
    (lambda: _qkv()[:2] + [torch.randn(1, 41, 2, 64).bfloat16()], "same shape"),
    (lambda: [torch.randn(40, 2, 64).bfloat16()] * 3, r"\[B, L, H, D\]"),
])
def test_input_errors(make, pattern):
    q, k, v = make()
    with pytest.raises(ValueError, match=pattern):
        sagesla(q, k, v, topk=0.5, backend="torch")


def test_import_does_not_import_triton():
    code = "import sys, turbocompile.ops.attention; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- precomputed block statistics
def _stats(BH=2, Qb=1, Kb=1, NC=3, D=64):
    """q_pool / k_blocksum / v_absmax shapes for _qkv() (L=40: one query block of 64, one key block of 128)."""
    return dict(q_pool=torch.randn(BH, Qb, D), k_blocksum=torch.randn(BH, Kb, D), v_absmax=torch.rand(BH, NC, D))


def test_precomputed_stats_schema_defaults_and_fake():
    schema = str(torch.ops.turbocompile.sagesla.default._schema)
    assert schema.endswith("Tensor? q_pool=None, Tensor? k_blocksum=None, Tensor? v_absmax=None) -> Tensor")
    q, k, v = _qkv()
    s = _stats()
    # the torch backend validates, then recomputes them from q, k, v
    torch.testing.assert_close(sagesla(q, k, v, topk=0.5, backend="torch", **s),
                               sagesla(q, k, v, topk=0.5, backend="torch"), atol=0, rtol=0)
    torch.library.opcheck(torch.ops.turbocompile.sagesla.default,
                          (q, k, v, 0.5, None, None, 64, 128, "int8-fp8", "torch", s["q_pool"], s["k_blocksum"],
                           s["v_absmax"]))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 1000, 12, 128, dtype=torch.bfloat16)
        out = torch.ops.turbocompile.sagesla(q, q, q, 0.1, None, None, 64, 128, "int8-fp8", "auto",
                                             torch.empty(24, 16, 128), torch.empty(24, 8, 128), torch.empty(24, 8, 128))
    assert out.shape == (2, 1000, 12, 128)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(q_pool=None), r"q_pool is required .* topk=0.5 keeps 1 of 2 key blocks"),
    (dict(k_blocksum=None), "k_blocksum and v_absmax together"),
    (dict(q_pool=None, k_blocksum=None), "got q_pool None, k_blocksum None, v_absmax given"),
    (dict(q_pool=torch.randn(2, 1, 64)), r"q_pool must be \[B\*H, ceil\(L/block_q\), D\] = \[2, 3, 64\]"),
    (dict(k_blocksum=torch.randn(2, 1, 64)), r"k_blocksum must be \[B\*H, ceil\(L/block_k\), D\] = \[2, 2, 64\]"),
    (dict(v_absmax=torch.rand(2, 0, 64)), r"v_absmax must be \[B\*H, NC, D\] = \[2, NC >= 1, 64\]"),
    (dict(v_absmax=torch.rand(4, 2, 64)), r"v_absmax must be"),
    (dict(k_blocksum=torch.randn(2, 2, 64).double()), "k_blocksum must be float32"),
    (dict(q_pool=torch.randn(2, 3, 64, device="meta")), "q_pool is on meta"),
])
def test_precomputed_stats_errors(kwargs, pattern):
    """L=130 with block_q 64, block_k 128: 3 query blocks, 2 key blocks."""
    q, k, v = _qkv(L=130)
    s = _stats(Qb=3, Kb=2) | kwargs
    with pytest.raises(ValueError, match=pattern) as ei:
        sagesla(q, k, v, topk=0.5, backend="torch", **s)
    assert "\n" not in str(ei.value)


def test_precomputed_stats_dense_may_omit_q_pool():
    q, k, v = _qkv(L=130)
    s = _stats(Qb=3, Kb=2) | dict(q_pool=None)
    torch.testing.assert_close(sagesla(q, k, v, topk=1.0, backend="torch", **s),
                               sagesla(q, k, v, topk=1.0, backend="torch"), atol=0, rtol=0)
