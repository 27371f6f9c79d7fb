"""Fused cross-attention (q RMSNorm -> attention -> FP8 codes at a per-sample bound scale): the bound, the
reference vs an fp64 pipeline (and vs per-token abs-max scales), the Triton kernels (interpreter on CPU, compiled
on a GPU) vs the reference on awkward shapes, and the op's input checks."""

from __future__ import annotations

import math

import pytest
import torch

from tests._env import kernel_device, triton_runs_here
from turbocompile.kernels.text_attention import ref
from turbocompile.ops.text_attention import norm_attention_quant, value_bound
from turbocompile.kernels.w8a8.ref import quantize_ref

DEV = kernel_device()
needs_triton = pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _deq(codes, scales):
    return codes.double() * scales.double()


def _pipeline64(z, w, k, v, H, eps=1e-6):
    """fp64 RMSNorm -> softmax attention over every key, flattened to [B*L, D] (no rounding, no quantization)."""
    B, L, D = z.shape
    zd = z.double()
    q = (zd * torch.rsqrt(zd.square().mean(-1, keepdim=True) + eps) * w.double()).view(B, L, H, D // H)
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(D // H)
    return (torch.softmax(s, -1) @ vd).transpose(1, 2).reshape(B * L, D)


def _case(B, L, H, d, Lk, n=None, dt=torch.bfloat16, wdt=None, seed=0):
    """z, w, k, v (rows n.. of k and v one repeated row, as a padded prompt gives) and the tail start."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, L, H * d, generator=g) * 3 + 0.5).to(dt)
    w = (torch.rand(H * d, generator=g) + 0.5).to(wdt or dt)
    k = torch.randn(B, Lk, H, d, generator=g) * 1.5
    v = torch.randn(B, Lk, H, d, generator=g) + 0.3
    if n is not None and n < Lk:
        k[:, n:] = torch.randn(B, 1, H, d, generator=g)
        v[:, n:] = torch.randn(B, 1, H, d, generator=g)
    k, v = k.to(dt), v.to(dt)
    tail = ref.key_tail_start_ref(k, v) if n is not None else None
    return z, w, k, v, tail


# ----------------------------------------------------------------------------- bound and reference
def test_value_bound_is_the_per_sample_abs_max_with_the_quantizer_floor():
    v = torch.randn(3, 7, 2, 16).to(torch.bfloat16)
    v[1] = 0
    v[2, 4, 1, 3] = -70.0
    b = value_bound(v)
    assert b.dtype == torch.float32 and b.shape == (3,)
    assert b[0] == v[0].abs().max().float() and b[1] == 1e-8 and b[2] == 70.0


@pytest.mark.parametrize("n", [None, 0, 9, 31])
def test_reference_is_the_quantized_pipeline(n):
    z, w, k, v, tail = _case(2, 21, 3, 32, 31, n)
    codes, scales = ref.norm_attention_quant_ref(z, w, k, v, ref.value_bound_ref(v), tail, 3, 1e-6)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (42, 96)
    assert scales.shape == (42, 1) and scales.dtype == torch.float32
    # one scale per sample: max|v| / 448
    assert torch.equal(scales.view(2, 21), (v.abs().amax(dim=(1, 2, 3)).float() / 448).unsqueeze(1).expand(2, 21))
    # merging the repeated tail changes nothing beyond rounding: compare with attention over every key
    exact = _pipeline64(z, w, k, v, 3)
    err = rel(_deq(codes, scales), exact)
    assert err < 4e-2
    # the bound scale costs (almost) nothing against per-token abs-max scales on the same rounded output
    c_tok, s_tok = quantize_ref(exact.to(torch.bfloat16), "fp8", "per_token")
    assert err < 1.2 * rel(_deq(c_tok, s_tok), exact) + 2e-3


# ----------------------------------------------------------------------------- Triton kernels
@needs_triton
@pytest.mark.parametrize("B,L,H,d,Lk,n,dt,wdt", [
    (2, 37, 3, 32, 20, None, torch.bfloat16, None),  # L not a multiple of the row tile, all keys
    (1, 50, 2, 64, 23, 15, torch.bfloat16, torch.float32),  # merged tail, fp32 norm weight
    (2, 33, 2, 16, 40, 0, torch.float16, None),  # every key repeats: one key; fp16
    (1, 1, 2, 32, 5, 4, torch.bfloat16, None),  # one token; tail of one key
    (3, 17, 1, 128, 70, 33, torch.bfloat16, None),  # one head of 128, several key blocks
])
def test_kernel_matches_reference(B, L, H, d, Lk, n, dt, wdt):
    z, w, k, v, tail = _case(B, L, H, d, Lk, n, dt, wdt)
    vb = ref.value_bound_ref(v)
    args = [t.to(DEV) if t is not None else None for t in (z, w, k, v, vb, tail)]
    codes, scales = norm_attention_quant(*args, num_heads=H, backend="triton")
    rc, rs = ref.norm_attention_quant_ref(z, w, k, v, vb, tail, H, 1e-6)
    assert codes.dtype == rc.dtype and codes.shape == rc.shape
    assert torch.equal(scales.cpu(), rs)  # bound / 448, one correctly rounded division on both sides
    # the kernel rounds P to the value dtype before P·V (as SDPA's flash kernels do); the reference does not
    assert rel(_deq(codes.cpu(), scales.cpu()), _deq(rc, rs)) < 2e-2
    assert rel(_deq(codes.cpu(), scales.cpu()), _pipeline64(z, w, k, v, H)) < 4e-2


@needs_triton
def test_kernel_zero_rows_outliers_and_strided_model_layout():
    """Zero query rows (RMSNorm of zeros is zero: uniform attention), a large value outlier (the bound, hence
    the scale, follows it), k and v as views of one fused K/V projection output (the sibling GEMM's layout),
    z as a view of a wider row, and the bound computed by the op when not given."""
    B, L, H, d, Lk = 2, 29, 2, 32, 26
    g = torch.Generator().manual_seed(3)
    zw = torch.randn(B, L, 3 * H * d, generator=g).to(torch.bfloat16)
    zw[0, 4] = 0
    zw[1, 7:9] = 0
    z = zw[..., H * d: 2 * H * d]  # unit last stride, row stride 3D
    w = (torch.rand(H * d, generator=g) + 0.5).to(torch.bfloat16)
    kv = torch.randn(B, Lk, 4 * H * d, generator=g).to(torch.bfloat16)
    kv[1, 3, 2 * H * d + 5] = 3000.0  # an outlier in v
    k = kv[..., : H * d].unflatten(-1, (H, d))
    v = kv[..., 2 * H * d: 3 * H * d].unflatten(-1, (H, d))
    codes, scales = norm_attention_quant(*[t.to(DEV) for t in (z, w, k, v)], num_heads=H, backend="triton")
    rc, rs = ref.norm_attention_quant_ref(z, w, k, v, ref.value_bound_ref(v), None, H, 1e-6)
    assert torch.isfinite(scales).all() and torch.equal(scales.cpu(), rs)
    assert rs[L].item() == pytest.approx(3008.0 / 448, rel=1e-6)  # sample 1's scale follows its (bf16) outlier
    assert rel(_deq(codes.cpu(), scales.cpu()), _deq(rc, rs)) < 2e-2
    assert torch.isfinite(codes.float()).all()


@needs_triton
def test_kernel_all_zero_values_give_zero_codes_and_finite_scales():
    z, w, k, v, _ = _case(1, 9, 2, 16, 5)
    v = torch.zeros_like(v)
    codes, scales = norm_attention_quant(*[t.to(DEV) for t in (z, w, k, v)], num_heads=2, backend="triton")
    floor = torch.tensor(1e-8) / torch.tensor(448.0)  # the quantizer's amax floor, in fp32
    assert (codes.float() == 0).all() and (scales.cpu() == floor).all()


# ----------------------------------------------------------------------------- op checks
def test_op_rejects_bad_inputs_with_one_line_errors():
    z, w, k, v, tail = _case(1, 8, 2, 16, 6, 3)
    vb = value_bound(v)
    good = dict(num_heads=2, backend="torch")
    with pytest.raises(ValueError, match="num_heads=4 but k has 2 heads"):
        norm_attention_quant(z, w, k, v, vb, tail, num_heads=4)
    with pytest.raises(ValueError, match="eps must be > 0"):
        norm_attention_quant(z, w, k, v, vb, tail, eps=0.0, **good)
    with pytest.raises(ValueError, match="weight must be"):
        norm_attention_quant(z, w[:-1], k, v, vb, tail, **good)
    with pytest.raises(ValueError, match="tail_start must be int32"):
        norm_attention_quant(z, w, k, v, vb, tail.long(), **good)
    with pytest.raises(ValueError, match="v_bound must be float32"):
        norm_attention_quant(z, w, k, v, vb.double(), tail, **good)
    with pytest.raises(ValueError, match="z must be"):
        norm_attention_quant(z[..., :-2], w, k, v, vb, tail, **good)
    with pytest.raises(ValueError, match="z must share k's dtype"):
        norm_attention_quant(z.half(), w, k, v, vb, tail, **good)


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z = torch.empty(2, 11, 64, dtype=torch.bfloat16)
        k = torch.empty(2, 5, 2, 32, dtype=torch.bfloat16)
        vb = torch.ops.turbocompile.value_bound(k)
        c, s = torch.ops.turbocompile.norm_attention_quant(z, torch.empty(64), k, k, vb, None, 2, 1e-6, "auto")
    assert vb.shape == (2,) and vb.dtype == torch.float32
    assert c.shape == (22, 64) and c.dtype == torch.float8_e4m3fn and s.shape == (22, 1) and s.dtype == torch.float32
