"""Fused norm kernels (Triton, interpreter on CPU) vs the references, and references vs the
eager model code they replace (canonical Wan precision map)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests._bits import COMPILED, assert_same_bits, assert_same_codes
from tests._env import kernel_device, triton_runs_here
from turbocompile.kernels.norms import ref
from turbocompile.ops import norms

pytestmark = pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")

DEV = kernel_device()
DTYPES = (torch.float32, torch.bfloat16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3}  # ‖out − ref‖ / ‖ref‖


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(B, L, D, dt, gen_scale=0.5):
    x = (torch.randn(B, L, D) * 3 + 1).to(dt)  # non-zero mean, like a residual stream
    sh = torch.randn(B, 1, D)
    sc = torch.randn(B, 1, D) * gen_scale
    return x.to(DEV), sh.to(DEV), sc.to(DEV)


# Comparisons between two *different* computations (a kernel vs torch, or two kernels). In the interpreter
# they are exact (tests/_bits.py); compiled for CUDA they hold to the bound each helper derives.
def _assert_gated_residual(xn, xn_ref, x, y, gate):
    """x_new = x + y·gate from a kernel vs the eager reference (y·gate rounded to dt, then the sum).

    Bit-identical in the interpreter, and compiled too for 16-bit dtypes (the kernel rounds y·gate to
    dt with an explicit cvt, which nothing can fuse) and without a gate (no product). Compiled fp32:
    Triton contracts x + y·g into one FMA, which skips the rounding of y·g (≤ 2^-24·|y·g|); with
    each result's own rounding (≤ 2^-24·|result|), |x_new − x_ref| ≤ 2^-24·(|y·g| + |x_new| + |x_ref|):
    a bound in the operands' scale, not in ulps of the result, since x ≈ −y·g cancels (H100: up to
    0.97 of it, 780 ulps of the result; every element was the eager or the once-rounded value)."""
    if not COMPILED or gate is None or xn.dtype != torch.float32:
        assert torch.equal(xn, xn_ref), "gated residual not bit-identical to the eager one"
        return
    d = (xn.double() - xn_ref.double()).abs()
    bound = 2.0**-24 * ((y.double() * gate.double()).abs() + xn.double().abs() + xn_ref.double().abs())
    assert (d <= bound).all(), f"gated residual (fp32, FMA): |Δ| / bound up to {(d / bound).max().item():.2f}"


def _assert_same_row_scales(s, s_ref, dt, fmt, what=""):
    """Per-token scales of the fused quant epilogue vs the reference quantizer applied to the h of the
    plain LN kernel (another compiled kernel). Bit-identical in the interpreter. Compiled, the two
    kernels' fp32 h can differ in the last bits (each compiles its own reduction trees and FMA
    contractions), and so can the row amax = max|h|: an fp32 h by ≤ 4 ulps (the statistics and h
    are a few ops deep; both rsqrt.approx see inputs a few ulps apart); a 16-bit h, whose amax is a dt
    value, by one dt ulp, where a last-bit difference flips the rounding of the row's largest |h|
    (2^16 fp32 ulps for bf16). int8 scales are amax·2^-7 (the same ulps); fp8 scales are amax/448,
    rounded once more: the ulps grow by 512/448, plus one. (H100: fp32 ≤ 2 ulps, bf16 identical.)"""
    amax_ulps = 4 if dt == torch.float32 else torch.finfo(dt).eps / torch.finfo(torch.float32).eps
    max_ulps = amax_ulps if fmt == "int8" else amax_ulps * 512 / 448 + 1
    assert_same_bits(s, s_ref, max_ulps=max_ulps, what=f"{what} scales")


def _assert_same_rope(out, out_ref, rope, what=""):
    """RMSNorm (+ RoPE) outputs of two different kernels: bit-identical in the interpreter.

    Compiled, |Δ| ≤ k·eps(dt)·m (eps·m ≥ one ulp of m), m the element's magnitude, or with RoPE its
    pair's norm: the rotation mixes each pair (2j, 2j+1) and can cancel (a·c ≈ b·s), so an element
    can be many of its own ulps off while its pair, whose norm the rotation preserves, is not. The
    two sums of squares reduce in different orders, so rstd can differ in its last bits. fp32: k = 4
    (rstd a few eps/2 off, then z·rstd, ·w and the rotation round once each; H100: 2.1, i.e. 10 ulps
    of a cancelled element). 16-bit: only where that flips a rounding (of z·rstd, of n·w for a 16-bit
    w, of the output): one dt ulp of n carried through ·w and its rounding (≤ 2) plus the output's own
    flip (1): k = 3, and on ≤ 1% of the elements, as a flip needs the fp32 value within a few fp32
    ulps of a dt rounding boundary (H100: 0.7, one ulp, on 4e-5 of them)."""
    if not COMPILED:
        assert torch.equal(out, out_ref), f"{what} not bit-identical"
        return
    a, b = out.double(), out_ref.double()
    mag = torch.maximum(a.abs(), b.abs())
    if rope:
        pa, pb = a.unflatten(-1, (-1, 2)).norm(dim=-1), b.unflatten(-1, (-1, 2)).norm(dim=-1)
        mag = torch.maximum(pa, pb).repeat_interleave(2, dim=-1)
    k = 4 if out.dtype == torch.float32 else 3
    d = (a - b).abs() / (torch.finfo(out.dtype).eps * mag.clamp_min(torch.finfo(out.dtype).tiny))
    assert d.max().item() <= k, f"{what}: |Δ| up to {d.max().item():.2f} eps·|pair| (bound {k})"
    if out.dtype != torch.float32:
        share = (a != b).float().mean().item()
        assert share <= 0.01, f"{what}: {share:.4f} of the elements differ (bound 0.01)"


# ------------------------------------------------------------------- ln_modulate kernel vs ref
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("D", [64, 200, 256, 1536])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_ln_modulate_kernel_shapes(dt, D, rows):
    B = 1 if rows < 33 else 3
    x, sh, sc = _inputs(B, rows if B == 1 else 11, D, dt)
    out = norms.ln_modulate(x, shift=sh, scale=sc, backend="triton")
    expect = ref.layer_norm_modulate_ref(x, None, None, sh, sc, 1e-6, dt)
    assert out.dtype == dt and out.shape == x.shape
    assert torch.isfinite(out.float()).all()
    assert rel(out, expect) <= TOL[dt]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "affine", "affine_mod", "head_fp32", "per_token_mod", "2d"])
def test_ln_modulate_kernel_variants(dt, variant):
    B, L, D = 2, 5, 200
    x, sh, sc = _inputs(B, L, D, dt)
    w = torch.randn(D, device=DEV)
    b = torch.randn(D, device=DEV)
    kw = dict(weight=None, bias=None, shift=None, scale=None, out_dtype=None)
    if variant in ("affine", "affine_mod"):
        kw.update(weight=w, bias=b)
    if variant in ("affine_mod", "head_fp32"):
        kw.update(shift=sh, scale=sc)
    if variant == "head_fp32":
        kw.update(out_dtype=torch.float32)
    if variant == "per_token_mod":
        kw.update(shift=torch.randn(B, L, D, device=DEV), scale=torch.randn(1, L, D, device=DEV))
    if variant == "2d":
        x = x.reshape(B * L, D)
        kw.update(shift=torch.randn(1, D, device=DEV), scale=torch.randn(D, device=DEV))
    out = norms.ln_modulate(x, backend="triton", **kw)
    expect = ref.layer_norm_modulate_ref(x, kw["weight"], kw["bias"], kw["shift"], kw["scale"], 1e-6,
                                         kw["out_dtype"] or dt)
    assert out.dtype == expect.dtype
    assert rel(out, expect) <= TOL[out.dtype if out.dtype == torch.float32 and dt == torch.float32 else dt]


# ------------------------------------------------------------------- gated residual + LN
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("D,rows", [(64, 33), (200, 7), (1536, 1)])
@pytest.mark.parametrize("gated,affine", [(True, False), (False, True)])
def test_residual_ln_modulate_kernel(dt, D, rows, gated, affine):
    x, sh, sc = _inputs(1, rows, D, dt)
    y = torch.randn_like(x)
    gate = torch.randn(1, 1, D, device=DEV) if gated else None
    w, b = (torch.randn(D, device=DEV), torch.randn(D, device=DEV)) if affine else (None, None)
    shift, scale = (None, None) if affine else (sh, sc)  # norm3 (affine, no modulate) / LN2 + modulate
    x_new, h = norms.residual_ln_modulate(x, y, gate, w, b, shift, scale, backend="triton")
    x_ref, h_ref = ref.residual_ln_modulate_ref(x, y, gate, w, b, shift, scale, 1e-6, dt)
    _assert_gated_residual(x_new, x_ref, x, y, gate)  # same roundings as the eager bf16 mul + add
    assert rel(h, h_ref) <= TOL[dt]


# ------------------------------------------------------------------- rmsnorm + rope
def _rope_tables(L, d):
    theta = torch.arange(L)[:, None].float() * (10000.0 ** (-torch.arange(d // 2).float() / (d // 2)))
    return torch.cos(theta).to(DEV), torch.sin(theta).to(DEV)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("D,H,rows", [(64, 2, 33), (200, 5, 7), (256, 4, 1), (1536, 12, 7)])
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("amp", [4.0, 1e-3])
def test_rmsnorm_rope_kernel(dt, D, H, rows, rope, amp):
    """amp 1e-3: mean(z²) ≈ 1e-6 = eps, so rsqrt(mean(z²) + eps) depends on eps as much as on z (an eps
    10x off changes the output by ~2x; at amp 4 it is invisible). D=200 with RoPE is the element kernel,
    the rest the pair-word kernel."""
    z = (torch.randn(1, rows, D) * amp).to(dt).to(DEV)
    w = (torch.rand(D) + 0.5).to(dt).to(DEV)
    cos, sin = _rope_tables(rows, D // H) if rope else (None, None)
    out = norms.rmsnorm_rope(z, w, cos, sin, H, backend="triton")
    expect = ref.rmsnorm_rope_ref(z, w, cos, sin, H)
    assert out.dtype == dt and out.is_contiguous()
    assert rel(out, expect) <= TOL[dt]


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_rope_strided_qkv_slice(w_dtype):
    B, L, D, H = 2, 7, 128, 2
    qkv = torch.randn(B, L, 3 * D, dtype=torch.bfloat16, device=DEV)
    k = qkv[..., D:2 * D]  # row stride 3D: a slice of a fused qkv projection
    w = (torch.rand(D) + 0.5).to(w_dtype).to(DEV)
    cos, sin = _rope_tables(L, D // H)
    out = norms.rmsnorm_rope(k, w, cos, sin, H, backend="triton")
    assert rel(out, ref.rmsnorm_rope_ref(k.contiguous(), w, cos, sin, H)) <= TOL[torch.bfloat16]


# ------------------------------------------------------------------- quant epilogue
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("gran", ["per_token", "block128"])
@pytest.mark.parametrize("D,rows", [(64, 300), (100, 7), (200, 7), (256, 1)])
def test_ln_modulate_quant_bit_exact(dt, fmt, gran, D, rows):
    """q and scales equal the reference quantizer applied to the kernel's x.dtype-rounded h
    (block128: the same row kernel's h through the W8A8 block quantizer)."""
    x, sh, sc = _inputs(1, rows, D, dt)
    x[0, 0, 3] = 40.0  # an outlier: one value sets the amax of its row/block
    q, s = norms.ln_modulate_quant(x, None, None, sh, sc, format=fmt, granularity=gran, backend="triton")
    h = norms.ln_modulate(x, shift=sh, scale=sc, backend="triton").reshape(-1, D)
    q_ref, s_ref = ref.quantize_ref(h, fmt, gran)
    assert q.dtype == q_ref.dtype and q.shape == (rows, D) and s.shape == s_ref.shape
    if gran == "per_token":  # the fused epilogue vs the quantizer on the plain kernel's h (two kernels)
        _assert_same_row_scales(s, s_ref, dt, fmt)
        assert_same_codes(q, q_ref)
    else:  # block128 quantizes that same kernel's h with exact ops (div_rn, one multiply): exact everywhere
        assert torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.int8), q_ref.view(torch.int8))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("gran", ["per_token", "block128"])
