"""Fused cross-attention (q RMSNorm -> attention -> FP8 codes at a per-sample bound scale): the bound, the
reference vs an fp64 pipeline (and vs per-token abs-max scales), the Triton kernels (interpreter on CPU, compiled
on a GPU) vs the reference on awkward shapes, and the op's input checks."""

from __future__ import annotations

import math
import re

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


# ----------------------------------------------------------------------------- sumsq: rstd from the q GEMM
def _granule_sums(z):
    from turbocompile.kernels.w8a8.ref import granule_sumsq_ref

    return granule_sumsq_ref(z.reshape(-1, z.shape[-1]))


def _frac_differing(a, b) -> float:
    return (a.float() != b.float()).float().mean().item()


@pytest.mark.parametrize("n", [None, 9])
def test_reference_with_sumsq_equals_the_statistic_from_z(n):
    """Granule sums of z's rows give the RMSNorm's mean square up to fp32 summation order: the codes are those of
    the reference without them but for rare last-bit roundings of q, and the scales are the same."""
    z, w, k, v, tail = _case(2, 37, 3, 64, 31, n)  # D = 192: a partial second granule
    vb = ref.value_bound_ref(v)
    c0, s0 = ref.norm_attention_quant_ref(z, w, k, v, vb, tail, 3, 1e-6)
    c1, s1 = ref.norm_attention_quant_ref(z, w, k, v, vb, tail, 3, 1e-6, _granule_sums(z))
    assert torch.equal(s0, s1)
    assert _frac_differing(c0, c1) < 2e-3 and rel(_deq(c1, s1), _deq(c0, s0)) < 1e-3


def test_reference_uses_the_given_sums():
    """Sums 4x too large halve rstd: q is the RMSNorm of z / 2, which changes the attention (unlike a statistic
    that the reference recomputes from z)."""
    z, w, k, v, tail = _case(1, 20, 2, 64, 12, 5)
    vb = ref.value_bound_ref(v)
    c_true, _ = ref.norm_attention_quant_ref(z, w, k, v, vb, tail, 2, 1e-6, _granule_sums(z))
    c4, s4 = ref.norm_attention_quant_ref(z, w, k, v, vb, tail, 2, 1e-6, 4 * _granule_sums(z))
    assert _frac_differing(c_true, c4) > 0.2
    # ... as z / 2 (exact in bf16) does with z's sums: rsqrt(4 ms + eps) and rsqrt(ms + eps) / 2 differ only
    # through eps and the rsqrt's rounding
    half = (z.float() / 2).to(z.dtype)
    c_half, _ = ref.norm_attention_quant_ref(half, w, k, v, vb, tail, 2, 1e-6, _granule_sums(z))
    assert _frac_differing(c4, c_half) < 2e-3


@needs_triton
@pytest.mark.parametrize("B,L,H,d,Lk,n,dt", [
    (2, 37, 3, 32, 20, None, torch.bfloat16),  # D = 96: one partial granule; all keys
    (1, 50, 3, 64, 23, 15, torch.bfloat16),  # D = 192: a full and a partial granule; merged tail
    (2, 33, 2, 128, 40, 0, torch.float16),  # D = 256: two full granules; fp16
    (1, 1, 2, 64, 5, 4, torch.bfloat16),  # one token
    (1, 20, 5, 64, 9, 4, torch.bfloat16),  # D = 320: three granules, read in more than one chunk
])
def test_kernel_with_sumsq_matches_the_reference_and_the_rstd_pass(B, L, H, d, Lk, n, dt):
    z, w, k, v, tail = _case(B, L, H, d, Lk, n, dt)
    z[0, L // 2] = 0  # a zero row: sum 0, rstd = rsqrt(eps)
    vb = ref.value_bound_ref(v)
    ss = _granule_sums(z)
    dev = [t.to(DEV) if t is not None else None for t in (z, w, k, v, vb, tail)]
    c0, s0 = norm_attention_quant(*dev, num_heads=H, backend="triton")
    c1, s1 = norm_attention_quant(*dev, num_heads=H, backend="triton", sumsq=ss.to(DEV))
    rc, rs = ref.norm_attention_quant_ref(z, w, k, v, vb, tail, H, 1e-6, ss)
    assert torch.equal(s1.cpu(), rs) and torch.equal(s1, s0)
    assert rel(_deq(c1.cpu(), s1.cpu()), _deq(rc, rs)) < 2e-2  # P rounding, as without sumsq (see above)
    # against the kernel's own rstd pass: the same statistic up to fp32 summation order
    assert _frac_differing(c0.cpu(), c1.cpu()) < 2e-3 and rel(_deq(c1.cpu(), s1.cpu()), _deq(c0.cpu(), s0.cpu())) < 1e-3


@needs_triton
def test_kernel_uses_the_given_sums():
    """With sums 4x too large the kernel's q is that of the reference given the same sums, not the rstd pass's."""
    z, w, k, v, tail = _case(1, 30, 2, 64, 12, 5)
    vb = ref.value_bound_ref(v)
    ss4 = 4 * _granule_sums(z)
    dev = [t.to(DEV) for t in (z, w, k, v, vb, tail)]
    c4, s4 = norm_attention_quant(*dev, num_heads=2, backend="triton", sumsq=ss4.to(DEV))
    c_plain, _ = norm_attention_quant(*dev, num_heads=2, backend="triton")
    rc, rs = ref.norm_attention_quant_ref(z, w, k, v, vb, tail, 2, 1e-6, ss4)
    assert rel(_deq(c4.cpu(), s4.cpu()), _deq(rc, rs)) < 2e-2
    assert _frac_differing(c4.cpu(), c_plain.cpu()) > 0.2


@needs_triton
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_sumsq_from_the_q_gemm_vs_rstd_from_z(fmt):
    """The whole chain as fuse_text_attention builds it: the q GEMM writing z's sums (w8a8_linear_prequant_sumsq)
    then the fused op reading them, against the plain q GEMM then the fused op's own rstd pass, on the same z."""
    from turbocompile.ops.w8a8 import quantize_weight, w8a8_linear_prequant_sumsq

    B, L, H, d, Lk = 2, 29, 3, 64, 17
    D = H * d
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B * L, 144, generator=g) * 2
    x[5] = 0  # a zero input row: z is the bias
    x[7, 3] = 200.0  # an outlier
    qx, sx = quantize_weight(x, fmt, "per_channel")  # per-row scales: the per-token quantizer's formula
    qw, sw = quantize_weight(torch.randn(D, 144, generator=g) * 0.2, fmt, "per_channel")
    bias = (torch.randn(D, generator=g) * 0.3).to(torch.bfloat16)
    _, w, k, v, tail = _case(B, L, H, d, Lk, 8, seed=4)
    vb = ref.value_bound_ref(v)
    dev = [t.to(DEV) for t in (qx, sx, qw, sw, bias)]
    y, ss = w8a8_linear_prequant_sumsq(*dev, fmt, "per_token", "per_channel", torch.bfloat16, "triton")
    z = y.view(B, L, D)
    kw = dict(num_heads=H, backend="triton")
    c1, s1 = norm_attention_quant(z, w.to(DEV), k.to(DEV), v.to(DEV), vb.to(DEV), tail.to(DEV), sumsq=ss, **kw)
    c0, s0 = norm_attention_quant(z, w.to(DEV), k.to(DEV), v.to(DEV), vb.to(DEV), tail.to(DEV), **kw)
    assert torch.equal(s0, s1)
    assert _frac_differing(c0.cpu(), c1.cpu()) < 2e-3 and rel(_deq(c1.cpu(), s1.cpu()), _deq(c0.cpu(), s0.cpu())) < 1e-3
    # and the torch backend of both ops, end to end
    ct, st = norm_attention_quant(z.cpu(), w, k, v, vb, tail, num_heads=H, backend="torch", sumsq=ss.cpu())
    assert torch.equal(st, s1.cpu()) and rel(_deq(c1.cpu(), s1.cpu()), _deq(ct, st)) < 2e-2


