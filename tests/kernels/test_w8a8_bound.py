"""Per-token FP8 with "bound" scales: the reference (ref.row_bound_scale_ref, ref.quantize_at_scale_ref),
the row-scale kernel and the GELU GEMM epilogue storing codes at given row scales
(kernels/w8a8/triton_bound.py), and their fallback route."""

from __future__ import annotations

import pytest
import torch

from tests._env import has_cuda, kernel_device, sm_at_least, triton_runs_here
from turbocompile.kernels.w8a8 import ref
from turbocompile.ops.w8a8 import quantize_weight

triton_only = pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
needs_tma = pytest.mark.skipif(has_cuda() and not sm_at_least(9), reason="TMA needs sm90+")


def _operands(m, k, n, fmt="fp8", seed=0, outlier=True, bias=True, zero_row=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    w = torch.randn(n, k, generator=g) * 0.08
    if outlier and m and k and n:
        x[m // 2, k // 3] = 300.0  # a massive activation: that row's bound and amax both follow it
        w[n // 3] *= 40.0  # an outlier output channel: C, the largest weight-row norm, comes from it
    qx, sx = ref.quantize_ref(x, fmt, "per_token")
    if zero_row is not None:
        qx[zero_row] = 0
    qw, sw = quantize_weight(w, fmt, "per_channel")
    b = torch.randn(n, generator=g) if bias else None
    return [t.to(kernel_device()) if t is not None else None for t in (qx, sx, qw, sw, b)]


# ------------------------------------------------------------------------------------ reference


def test_bound_constants_are_the_largest_dequantized_row_norm_and_bias():
    qx, sx, qw, sw, b = (t.cpu() for t in _operands(5, 300, 70))
    wb = ref.gelu_bound_constants_ref(qw, sw, b, "per_channel")
    w64 = qw.double() * sw.double()
    assert wb.dtype == torch.float32 and wb.shape == (2,)
    assert wb[0].item() >= w64.norm(dim=1).max().item() > wb[0].item() * (1 - 1e-6)  # rounded up
    assert wb[1].item() >= b.double().abs().max().item()
    assert ref.gelu_bound_constants_ref(qw, sw, None, "per_channel")[1].item() == 0.0
    # block-128 weight scales (TurboDiffusion INT8): the norm of the dequantized rows as well
    qb, sb = quantize_weight(torch.randn(70, 300) * 0.1, "int8", "block128")
    deq = qb.double() * ref.expand_scale(sb.double(), 70, 3, "block128").repeat_interleave(128, 1)[:, :300]
    assert abs(ref.gelu_bound_constants_ref(qb, sb, None, "block128")[0].item() - deq.norm(dim=1).max().item()) \
        < 1e-5 * deq.norm(dim=1).max().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("outlier", [False, True])
def test_bound_covers_every_gelu_value_and_never_saturates(seed, outlier):
    """|GELU(y)| <= |y| <= ||x̂||·C + b: the codes never clip, and the scale is a power of two. The error
    stays at FP8 rounding level: close to the amax scale's on plain data; with a 40x outlier weight row
    (C, hence every row's bound, 100-400x above the amax) the small values lose precision to e4m3
    subnormals: about 1.5x the plain error, while the amax scale's error shrinks there (the outlier
    column dominates h's norm)."""
    qx, sx, qw, sw, b = (t.cpu() for t in _operands(64, 200, 150, seed=seed, outlier=outlier))
    q, s = ref.w8a8_gemm_gelu_quant_ref(qx, sx, qw, sw, b, "per_token", "per_channel", torch.float32, "fp8", "bound")
    h = ref.w8a8_gemm_gelu_ref(qx, sx, qw, sw, b, "per_token", "per_channel", torch.float32)
    assert (torch.frexp(s)[0] == 0.5).all()
    assert (h.abs().amax(1, keepdim=True) <= 448.0 * s).all()
    assert (q.float().abs() < 448.0).all()
    ratio = 448.0 * s / h.abs().amax(1, keepdim=True)
    assert 1.0 <= ratio.min() and (outlier or ratio.max() < 16)  # plain data: one order of magnitude
    err = (q.float() * s - h).norm() / h.norm()
    q_a, s_a = ref.quantize_ref(h, "fp8", "per_token")
    err_amax = (q_a.float() * s_a - h).norm() / h.norm()
    if outlier:
        assert err < 0.045
    else:
        assert err < 0.03 and err < 1.1 * err_amax


def test_bound_scale_edge_rows():
    """A zero input row: the bound is the bias term alone (floor 1e-8 without a bias); K = 0 likewise."""
    qx, sx, qw, sw, b = (t.cpu() for t in _operands(6, 64, 32, zero_row=2))
    wb = ref.gelu_bound_constants_ref(qw, sw, b, "per_channel")
    s = ref.row_bound_scale_ref(qx, sx, wb)
    assert s[2].item() == ref._exp2i(ref.pow2_exponent_ref(wb[1:] * ref.BOUND_MARGIN)).item()
    s0 = ref.row_bound_scale_ref(qx, sx, torch.zeros(2))
    assert s0[2].item() == ref._exp2i(ref.pow2_exponent_ref(torch.zeros(1))).item()
    sk0 = ref.row_bound_scale_ref(torch.zeros(3, 0, dtype=torch.float8_e4m3fn), torch.ones(3, 1), wb)
    assert torch.equal(sk0, s[:1].new_full((3, 1), s[2].item()))


# ------------------------------------------------------------------------------------ Triton


@triton_only
@pytest.mark.parametrize("m,k,fmt", [(1, 1, "fp8"), (37, 300, "fp8"), (70, 96, "int8"), (9, 1536, "fp8")])
def test_row_bound_kernel_equals_reference(m, k, fmt):
    from turbocompile.kernels.w8a8.triton_bound import row_bound_scale_triton

    qx, sx, qw, sw, b = _operands(m, k, 40, fmt=fmt, seed=m)
    wb = ref.gelu_bound_constants_ref(qw.cpu(), sw.cpu(), b.cpu(), "per_channel").to(qx.device)
    s = row_bound_scale_triton(qx, sx, wb)
    assert torch.equal(s.cpu(), ref.row_bound_scale_ref(qx.cpu(), sx.cpu(), wb.cpu()))
    assert row_bound_scale_triton(qx[:0], sx[:0], wb).shape == (0, 1)


def _bound(ops, **kw):
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_quant_triton

    return w8a8_gemm_gelu_quant_triton(*ops, "per_token", "per_channel", torch.bfloat16, "fp8", out_scale="bound",
                                       **kw)


def _bf16_h(ops, **kw):
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_triton

    return w8a8_gemm_gelu_triton(*ops, "per_token", "per_channel", torch.bfloat16, amax_mode="none", **kw)[0]


TMA_CFGS = {
    "bn128": {"BLOCK_M": 64, "BLOCK_N": 128, "EPILOGUE_SUBTILE": False},
    "bn256sub": {"BLOCK_M": 64, "BLOCK_N": 256, "EPILOGUE_SUBTILE": True},
}


@triton_only
@needs_tma
@pytest.mark.parametrize("short", [True, False], ids=["short", "long"])
@pytest.mark.parametrize("cfg", list(TMA_CFGS))
@pytest.mark.parametrize("m,k,n,zero_row", [(37, 160, 272, None), (70, 128, 400, 9)])
def test_tma_rowscale_epilogue_codes(cfg, m, k, n, zero_row, short, monkeypatch):
    """The epilogue's codes equal ref.quantize_at_scale_ref of the same GEMM's bf16 h, bit for bit, and
    the scales the reference's (the partial last N tile and a zero row included). On a GPU both forms of
    the GELU codes epilogue (``GELU_CODES_SHORT``) run; under the interpreter (portable GELU) both ids
    run the long form."""
    from turbocompile.kernels.w8a8 import triton_gemm_tma

    monkeypatch.setattr(triton_gemm_tma, "GELU_CODES_SHORT", short)
    ops = _operands(m, k, n, seed=m, zero_row=zero_row)
    q, s = _bound(ops, use_tma=True, tma_config=TMA_CFGS[cfg])
    h = _bf16_h(ops, use_tma=True, tma_config=TMA_CFGS[cfg])
    wb = ref.gelu_bound_constants_ref(*(t.cpu() for t in ops[2:4]), ops[4].cpu(), "per_channel")
    assert q.dtype == torch.float8_e4m3fn and q.shape == (m, n)
    assert torch.equal(s.cpu(), ref.row_bound_scale_ref(ops[0].cpu(), ops[1].cpu(), wb))
    assert torch.equal(q.cpu().float(), ref.quantize_at_scale_ref(h.cpu(), s.cpu()).float())


@triton_only
def test_fallback_route_and_degenerate_shapes():
    """N % 16 != 0 (no FP8 code rows through TMA): bf16 h quantized at the bound scales; K = 0 and M = 0."""
    ops = _operands(21, 64, 131, seed=3)
    q, s = _bound(ops)
    h = _bf16_h(ops)
    assert torch.equal(q.cpu().float(), ref.quantize_at_scale_ref(h.cpu(), s.cpu()).float())
    ops0 = _operands(5, 0, 32, seed=4)
    q0, s0 = _bound(ops0, use_tma=True)
    want_q, want_s = ref.w8a8_gemm_gelu_quant_ref(*(t.cpu() for t in ops0), "per_token", "per_channel",
                                                  torch.bfloat16, "fp8", "bound")
    assert torch.equal(s0.cpu(), want_s) and torch.equal(q0.cpu().float(), want_q.float())
    qe, se = _bound([t[:0] if i < 2 else t for i, t in enumerate(ops)])
    assert qe.shape == (0, 131) and se.shape == (0, 1)


@triton_only
def test_bad_arguments():
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_quant_triton

    ops = _operands(8, 64, 32)
    with pytest.raises(ValueError, match="'bound' needs out_format 'fp8'"):
        w8a8_gemm_gelu_quant_triton(*ops, "per_token", "per_channel", torch.bfloat16, "int8", out_scale="bound")
    with pytest.raises(ValueError, match="unknown out_scale 'exact'; valid: amax, pow2, bound"):
        w8a8_gemm_gelu_quant_triton(*ops, "per_token", "per_channel", torch.bfloat16, "fp8", out_scale="exact")
    from turbocompile.kernels.w8a8.triton_bound import row_bound_scale_triton

    with pytest.raises(ValueError, match="wbound must be the \\[2\\] \\[C, b\\]"):
        row_bound_scale_triton(ops[0], ops[1], torch.zeros(3, device=ops[0].device))
    with pytest.raises(ValueError, match="sa must be \\[M, 1\\]"):
        row_bound_scale_triton(ops[0], ops[1][:4], torch.zeros(2, device=ops[0].device))


@triton_only
def test_row_bound_kernel_takes_non_fp32_strided_scales():
    """sa in fp64 with a row stride of 2: converted first, read with the converted tensor's stride."""
    from turbocompile.kernels.w8a8.triton_bound import row_bound_scale_triton

    qx, sx, qw, sw, b = _operands(33, 96, 40, seed=5)
    wb = ref.gelu_bound_constants_ref(qw.cpu(), sw.cpu(), b.cpu(), "per_channel").to(qx.device)
    sx64 = torch.zeros(33, 2, dtype=torch.float64, device=qx.device)
    sx64[:, 0] = sx[:, 0].double()
    s = row_bound_scale_triton(qx, sx64[:, :1], wb)
    assert torch.equal(s.cpu(), ref.row_bound_scale_ref(qx.cpu(), sx.cpu(), wb.cpu()))


@pytest.mark.parametrize("k", [64, 1536])
def test_tight_bound_rows_stay_within_448(k):
    """The case the margin exists for: input rows parallel to the largest weight row with positive
    entries, so Cauchy-Schwarz is tight and |h| comes within BOUND_MARGIN of 448·s. The rounded h,
    divided by the scale, stays <= 448 before the clamp (torch reference; the GPU GEMM's FP8 accumulation
    truncates toward zero, which only lowers |y|)."""
    g = torch.Generator().manual_seed(k)
    w = torch.rand(48, k, generator=g) * 0.05
    w[7] = torch.rand(k, generator=g) * 0.2 + 0.1  # the largest-norm row, all positive
    x = w[7].repeat(5, 1) * torch.tensor([[0.5], [1.0], [3.0], [20.0], [300.0]])
    qx, sx = ref.quantize_ref(x, "fp8", "per_token")
    qw, sw = quantize_weight(w, "fp8", "per_channel")
    b = torch.zeros(48)
    b[7] = 0.25
    wb = ref.gelu_bound_constants_ref(qw, sw, b, "per_channel")
    s = ref.row_bound_scale_ref(qx, sx, wb)
    h = ref.w8a8_gemm_gelu_ref(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16).float()
    ratio = (h.abs().amax(1, keepdim=True) / (448.0 * s)).flatten()
    assert ratio.max() <= 1.0 and ratio.max() > 0.5 / ref.BOUND_MARGIN  # tight (up to the pow2 rounding)
    assert (h / s).abs().max() <= 448.0


# ------------------------------------------------------------------- sm90 build (no GPU needed)


def _sm90_rowscale_ptx(mode: int = 4, short: bool = True) -> str:
    """PTX of the FP8 TMA GELU GEMM with the row-scale codes epilogue (AMAX_MODE 4; 0: bf16 h, no amax),
    Wan config, GPU forms."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from turbocompile.kernels.w8a8.triton_gemm_tma import _w8a8_gemm_tma_kernel as gemm

    sig = {name: "i32" for name in gemm.arg_names}
    sig.update(a_desc="tensordesc<fp8e4nv[128,128]>", w_desc="tensordesc<fp8e4nv[256,128]>",
               y_desc=f"tensordesc<{'fp8e4nv' if mode else 'bf16'}[128,128]>", sa_ptr="*fp32", sw_ptr="*fp32",
               bias_ptr="*bf16", amax_ptr="*fp32")
    const = dict(IS_FP8=True, FP8_PROMOTE=False, GELU_SHORT=short,
                 HAS_BIAS=True, OUT_KIND=0, ACTIVATION=1, ROUND_BF16=False, NATIVE=2, AMAX_MODE=mode,
                 RESIDUAL=0, RES_TMA=False, GATE_MODE=0, r_desc=None,
                 GRANULE=128, NUM_SMS=132, FLATTEN=True, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8,
                 EPILOGUE_SUBTILE=True)
    sig.update({key: "constexpr" for key in const})
    return triton.compile(ASTSource(gemm, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 8, "num_stages": 3}).asm["ptx"]


def test_rowscale_epilogue_builds_for_sm90():
    """Compiles for sm90 (child process: the session runs under TRITON_INTERPRET): saturating RNE e4m3
    cvt, codes stored by TMA, no reductions (no more shuffles than the bf16 epilogue) and no atomics."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    code = ("from tests.kernels.test_w8a8_bound import _sm90_rowscale_ptx; p = _sm90_rowscale_ptx(); "
            "p0 = _sm90_rowscale_ptx(0); print(p.count('cvt.rn.satfinite.e4m3x2.f32'), p.count('wgmma.mma_async'), "
            "p.count('cp.async.bulk.tensor'), p.count('shfl.sync') - p0.count('shfl.sync'), p.count('atom.'))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    cvt, mma, tma, shfl, atom = map(int, run.stdout.split()[-5:])
    assert cvt > 0 and mma > 0 and tma > 0 and shfl <= 0 and atom == 0


def test_short_gelu_codes_epilogue_for_sm90():
    """The short GELU codes epilogue (GELU_CODES_SHORT) compiles for sm90 to packed bf16x2 roundings, no
    clamp before the saturating e4m3 cast, and fewer instructions than the long form."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    code = ("from tests.kernels.test_w8a8_bound import _sm90_rowscale_ptx as f; a = f(short=True); "
            "b = f(short=False); n = lambda p: sum(1 for l in p.splitlines() "
            "if l.strip() and not l.strip().startswith(('.', '/', '$', '{', '}'))); "
            "print(a.count('cvt.rn.bf16x2.f32'), b.count('cvt.rn.bf16x2.f32'), "
            "a.count('min.f32') + a.count('max.f32'), b.count('min.f32') + b.count('max.f32'), "
            "a.count('tanh.approx.f32'), b.count('tanh.approx.f32'), n(a), n(b))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    bf_a, bf_b, mm_a, mm_b, th_a, th_b, n_a, n_b = map(int, run.stdout.split()[-8:])
    assert bf_a > 0 and bf_b == 0  # packed bf16 roundings only in the short form
    assert th_a == th_b > 0  # one tanh per value in both
    assert mm_b - mm_a >= th_b  # the long form's ±448 clamp (two per value) is gone
    assert n_a < n_b