def test_residual_ln_modulate_quant(fmt, gran):
    D, rows = 200, 130
    x, sh, sc = _inputs(1, rows, D, torch.bfloat16)
    y, gate = torch.randn_like(x), torch.randn(1, 1, D, device=DEV)
    x_new, q, s = norms.residual_ln_modulate_quant(x, y, gate, None, None, sh, sc, format=fmt,
                                                   granularity=gran, backend="triton")
    x_ref, h = norms.residual_ln_modulate(x, y, gate, None, None, sh, sc, backend="triton")
    q_ref, s_ref = ref.quantize_ref(h.reshape(-1, D), fmt, gran)
    assert torch.equal(x_new, x_ref)  # bf16: the same explicit roundings in both kernels, exact everywhere
    if gran == "per_token":  # the fused epilogue vs the quantizer on the plain kernel's h (two kernels)
        _assert_same_row_scales(s, s_ref, torch.bfloat16, fmt)
        assert_same_codes(q, q_ref)
    else:  # block128: that same kernel's h through exact quantizer ops
        assert torch.equal(s, s_ref) and torch.equal(q.view(torch.int8), q_ref.view(torch.int8))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_block128_quant_wide_rows(dt, fmt):
    """D spanning many 128-column blocks and rows spanning two 128-row bands (one partial): codes and
    scales equal the reference quantizer on the reference h where h agrees, and stay within one code."""
    D, rows = 1536, 130
    x, sh, sc = _inputs(1, rows, D, dt)
    q, s = norms.ln_modulate_quant(x, None, None, sh, sc, format=fmt, granularity="block128",
                                   backend="triton")
    h = norms.ln_modulate(x, shift=sh, scale=sc, backend="triton").reshape(-1, D)
    q_own, s_own = ref.quantize_ref(h, fmt, "block128")
    assert s.shape == (2, 12) and torch.equal(s, s_own)
    assert torch.equal(q.float(), q_own.float())  # value-equal (the W8A8 quantizer writes +0 for a -0 code)
    q_ref, s_ref = ref.ln_modulate_quant_ref(x, None, None, sh, sc, 1e-6, fmt, "block128")
    assert rel(s, s_ref) <= 4e-3
    if fmt == "int8":
        diff = (q.int() - q_ref.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01


# ------------------------------------------------------------------- awkward inputs
@pytest.mark.parametrize("kind", ["zeros", "constant"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_zero_and_constant_rows_no_nan(kind, fmt):
    D, rows = 200, 9
    x = torch.zeros(1, rows, D, dtype=torch.bfloat16, device=DEV)
    if kind == "constant":
        x += 3.25
    sh = torch.randn(1, 1, D, device=DEV)
    sc = torch.randn(1, 1, D, device=DEV)
    h = norms.ln_modulate(x, shift=sh, scale=sc, backend="triton")
    # exact on the GPU too: the row sum 650 is exact in any order and the mean divides with IEEE rounding,
    # so x − mean is exactly 0 (an approximate division left 7e-8, whose LN·rsqrt(eps) became the row's amax)
    assert torch.equal(h, sh.to(torch.bfloat16).expand_as(h))  # LN of a constant row is 0
    for gran in ("per_token", "block128"):
        q, s = norms.ln_modulate_quant(x, None, None, None, None, format=fmt, granularity=gran,
                                       backend="triton")
        assert torch.isfinite(s).all() and (s > 0).all()
        assert (q.float() == 0).all()
    z = norms.rmsnorm_rope(x, torch.ones(D, dtype=torch.bfloat16, device=DEV), None, None, 1,
                           backend="triton")
    assert torch.isfinite(z.float()).all()


# ------------------------------------------------------------------- reference vs eager model code
@pytest.mark.parametrize("dt", DTYPES)
def test_ref_matches_eager_model_code(dt):
    B, L, D, H = 2, 6, 256, 4
    x, sh, sc = _inputs(B, L, D, dt)
    x, sh, sc = x.cpu(), sh.cpu(), sc.cpu()
    # pre-attention / pre-FFN (TD rounds LN to dt before modulating; we do not)
    eager = (F.layer_norm(x.float(), (D,), eps=1e-6).to(dt).float() * (1 + sc) + sh).to(dt)
    assert rel(ref.layer_norm_modulate_ref(x, None, None, sh, sc), eager) <= (1e-5 if dt == torch.float32 else 8e-3)
    # cross-attn pre-norm (affine)
    w, b = torch.randn(D), torch.randn(D)
    eager = F.layer_norm(x.float(), (D,), w.float(), b.float(), eps=1e-6).to(dt)
    assert rel(ref.layer_norm_modulate_ref(x, w, b), eager) <= (1e-5 if dt == torch.float32 else 8e-3)
    # head (fp32 out)
    eager = F.layer_norm(x.float(), (D,), eps=1e-6) * (1 + sc) + sh
    assert rel(ref.layer_norm_modulate_ref(x, None, None, sh, sc, out_dtype=torch.float32), eager) <= 1e-5
    # gated residual: bit-exact
    y, g = torch.randn_like(x), torch.randn(B, 1, D)
    assert torch.equal(ref.gated_residual_ref(x, y, g), x + y * g.to(dt))
    assert torch.equal(ref.gated_residual_ref(x, y, None), x + y)
    # q/k RMSNorm + RoPE, eager form of the canonical model
    z = torch.randn(B, L, D).to(dt)
    wq = (torch.rand(D) + 0.5).to(dt)
    cos, sin = (t.cpu() for t in _rope_tables(L, D // H))
    n = (z.float() * torch.rsqrt(z.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt) * wq
    nf = n.float().view(B, L, H, D // H // 2, 2)
    c, s = cos.view(1, L, 1, -1), sin.view(1, L, 1, -1)
    eager = torch.stack((nf[..., 0] * c - nf[..., 1] * s, nf[..., 0] * s + nf[..., 1] * c), -1).flatten(2).to(dt)
    assert torch.equal(ref.rmsnorm_rope_ref(z, wq, cos, sin, H), eager)
    assert torch.equal(ref.rmsnorm_rope_ref(z, wq, None, None, H), n)


def test_ref_quantizer_definition():
    h = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, s = ref.quantize_ref(h, "int8", "per_token")
    assert q[0].tolist() == [127, -64, 32, 0]  # +amax -> 128 saturates to 127
    assert s[0, 0].item() == 1.0 / 128 and s[1, 0].item() == pytest.approx(1e-8 / 128)
    h2 = torch.tensor([[2.5 / 128, 1.0]])  # 2.5 -> 2 (ties to even)
    assert ref.quantize_ref(h2, "int8", "per_token")[0][0, 0].item() == 2
    qf, sf = ref.quantize_ref(h, "fp8", "block128")
    assert sf.shape == (1, 1) and qf[0, 0].float().item() == 448.0


def test_matches_quantize_activation_if_registered():
    import turbocompile.ops  # noqa: F401

    try:
        from turbocompile.ops import w8a8  # noqa: F401
    except ImportError:
        pass
    if not hasattr(torch.ops.turbocompile, "quantize_activation"):
        pytest.skip("turbocompile::quantize_activation not registered yet")
    x, sh, sc = _inputs(1, 130, 256, torch.bfloat16)
    h = norms.ln_modulate(x, shift=sh, scale=sc, backend="triton").reshape(-1, 256)
    for fmt in ("int8", "fp8"):
        for gran in ("per_token", "block128"):
            q, s = norms.ln_modulate_quant(x, None, None, sh, sc, format=fmt, granularity=gran,
                                           backend="triton")
            q2, s2 = torch.ops.turbocompile.quantize_activation(h, fmt, gran, "torch")
            if gran == "per_token":  # the fused epilogue vs the quantizer on the plain kernel's h
                _assert_same_row_scales(s, s2, torch.bfloat16, fmt, what=f"{fmt} {gran}")
                assert_same_codes(q, q2, what=f"{fmt} {gran}")
            else:  # block128: that same kernel's h through exact quantizer ops
                assert torch.equal(s, s2), (fmt, gran)
                assert torch.equal(q.view(torch.int8), q2.view(torch.int8)), (fmt, gran)


# ------------------------------------------------------------------- launch configurations (round 2)
@pytest.mark.parametrize("cfg", [dict(split=False), dict(persist=1, prefetch=True), dict(block_m=2, persist=1),
                                 dict(block_m=2, persist=1, prefetch=True, num_warps=4), dict(stats=1),
                                 dict(stats=1, block_m=2, qv=1), dict(qv=2)])
@pytest.mark.parametrize("D", [200, 1536])
def test_row_kernel_configs_agree(cfg, D):
    """Every launch configuration the benchmark may pick computes the same function: persistent
    grids with and without prefetch, one vs two column tiles, blocks of rows sharing one
    per-sample shift/scale/gate load (B=2, L=4: blocks of 2 rows never straddle samples)."""
    from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton, residual_ln_modulate_triton

    x, sh, sc = _inputs(2, 4, D, torch.bfloat16)
    y, gate = torch.randn_like(x), torch.randn(2, 1, D, device=DEV)
    xn, h = residual_ln_modulate_triton(x, y, gate, None, None, sh, sc, 1e-6, torch.bfloat16, config=cfg)
    x_ref, h_ref = ref.residual_ln_modulate_ref(x, y, gate, None, None, sh, sc, 1e-6, torch.bfloat16)
    assert torch.equal(xn, x_ref) and rel(h, h_ref) <= TOL[torch.bfloat16]  # bf16 residual: exact everywhere
    q, s = ln_modulate_triton(x, None, None, sh, sc, 1e-6, x.dtype, quant=("int8", "per_token"), config=cfg)
    h1 = ln_modulate_triton(x, None, None, sh, sc, 1e-6, x.dtype, config=cfg).reshape(-1, D)
    q_ref, s_ref = ref.quantize_ref(h1, "int8", "per_token")
    assert_same_codes(q, q_ref)  # the fused epilogue vs the plain kernel's h: two kernels
    _assert_same_row_scales(s, s_ref, torch.bfloat16, "int8")


@pytest.mark.parametrize("D", [200, 1536])
def test_one_pass_statistics_offset_rows(D):
    """stats=1 (one shifted pass, var = E[d²] - E[d]²) stays as accurate as the two-pass kernel
    on rows whose mean is 1000 standard deviations away from zero, and on constant rows."""
    from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton

    x = torch.randn(2, 3, D, device=DEV) + 1000.0
    x[1, 1] = 7.0  # constant row: var 0
    x[0, 2, 0] = 1003.0  # the shift element itself is an outlier
    expect = ref.layer_norm_modulate_ref(x, None, None, None, None, 1e-6)
    one = ln_modulate_triton(x, None, None, None, None, 1e-6, torch.float32, config=dict(stats=1))
    two = ln_modulate_triton(x, None, None, None, None, 1e-6, torch.float32, config=dict(stats=0))
    assert torch.isfinite(one).all()
    assert rel(one, expect) <= 1e-4 and rel(two, expect) <= 1e-4, (rel(one, expect), rel(two, expect))


@pytest.mark.parametrize("stats", [0, 1])
@pytest.mark.parametrize("D", [200, 1536])
def test_ln_eps_small_variance_rows(stats, D):
    """fp32 rows whose variance (1e-6) equals eps: rstd = rsqrt(var + eps) then depends on eps as much as
    on the row (an eps 10x off changes h by ~57%; the var ~9 rows above cannot see it). Both statistics
    paths, one (masked) and two column tiles, LN + modulate, the gated residual form and the per-token
    quantizer epilogue (same statistics code) against F.layer_norm with that eps. The mean is 2e-3, not
    large: at a mean of 5 the fp32 rounding of x - mean alone would cost ~1e-4 of agreement."""
    from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton, residual_ln_modulate_triton

    eps, cfg, f32 = 1e-6, dict(stats=stats), torch.float32
    x = (torch.randn(1, 7, D, device=DEV) + 2.0) * 1e-3
    y = torch.randn_like(x) * 1e-3
    gate = torch.rand(1, 1, D, device=DEV)
    sh, sc = torch.randn(1, 1, D, device=DEV) * 0.1, torch.randn(1, 1, D, device=DEV) * 0.5
    h = ln_modulate_triton(x, None, None, sh, sc, eps, f32, config=cfg)
    assert rel(h, ref.layer_norm_modulate_ref(x, None, None, sh, sc, eps, f32)) <= 1e-6
    plain = ln_modulate_triton(x, None, None, None, None, eps, f32, config=cfg)
    assert rel(plain, ref.layer_norm_modulate_ref(x, None, None, None, None, eps, f32)) <= 1e-6
    xn, hr = residual_ln_modulate_triton(x, y, gate, None, None, sh, sc, eps, f32, config=cfg)
    xn_ref, hr_ref = ref.residual_ln_modulate_ref(x, y, gate, None, None, sh, sc, eps, f32)
    _assert_gated_residual(xn, xn_ref, x, y, gate)
    assert rel(hr, hr_ref) <= 1e-6
    q, s = ln_modulate_triton(x, None, None, None, None, eps, f32, quant=("int8", "per_token"), config=cfg)
    q_ref, s_ref = ref.quantize_ref(ref.layer_norm_modulate_ref(x, None, None, None, None, eps, f32)[0], "int8",
                                    "per_token")
    assert rel(s, s_ref) <= 1e-6 and (q.int() - q_ref.int()).abs().max() <= 1


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("res", [False, True])
def test_lean_quantizer_same_codes(fmt, res):
    """qv=1 (clamp only at +127, int8 code from the low byte of bits(v + 1.5·2^23)) and qv=2 (also
    the amax taken before the rounding to x.dtype) give the same codes and scales as qv=0 and the
    reference quantizer, on rows whose amax sits at either
    sign (codes -128 / +127 at the row's extreme), with ties, zeros and an all-zero row."""
    from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton, residual_ln_modulate_triton

    D = 200
    x, sh, sc = _inputs(2, 5, D, torch.bfloat16)
    x[0, 1] = 0.0  # all-zero row: h = shift only
    x[1, 2, ::7] = 0.0
    x[1, 3, 5] = -40.0  # negative outlier: its code is -128
    x[0, 4, 9] = 40.0  # positive outlier: +127
    y, gate = torch.randn_like(x), torch.randn(2, 1, D, device=DEV)
    outs = []
    for cfg in (dict(qv=0), dict(qv=1), dict(qv=2)):
        qv = cfg["qv"]
        if res:
            xn, q, s = residual_ln_modulate_triton(x, y, gate, None, None, sh, sc, 1e-6, x.dtype, quant=(fmt, "per_token"),
                                                   config=cfg)
            _, h = residual_ln_modulate_triton(x, y, gate, None, None, sh, sc, 1e-6, x.dtype, config=cfg)
        else:
            q, s = ln_modulate_triton(x, None, None, sh, sc, 1e-6, x.dtype, quant=(fmt, "per_token"), config=cfg)
            h = ln_modulate_triton(x, None, None, sh, sc, 1e-6, x.dtype, config=cfg)
        q_ref, s_ref = ref.quantize_ref(h.reshape(-1, D), fmt, "per_token")
        # the fused epilogue vs the plain kernel's h (two kernels; in the interpreter: identical bits)
        assert_same_codes(q, q_ref, what=f"{fmt} qv={qv}")
        _assert_same_row_scales(s, s_ref, x.dtype, fmt, what=f"{fmt} qv={qv}")
        outs.append(q)
    for qv, o in enumerate(outs[1:], 1):  # three compiled kernels: the same codes up to their h's last bits
        assert_same_codes(o, outs[0], what=f"{fmt} qv={qv} vs qv=0")
    if fmt == "int8" and not res:
        assert outs[1].min().item() == -128 and outs[1].max().item() == 127


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_fp32", [False, True])
def test_rmsnorm_rope_pair_words_match_element_kernel(dt, w_fp32):
    """The pair-word kernel (each (2j, 2j+1) pair read as one int32/int64 word) against the
    element kernel and the reference, on a strided qkv slice with two column tiles (D=384)."""
    from turbocompile.kernels.norms.triton_rmsnorm_rope import rmsnorm_rope_triton

    B, L, D, H = 2, 3, 384, 3
    qkv = (torch.randn(B, L, 3 * D) * 4).to(dt).to(DEV)
    z = qkv[..., D:2 * D]
    w = (torch.rand(D) + 0.5).to(torch.float32 if w_fp32 else dt).to(DEV)
    cos, sin = _rope_tables(L, D // H)
    for c, s in ((cos, sin), (None, None)):
        new = rmsnorm_rope_triton(z, w, c, s, H, 1e-6)
        old = rmsnorm_rope_triton(z, w, c, s, H, 1e-6, legacy=True)
        expect = ref.rmsnorm_rope_ref(z.contiguous(), w, c, s, H)
        _assert_same_rope(new, old, rope=c is not None, what="pair-word vs element kernel")
        assert rel(new, expect) <= (1e-5 if dt == torch.float32 else 4e-3)


# ------------------------------------------------------------------- rmsnorm + rope + per-head block pooling
def _pool_bound(x, H, rows):
    """Per (head, block, channel) bound for an fp32 sum of x's block: 1e-6 of the sum of |x|."""
    return ref.pool_heads_ref(x.abs(), H, rows, "sum").double() * 1e-6 + 1e-30


def _check_pool(z, w, cos, sin, H, rows, mean, v=None, config=None):
    """rmsnorm_rope_pool_triton: out bit-equal to rmsnorm_rope_triton's (compiled: to the last-bit bound of
    `_assert_same_rope`; the two kernels reduce the sum of squares in their own orders), pooled within 1e-6
    (relative to the block's sum of |out|) of a float64 pooling of that out, vmax exact."""
    from turbocompile.kernels.norms.triton_rmsnorm_rope import rmsnorm_rope_triton
    from turbocompile.kernels.norms.triton_rmsnorm_rope_pool import rmsnorm_rope_pool_triton

    out, pooled, vmax = rmsnorm_rope_pool_triton(z, w, cos, sin, H, 1e-6, rows, mean, v, config=config)
    B, L, D = z.shape
    nb = -(-L // rows)
    assert out.is_contiguous() and out.dtype == z.dtype
    plain = rmsnorm_rope_triton(z, w, cos, sin, H, 1e-6)
    _assert_same_rope(out, plain, rope=cos is not None, what="pool vs plain kernel")
    # and vs the reference, not only vs the other kernel (an eps error shared by both must show)
    assert rel(out, ref.rmsnorm_rope_ref(z.contiguous(), w, cos, sin, H, 1e-6)) <= TOL.get(z.dtype, 4e-3)
    assert pooled.shape == (B * H, nb, D // H) and pooled.dtype == torch.float32
    sums = ref.pool_heads_ref(out.double(), H, rows, "sum").double()
    bound = _pool_bound(out.float(), H, rows)
    if mean:
        cnt = (L - torch.arange(nb, device=z.device) * rows).clamp(max=rows).double()[:, None]
        sums, bound = sums / cnt, bound / cnt
    assert ((pooled.double() - sums).abs() <= bound).all(), (pooled.double() - sums).abs().max()
    if v is None:
        assert vmax is None
    else:
        assert torch.equal(vmax, ref.pool_heads_ref(v, H, rows, "absmax"))
    return out, pooled, vmax


@pytest.mark.parametrize("amp", [4.0, 1e-3])  # 1e-3: mean(z²) ≈ eps, the output depends on eps
@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
@pytest.mark.parametrize("B,L,D,H,rows,rope,with_v,strided,dt", [
    (1, 1, 256, 2, 64, True, True, False, torch.bfloat16),  # L = 1
    (2, 37, 256, 2, 64, True, True, True, torch.bfloat16),  # L < pool_rows, B = 2, strided z and v
    (2, 200, 256, 2, 64, False, False, True, torch.bfloat16),  # L not a multiple, RMSNorm only
    (1, 20, 1536, 12, 16, True, True, True, torch.bfloat16),  # Wan-1.3B rows: two column tiles
    (1, 70, 128, 2, 16, True, True, False, torch.float16),
    (2, 33, 128, 1, 32, True, False, False, torch.float32),  # int64 pair-words
])
def test_rmsnorm_rope_pool_kernel(B, L, D, H, rows, rope, with_v, strided, dt, mean, amp):
    qkv = ((torch.randn(B, L, 3 * D) + 0.125) * amp).to(dt).to(DEV)
    z, v = (qkv[..., D:2 * D], qkv[..., 2 * D:]) if strided else (qkv[..., :D].contiguous(), qkv[..., 2 * D:].contiguous())
    w = (torch.rand(D) + 0.5).to(dt).to(DEV)
    cos, sin = _rope_tables(L, D // H) if rope else (None, None)
    _check_pool(z, w, cos, sin, H, rows, mean, v if with_v else None)


@pytest.mark.parametrize("config", [dict(sub=1), dict(sub=8, stages=1), dict(split=False, num_warps=4),
                                    dict(sub=64)], ids=["sub1", "sub8_stages1", "one_tile", "sub_capped"])
def test_rmsnorm_rope_pool_configs(config):
    """Launch variants (the GPU tuning knobs) keep out's bits; pooled only changes in summation order. sub=64
    with pool_rows 32 is halved to 32 (a sub-tile never crosses a block)."""
    B, L, D, H = 1, 75, 384, 3
    qkv = (torch.randn(B, L, 3 * D) * 4).bfloat16().to(DEV)
    w = (torch.rand(D) + 0.5).float().to(DEV)  # float32 weight: no rounding after the weight
    cos, sin = _rope_tables(L, D // H)
    _check_pool(qkv[..., :D], w, cos, sin, H, 32, False, qkv[..., 2 * D:], config=config)


def test_rmsnorm_rope_pool_v_dtype_and_op_backends():
    """v may have its own dtype; the op's triton and torch backends agree (out within bf16 rounding of the
    reference, pooled from each backend's own out), and the torch backend pools exactly like the reference."""
    B, L, D, H = 2, 50, 256, 2
    z = (torch.randn(B, L, D) * 2).bfloat16().to(DEV)
    v = torch.randn(B, L, D, device=DEV)  # float32
    w = (torch.rand(D) + 0.5).bfloat16().to(DEV)
    cos, sin = _rope_tables(L, D // H)
    out, pooled, vmax = _check_pool(z, w, cos, sin, H, 16, True, v)
    o_t, p_t, m_t = norms.rmsnorm_rope_pool(z, w, cos, sin, H, pool_rows=16, mean=True, v=v, backend="torch")
    e_out, e_pool, e_vmax = ref.rmsnorm_rope_pool_ref(z, w, cos, sin, H, 1e-6, 16, True, v)
    assert torch.equal(o_t, e_out) and torch.equal(p_t, e_pool) and torch.equal(m_t, e_vmax)
    assert rel(out, o_t) <= TOL[torch.bfloat16] and torch.equal(vmax, m_t)
    o3, p3, m3 = norms.rmsnorm_rope_pool(z, w, cos, sin, H, pool_rows=16, mean=True, v=v, backend="triton")
    assert torch.equal(o3, out) and torch.equal(m3, vmax) and torch.equal(p3, pooled)
    _, _, none = norms.rmsnorm_rope_pool(z, w, cos, sin, H, pool_rows=16, mean=False, backend="triton")
    assert none.shape == (0,) and none.dtype == torch.float32


def test_rmsnorm_rope_pool_kernel_errors():
    from turbocompile.kernels.norms.triton_rmsnorm_rope_pool import rmsnorm_rope_pool_triton

    z = torch.randn(1, 8, 64).bfloat16().to(DEV)
    w = torch.ones(64).bfloat16().to(DEV)
    with pytest.raises(ValueError, match="heads of even size"):
        rmsnorm_rope_pool_triton(z, w, None, None, 64, 1e-6, 4, True)
    with pytest.raises(ValueError, match="pair-words"):  # a row offset of one element: no word view
        rmsnorm_rope_pool_triton(torch.randn(1, 8, 65).bfloat16().to(DEV)[..., 1:], w, None, None, 2, 1e-6, 4, True)
    with pytest.raises(ValueError, match="pool config: unknown key 'rows'; valid: num_warps, split, stages, sub"):
        rmsnorm_rope_pool_triton(z, w, None, None, 2, 1e-6, 4, True, config=dict(rows=2))
    with pytest.raises(ValueError, match="sub=3 must be a power of two"):
        rmsnorm_rope_pool_triton(z, w, None, None, 2, 1e-6, 4, True, config=dict(sub=3))