def test_sumsq_is_checked_and_optional_in_the_schema():
    z, w, k, v, tail = _case(1, 8, 2, 64, 6, 3)  # D = 128: one granule
    vb = value_bound(v)
    good = dict(num_heads=2, backend="torch")
    ss = _granule_sums(z)
    for bad, what in ((ss.double(), "torch.float64"), (ss[:-1], "(7, 1)"), (torch.cat([ss, ss], 1), "(8, 2)")):
        with pytest.raises(ValueError, match=r"sumsq must be float32 \[B\*L, ceil\(D/128\)\] = \[8, 1\] on cpu .*got .*"
                                             + re.escape(what)) as err:
            norm_attention_quant(z, w, k, v, vb, tail, sumsq=bad, **good)
        assert "\n" not in str(err.value)
    # graphs saved before the argument existed call the op with nine arguments: the schema default is None
    schema = torch.ops.turbocompile.norm_attention_quant.default._schema
    assert schema.arguments[-1].name == "sumsq" and schema.arguments[-1].default_value is None
    c9, s9 = torch.ops.turbocompile.norm_attention_quant(z, w, k, v, vb, tail, 2, 1e-6, "torch")
    c10, s10 = norm_attention_quant(z, w, k, v, vb, tail, sumsq=None, **good)
    assert torch.equal(c9.view(torch.uint8), c10.view(torch.uint8)) and torch.equal(s9, s10)


def test_fake_kernel_with_sumsq():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z = torch.empty(2, 11, 192, dtype=torch.bfloat16)
        k = torch.empty(2, 5, 3, 64, dtype=torch.bfloat16)
        vb = torch.ops.turbocompile.value_bound(k)
        c, s = torch.ops.turbocompile.norm_attention_quant(z, torch.empty(192), k, k, vb, None, 3, 1e-6, "auto",
                                                           torch.empty(22, 2))
        assert c.shape == (22, 192) and s.shape == (22, 1)
        with pytest.raises(ValueError, match="sumsq must be float32"):
            torch.ops.turbocompile.norm_attention_quant(z, torch.empty(192), k, k, vb, None, 3, 1e-6, "auto",
                                                        torch.empty(22, 1))


@needs_triton
def test_benchmark_sumsq_variant_checks_on_cpu(monkeypatch):
    """benchmarks/bench_text_attention.py's q GEMM + sumsq variant: its agreement check runs (and agrees) on a small
    shape where the kernels run here; on a GPU the benchmark runs it at the Wan shapes."""
    import importlib.util
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))  # the script imports its sibling modules (charts, _cuda_graph)
    spec = importlib.util.spec_from_file_location("bench_text_attention", bench_dir / "bench_text_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if DEV == "cuda":
        pytest.skip("cpu_check builds CPU operands; the GPU run checks at full size")
    res = bench.cpu_check()
    assert res["agree"], res
    assert res["sumsq_rel"] < 1e-5 and res["scales_equal"]
