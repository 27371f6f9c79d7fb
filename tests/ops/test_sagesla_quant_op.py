"""torch.ops.turbocompile.sagesla_quant: registration, schema, dispatch (torch = the reference, Triton in the
interpreter), fake kernel, errors naming the op, precomputed block statistics."""

from __future__ import annotations

import pytest
import torch

from tests._env import has_cuda, triton_runs_here
from turbocompile.errors import KernelUnavailableError
from turbocompile.kernels.sagesla import ref
from turbocompile.ops.attention import sagesla, sagesla_quant

OPS = torch.ops.turbocompile


def _qkv(B=1, L=40, H=2, D=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, D, generator=g).to(dtype) for _ in range(3)]


def test_schema_keeps_sagesla_arguments_and_returns_codes_and_scales():
    schema = str(OPS.sagesla_quant.default._schema)
    assert schema.startswith("turbocompile::sagesla_quant(Tensor q, Tensor k, Tensor v, float topk, Tensor? proj_w")
    assert schema.endswith("Tensor? q_pool=None, Tensor? k_blocksum=None, Tensor? v_absmax=None) -> (Tensor, Tensor)")
    # sagesla's own schema is unchanged (artifacts saved before this op keep loading)
    assert str(OPS.sagesla.default._schema).endswith("Tensor? v_absmax=None) -> Tensor")


def test_torch_backend_is_the_reference_and_auto_on_cpu():
    q, k, v = _qkv(B=2, L=70)
    w, b = torch.randn(64, 64) * 0.1, torch.randn(64) * 0.1
    codes, scales = sagesla_quant(q, k, v, topk=0.5, proj_weight=w, proj_bias=b, backend="torch")
    rc, rs = ref.sagesla_quant_ref(q, k, v, 0.5, w, b, 64, 128, "int8-fp8")
    assert codes.shape == (140, 128) and codes.dtype == torch.float8_e4m3fn and scales.shape == (140, 1)
    assert torch.equal(codes.view(torch.uint8), rc.view(torch.uint8)) and torch.equal(scales, rs)
    auto = sagesla_quant(q, k, v, topk=0.5, proj_weight=w, proj_bias=b)
    assert torch.equal(auto[0].view(torch.uint8), codes.view(torch.uint8)) and torch.equal(auto[1], scales)
    # the dequantized codes are the attention output (the same function as sagesla) within e4m3's precision
    out = sagesla(q, k, v, topk=0.5, proj_weight=w, proj_bias=b, backend="torch").reshape(140, 128).float()
    assert ((codes.float() * scales - out).norm() / out.norm()).item() < 0.04


def test_opcheck_and_fake():
    q, k, v = _qkv(L=70)
    w, b = torch.randn(64, 64) * 0.1, torch.randn(64)
    torch.library.opcheck(OPS.sagesla_quant.default, (q, k, v, 0.5, w, b, 32, 32, "int8-fp8", "torch"))
    torch.library.opcheck(OPS.sagesla_quant.default, (q, k, v, 1.0, None, None, 64, 128, "none", "torch"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 1000, 12, 128, dtype=torch.float16)
        codes, scales = OPS.sagesla_quant(q, q, q, 0.1, None, None, 64, 128, "int8-fp8", "auto",
                                          torch.empty(24, 16, 128), torch.empty(24, 8, 128), torch.empty(24, 8, 128))
    assert codes.shape == (2000, 1536) and codes.dtype == torch.float8_e4m3fn
    assert scales.shape == (2000, 1) and scales.dtype == torch.float32


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(quant="int4"), ValueError, "sagesla_quant: unknown quant 'int4'; valid choices: int8-fp8, int8-fp16, none"),
    (dict(backend="cuda"), KernelUnavailableError, "valid choices: auto, triton, torch"),
    (dict(topk=0.0), ValueError, "sagesla_quant: topk must satisfy 0 < topk <= 1"),
    (dict(topk="0.1"), ValueError, "sagesla_quant: topk must be a number"),
    (dict(block_q=48), ValueError, "sagesla_quant: block_q=48 unsupported; valid choices"),
    (dict(block_k=64.0), ValueError, "sagesla_quant: block_k must be an integer"),
    (dict(proj_weight=torch.zeros(64, 32)), ValueError, r"sagesla_quant: proj_weight must be \[D, D\]"),
    (dict(k_blocksum=torch.zeros(2, 1, 64)), ValueError, "sagesla_quant: precomputed pooling needs k_blocksum and "
                                                         "v_absmax together"),
])
def test_argument_errors_name_the_op(kwargs, exc, pattern):
    q, k, v = _qkv()
    kw = dict(topk=0.5, backend="torch") | kwargs
    with pytest.raises(exc, match=pattern) as ei:
        sagesla_quant(q, k, v, **kw)
    assert "\n" not in str(ei.value)


def test_input_errors():
    q, k, v = _qkv(D=96)
    with pytest.raises(ValueError, match="sagesla_quant: head dim D=96 unsupported; valid choices: 64, 128"):
        sagesla_quant(q, k, v, topk=0.5)
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(ValueError, match="sagesla_quant: q, k, v must share one dtype among bfloat16, float16"):
        OPS.sagesla_quant(q, k, v, 0.5, None, None, 64, 128, "int8-fp8", "torch")


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("topk,proj", [(0.5, True), (1.0, False)])
def test_triton_backend_with_and_without_precomputed_statistics(topk, proj):
    """The Triton path (interpreter on CPU) against the reference: the same scales, close dequantized codes; with
    the block statistics given (as fuse_attention_pooling feeds them) the same codes as without."""
    from turbocompile.kernels.norms.ref import pool_heads_ref

    B, L, H, D = 2, 200, 2, 64
    q, k, v = _qkv(B, L, H, D)
    v[1] *= 30
    w, b = (torch.randn(D, D) * 0.1, torch.randn(D) * 0.1) if proj else (None, None)
    dev = "cuda" if has_cuda() else "cpu"
    q, k, v = (t.to(dev) for t in (q, k, v))
    w, b = (t.to(dev) if t is not None else None for t in (w, b))
    kw = dict(topk=topk, proj_weight=w, proj_bias=b)
    tc, ts = sagesla_quant(q, k, v, backend="triton", **kw)
    rc, rs = sagesla_quant(q, k, v, backend="torch", **kw)
    torch.testing.assert_close(ts, rs, rtol=1e-6, atol=0)
    dq, dr = tc.float() * ts, rc.float() * rs
    assert ((dq - dr).norm() / dr.norm()).item() < 3e-2
    flat = [t.reshape(B, L, H * D) for t in (q, k, v)]
    stats = dict(q_pool=None if topk == 1.0 else pool_heads_ref(flat[0], H, 64, "mean"),
                 k_blocksum=pool_heads_ref(flat[1], H, 128, "sum"), v_absmax=pool_heads_ref(flat[2], H, 64, "absmax"))
    pc, ps = sagesla_quant(q, k, v, backend="triton", **kw, **stats)
    assert torch.equal(ps, ts)
    assert (pc.view(torch.uint8) != tc.view(torch.uint8)).float().mean() < 1e-3  # fp32 sums in another order
