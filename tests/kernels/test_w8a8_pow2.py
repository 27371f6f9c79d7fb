"""Per-token FP8 with power-of-two scales: the reference (ref.quantize_pow2_ref), the GELU GEMM's
FP8 epilogue + in-place requantization (kernels/w8a8/triton_pow2.py) and its fallback routes."""

from __future__ import annotations

import math

import pytest
import torch

from tests._env import has_cuda, kernel_device, sm_at_least, triton_runs_here
from turbocompile.kernels.w8a8 import ref
from turbocompile.ops.w8a8 import quantize_weight

SUB = 2.0 ** -6  # smallest e4m3 normal: codes below it are subnormals (quantum 2^-9)


def _pow2_bounds(a: torch.Tensor) -> torch.Tensor:
    """Exponents from float64 log2, for values not within rounding of a power of two."""
    return torch.tensor([math.ceil(math.log2(max(v, 1e-8) / 448.0)) for v in a.double().tolist()],
                        dtype=torch.int32)


# ------------------------------------------------------------------------------------ reference


def test_pow2_exponent_exact_at_powers_of_two_and_the_floor():
    j = torch.arange(-30, 120, dtype=torch.float64)
    at = (448.0 * torch.pow(2.0, j)).float()  # exactly 448 * 2^j: e = j, never j + 1
    assert torch.equal(ref.pow2_exponent_ref(at), j.to(torch.int32))
    above = torch.nextafter(at, torch.full_like(at, math.inf))  # one fp32 ulp more: j + 1
    assert torch.equal(ref.pow2_exponent_ref(above), j.to(torch.int32) + 1)
    below = torch.nextafter(at, torch.zeros_like(at))
    assert torch.equal(ref.pow2_exponent_ref(below), j.to(torch.int32))
    jp = torch.arange(-26, 120, dtype=torch.float64)  # 2^-26 > 1e-8, the floor
    pure = torch.pow(2.0, jp).float()  # 2^j = 448 * 2^(j - 8.807): e = j - 8
    assert torch.equal(ref.pow2_exponent_ref(pure), jp.to(torch.int32) - 8)
    # amax 0 (an all-zero row) and anything below the floor take the amax quantizer's 1e-8 floor
    tiny = torch.tensor([0.0, 1e-30, 1e-8, ref.AMAX_FLOOR])
    assert ref.pow2_exponent_ref(tiny).tolist() == [-35] * 4 and math.ceil(math.log2(1e-8 / 448)) == -35
    r = torch.rand(2000) * torch.pow(10.0, torch.randint(-6, 30, (2000,)).float())
    assert torch.equal(ref.pow2_exponent_ref(r), _pow2_bounds(r))


if triton_runs_here():  # a jit kernel must live at module level (its globals are resolved there)
    import triton
    import triton.language as tl

    from turbocompile.kernels.w8a8.triton_pow2 import exp2_int, pow2_exponent

    @triton.jit
    def _exponent_kernel(a_ptr, e_ptr, s_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        e = pow2_exponent(tl.load(a_ptr + i, mask=i < n, other=1.0))
        tl.store(e_ptr + i, e, mask=i < n)
        tl.store(s_ptr + i, exp2_int(e), mask=i < n)


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_triton_pow2_exponent_equals_the_reference():
    j = torch.arange(-35, 120, dtype=torch.float64)
    at = (448.0 * torch.pow(2.0, j)).float()
    a = torch.cat([at, torch.nextafter(at, torch.full_like(at, math.inf)), torch.nextafter(at, torch.zeros_like(at)),
                   torch.tensor([1e-8, 3.0e38]), torch.rand(300) * 1e3]).to(kernel_device())
    e = torch.empty(a.shape, dtype=torch.int32, device=a.device)
    s = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    _exponent_kernel[(1,)](a, e, s, a.numel(), BLOCK=1024)
    want = ref.pow2_exponent_ref(a.cpu())
    assert torch.equal(e.cpu(), want) and torch.equal(s.cpu(), ref._exp2i(want))


def _rows(m=33, k=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m)[:, None]  # six decades of row scales
    x[3] = 0.0  # all-zero row
    x[5, 7] = 5e4  # an outlier: most of its row becomes tiny codes
    x[6] = 448.0 * 2.0 ** -3 * torch.sign(x[6])  # |x| exactly 448 * 2^-3: scale 2^-3, codes +-448
    return x.to(torch.bfloat16)


def test_quantize_pow2_ref_properties():
    x = _rows()
    q, s = ref.quantize_pow2_ref(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (x.shape[0], 1) and s.dtype == torch.float32
    mant, _ = torch.frexp(s)
    assert torch.all(mant == 0.5)  # powers of two
    x32, c = x.float(), q.float()
    amax = x32.abs().amax(1, keepdim=True)
    nz = amax[:, 0] > 0
    assert s[3].item() == 2.0 ** -35 and torch.all(c[3] == 0)  # the floor of amax 0
    ratio = amax[nz] / s[nz]
    assert torch.all(ratio > 224) and torch.all(ratio <= 448)  # largest |x| / s in (224, 448]
    cmax = c.abs().amax(1)[nz]
    assert torch.all(cmax >= 224) and torch.all(cmax <= 448)  # largest |code|: RNE of that
    assert s[6].item() == 2.0 ** -3 and torch.all(c[6].abs() == 448)
    # codes * scale reconstruct x within e4m3 precision: half an ulp (2^-4 relative) for normal codes,
    # half a subnormal step (2^-10 * s) below
    err = (c * s - x32).abs()
    assert torch.all(err <= torch.maximum(x32.abs() * 2.0 ** -4, 2.0 ** -10 * s))
    # the same codes as quantizing with the amax scale when that is the same power of two (row 6), and
    # as precise otherwise: per-row relative errors of the Gaussian rows (not 3, 5, 6) agree on average
    qa, sa = ref.quantize_ref(x, "fp8", "per_token")
    assert torch.equal(q[6].float(), qa[6].float()) and sa[6].item() == s[6].item()
    rows = [i for i in range(x.shape[0]) if i not in (3, 5, 6)]
    rel = lambda a: ((a - x32).norm(dim=1) / x32.norm(dim=1))[rows].mean().item()  # noqa: E731
    assert rel(c * s) < 1.1 * rel(qa.float() * sa)


def test_granule_codes_shifted_to_the_row_scale_equal_direct_quantization_up_to_subnormal_steps():
    """The theory of the fused path, in torch: c_g * 2^(e_g - e_row) rounded to e4m3 equals the direct
    code except possibly one subnormal step where the direct code is below 2^-6."""
    x = _rows(k=390)
    c, gamax = ref.quantize_pow2_granules_ref(x)
    q, s = ref.quantize_pow2_ref(x)
    e_g = ref.pow2_exponent_ref(gamax)
    e_row = ref.pow2_exponent_ref(gamax.amax(1, keepdim=True))
    assert torch.equal(e_row, e_g.amax(1, keepdim=True)) and torch.equal(ref._exp2i(e_row), s)
    shift = ref._exp2i(e_g - e_row).repeat_interleave(128, dim=1)[:, :x.shape[1]]
    moved = (c.float() * shift).to(torch.float8_e4m3fn).float()
    _check_codes(moved, q.float(), max_fraction=0.02)


def _check_codes(got: torch.Tensor, want: torch.Tensor, max_fraction: float) -> int:
    """Codes equal except at most one subnormal step (2^-9) where the reference code is below 2^-6;
    the number of such codes at most ``max_fraction`` of all codes. Returns that number."""
    diff = got != want
    assert torch.all(want[diff].abs() < SUB), "a normal code differs"
    assert torch.all((got[diff] - want[diff]).abs() == 2.0 ** -9), "more than one subnormal step"
    n = int(diff.sum())
    assert n <= max_fraction * want.numel(), (n, want.numel())
    return n


# ----------------------------------------------------------------------- Triton: GEMM + requant

triton_only = pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
needs_tma = pytest.mark.skipif(has_cuda() and not sm_at_least(9), reason="TMA needs sm90+")


def _operands(m, k, n, fmt="fp8", seed=0, zero_row=None, outlier=True, dev=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    if outlier:
        x[m // 2, k // 3] = 300.0
    w = torch.randn(n, k, generator=g) * 0.08
    if outlier:
        w[n // 3] *= 40.0  # an outlier output column: its granule dominates every row
    qx, sx = ref.quantize_ref(x, fmt, "per_token")
    if zero_row is not None:
        qx[zero_row] = 0  # with no bias: h = GELU(0) = 0, the row at the floor scale
    qw, sw = quantize_weight(w, fmt, "per_channel")
    b = None if zero_row is not None else torch.randn(n, generator=g)
    return [t.to(dev or kernel_device()) if t is not None else None for t in (qx, sx, qw, sw, b)]


def _bf16_h(ops, **kw):
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_triton

    return w8a8_gemm_gelu_triton(*ops, "per_token", "per_channel", torch.bfloat16, **kw)[0]


def _pow2(ops, **kw):
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_quant_triton

    return w8a8_gemm_gelu_quant_triton(*ops, "per_token", "per_channel", torch.bfloat16, "fp8", out_scale="pow2", **kw)


# fixed TMA configs: stored widths 128 (one granule), 2 x 128 (the second half of the last N tile may lie
# wholly past N), 256 (two granules per store: the reshape branch)
TMA_CFGS = {
    "bn128": {"BLOCK_M": 64, "BLOCK_N": 128, "EPILOGUE_SUBTILE": False},
    "bn256sub": {"BLOCK_M": 64, "BLOCK_N": 256, "EPILOGUE_SUBTILE": True},
    "bn256": {"BLOCK_M": 64, "BLOCK_N": 256, "EPILOGUE_SUBTILE": False},
}
# M odd / a partial 64-row tile; N = 272 = 2 granules + 16 columns (N % 16 == 0 for the code rows, not a
# multiple of 128 nor of BLOCK_N = 256); K = 160 (a partial K tile)
CASES = {"odd": dict(m=37, k=160, n=272, seed=1), "zero_row": dict(m=70, k=128, n=400, seed=2, zero_row=9)}


@triton_only
@needs_tma
@pytest.mark.parametrize("cfg", list(TMA_CFGS))
@pytest.mark.parametrize("case", list(CASES))
def test_tma_pow2_epilogue_and_requant_vs_reference(cfg, case):
    from turbocompile.kernels.w8a8.triton_gemm_tma import w8a8_gemm_tma
    from turbocompile.kernels.w8a8.triton_pow2 import requant_pow2_triton

    c = CASES[case]
    ops = _operands(c["m"], c["k"], c["n"], seed=c["seed"], zero_row=c.get("zero_row"))
    m, n = c["m"], c["n"]
    h = _bf16_h(ops, use_tma=True, tma_config=TMA_CFGS[cfg])  # the same GEMM storing bf16 h
    # step 1: the epilogue's codes at per-granule pow2 scales and the granule maxima, exactly
    pa = torch.empty((m, -(-n // 128)), dtype=torch.float32, device=h.device)
    codes = w8a8_gemm_tma(*ops, torch.bfloat16, config=TMA_CFGS[cfg], activation="gelu_tanh", amax_mode="pow2",
                          amax_out=pa)
    c_ref, ga_ref = ref.quantize_pow2_granules_ref(h.cpu())
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (m, n)
    assert torch.equal(pa.cpu(), ga_ref) and torch.equal(codes.cpu().float(), c_ref.float())
    # step 2: requantized in place to the row scale
    q, s = requant_pow2_triton(codes, pa)
    q_ref, s_ref = ref.quantize_pow2_ref(h.cpu())
    assert q.data_ptr() == codes.data_ptr() and torch.equal(s.cpu(), s_ref)
    _check_codes(q.cpu().float(), q_ref.float(), max_fraction=0.01)
    # the op-level entry point: the same route (TMA + requant) and the same result
    q2, s2 = _pow2(ops, use_tma=True, tma_config=TMA_CFGS[cfg])
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    if "zero_row" in c:
        r = c["zero_row"]
        assert s[r].item() == 2.0 ** -35 and torch.all(q[r].float() == 0)


@triton_only
@needs_tma
def test_tma_pow2_mismatches_are_rare_subnormal_steps_on_a_larger_case():
    """Counted on a case with many subnormal codes (outlier rows and an outlier column)."""
    ops = _operands(130, 256, 1024, seed=4)
    h = _bf16_h(ops, use_tma=True, tma_config=TMA_CFGS["bn256sub"])
    q, s = _pow2(ops, use_tma=True, tma_config=TMA_CFGS["bn256sub"])
    q_ref, s_ref = ref.quantize_pow2_ref(h.cpu())
    assert torch.equal(s.cpu(), s_ref)
    want = q_ref.float()
    n_sub = int(((want.abs() < SUB) & (want != 0)).sum())
    n_bad = _check_codes(q.cpu().float(), want, max_fraction=0.01)
    # among the nonzero subnormal codes: ~15% here (5024 of them). A code c at the granule scale with d >= 1
    # carries one or two bits below the row-scale quantum; when those make a tie, RNE can pick the other
    # side than direct rounding would: at most ~1/4 of the codes in [2^-7, 2^-6), fewer below
    assert n_sub > 1000 and n_bad <= 0.25 * n_sub, (n_bad, n_sub)


@triton_only
@pytest.mark.parametrize("fmt,use_tma,n", [("fp8", False, 272), ("int8", None, 272), ("fp8", True, 264)],
                         ids=["pointer", "int8_gemm", "tma_n_not_16"])
def test_fallback_routes_quantize_bf16_h_bit_for_bit(fmt, use_tma, n):
    """Routes without the FP8 epilogue (the pointer kernel; an INT8 GEMM, which takes it by default; the
    TMA kernel with N % 16 != 0): bf16 h + partial amax, then pow2 quantization of h (one rounding)."""
    if use_tma and has_cuda() and not sm_at_least(9):
        pytest.skip("TMA needs sm90+")
    ops = _operands(37, 160, n, fmt=fmt, seed=3)
    h = _bf16_h(ops, use_tma=use_tma)
    q, s = _pow2(ops, use_tma=use_tma)
    q_ref, s_ref = ref.quantize_pow2_ref(h.cpu())
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu().float(), q_ref.float())


@triton_only
def test_pow2_from_amax_on_h_and_degenerate_shapes():
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_triton
    from turbocompile.kernels.w8a8.triton_pow2 import quantize_pow2_from_amax_triton

    dev = kernel_device()
    x = _rows(k=390).to(dev)
    _, gamax = ref.quantize_pow2_granules_ref(x.cpu())
    q, s = quantize_pow2_from_amax_triton(x, gamax.to(dev))
    q_ref, s_ref = ref.quantize_pow2_ref(x.cpu())
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu().float(), q_ref.float())
    ops = _operands(9, 128, 140, seed=5)
    q0, s0 = _pow2([ops[0][:0], ops[1][:0], *ops[2:]])  # M = 0
    assert q0.shape == (0, 140) and s0.shape == (0, 1)
    h, pa = w8a8_gemm_gelu_triton(*ops[:2], ops[2][:0], ops[3][:0], None, "per_token", "per_channel",
                                  torch.bfloat16, amax_mode="partial")  # N = 0: every row at the floor
    qn, sn = quantize_pow2_from_amax_triton(h, pa)
    assert qn.shape == (9, 0) and torch.all(sn == 2.0 ** -35)
    with pytest.raises(ValueError, match=r"amax must be fp32 \[M, ceil\(N/128\)\]"):
        quantize_pow2_from_amax_triton(x, gamax[:, :2].to(dev))


@triton_only
@needs_tma
def test_tma_pow2_k0_keeps_the_contract():
    """K = 0 (a view, so the rows stay 16-byte aligned): h = GELU(bias) in every row."""
    from turbocompile.kernels.w8a8.triton_gemm_tma import w8a8_gemm_tma

    qx, sx, qw, sw, b = _operands(20, 128, 272, seed=6)
    pa = torch.empty((20, 3), dtype=torch.float32, device=qx.device)
    codes = w8a8_gemm_tma(qx[:, :0], sx, qw[:, :0], sw, b, torch.bfloat16, activation="gelu_tanh",
                          amax_mode="pow2", amax_out=pa)
    h = torch.nn.functional.gelu(b.cpu().float(), approximate="tanh").to(torch.bfloat16).expand(20, 272)
    c_ref, ga_ref = ref.quantize_pow2_granules_ref(h)
    assert torch.equal(codes.cpu().float(), c_ref.float()) and torch.equal(pa.cpu(), ga_ref)


@triton_only
@needs_tma
def test_pow2_argument_errors():
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_quant_triton
    from turbocompile.kernels.w8a8.triton_gemm_tma import w8a8_gemm_tma
    from turbocompile.kernels.w8a8.triton_pow2 import requant_pow2_triton

    ops = _operands(20, 128, 264, seed=7)
    args = (*ops, "per_token", "per_channel", torch.bfloat16)
    with pytest.raises(ValueError, match="out_scale 'pow2' needs out_format 'fp8'"):
        w8a8_gemm_gelu_quant_triton(*args, "int8", out_scale="pow2")
    with pytest.raises(ValueError, match="unknown out_scale 'po2'; valid: amax, pow2"):
        w8a8_gemm_gelu_quant_triton(*args, "fp8", out_scale="po2")
    pa = torch.empty((20, 3), dtype=torch.float32, device=ops[0].device)
    with pytest.raises(ValueError, match="N must be a multiple of 16, got 264"):
        w8a8_gemm_tma(*ops, torch.bfloat16, activation="gelu_tanh", amax_mode="pow2", amax_out=pa)
    ops = _operands(20, 128, 272, seed=7)
    with pytest.raises(ValueError, match="amax_mode='pow2' needs the stored tile width"):
        w8a8_gemm_tma(*ops, torch.bfloat16, activation="gelu_tanh", amax_mode="pow2", amax_out=pa,
                      config={"BLOCK_N": 128, "EPILOGUE_SUBTILE": True})
    with pytest.raises(ValueError, match="needs amax_out"):
        w8a8_gemm_tma(*ops, torch.bfloat16, activation="gelu_tanh", amax_mode="pow2")
    with pytest.raises(ValueError, match="codes must be 2-D float8_e4m3fn"):
        requant_pow2_triton(torch.zeros(4, 128, device=pa.device), pa[:4, :1])


# ------------------------------------------------------------------- sm90 build (no GPU needed)


def _sm90_pow2_ptx() -> tuple[str, str]:
    """PTX of (the FP8 TMA GELU GEMM with the pow2-codes epilogue, the requant kernel) built for sm90:
    the Wan config (128x256, 8 warps, 3 stages, subtiled), GPU forms (tanh GELU, hardware e4m3 cast)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from turbocompile.kernels.w8a8.triton_gemm_tma import _w8a8_gemm_tma_kernel as gemm
    from turbocompile.kernels.w8a8.triton_pow2 import _pow2_rows_kernel as rows

    target = GPUTarget("cuda", 90, 32)
    sig = {name: "i32" for name in gemm.arg_names}
    sig.update(a_desc="tensordesc<fp8e4nv[128,128]>", w_desc="tensordesc<fp8e4nv[256,128]>",
               y_desc="tensordesc<fp8e4nv[128,128]>", sa_ptr="*fp32", sw_ptr="*fp32", bias_ptr="*bf16",
               amax_ptr="*fp32")
    const = dict(IS_FP8=True, FP8_PROMOTE=False, GELU_SHORT=True,
                 HAS_BIAS=True, OUT_KIND=0, ACTIVATION=1, ROUND_BF16=False, NATIVE=2, AMAX_MODE=3,
                 RESIDUAL=0, RES_TMA=False, GATE_MODE=0, r_desc=None,
                 GRANULE=128, NUM_SMS=132, FLATTEN=True, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8,
                 EPILOGUE_SUBTILE=True)
    sig.update({key: "constexpr" for key in const})
    ptx_gemm = triton.compile(ASTSource(gemm, sig, constexprs=const), target=target,
                              options={"num_warps": 8, "num_stages": 3}).asm["ptx"]
    sig = {name: "i32" for name in rows.arg_names}
    sig.update(x_ptr="*fp8e4nv", amax_ptr="*fp32", q_ptr="*fp8e4nv", s_ptr="*fp32")
    const = dict(IN_CODES=True, NATIVE=True, GRANULE=128, BLOCK_M=4, BLOCK_G=128, CHUNK_G=8)
    sig.update({key: "constexpr" for key in const})
    # the launch-time specialization of 16-divisible pointers / ints (N = 8960 and its strides): without it the
    # masked code loads could not be vectorized
    div16 = ("x_ptr", "amax_ptr", "q_ptr", "s_ptr", "N", "stride_xm", "stride_amax_m", "stride_qm")
    attrs = {(rows.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    ptx_rows = triton.compile(ASTSource(rows, sig, constexprs=const, attrs=attrs), target=target,
                              options={"num_warps": 4}).asm["ptx"]
    return ptx_gemm, ptx_rows


def _count(ptx: str) -> list[int]:
    return [ptx.count("cvt.rn.satfinite.e4m3x2.f32"), ptx.count("wgmma.mma_async"), ptx.count("tanh.approx.f32"),
            ptx.count("cp.async.bulk.tensor"), ptx.count("lg2.approx") + ptx.count("ex2.approx"),
            ptx.count("ld.global.v4.b32") + ptx.count("st.global.v4.b32"), ptx.count("ld.global.b8")]


def test_pow2_kernels_build_for_sm90():
    """Both kernels compile for sm90 (child process: the test session runs under TRITON_INTERPRET); the
    epilogue converts with the saturating RNE e4m3 cvt and stores codes through TMA, no float log2/exp2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    code = ("from tests.kernels.test_w8a8_pow2 import _sm90_pow2_ptx, _count; g, r = _sm90_pow2_ptx(); "
            "print(*_count(g), *_count(r))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    g_cvt, g_mma, g_tanh, g_tma, g_log, _, _, r_cvt, r_mma, _, _, r_log, r_v4, r_b8 = map(int, run.stdout.split()[-14:])
    assert g_cvt > 0 and g_mma > 0 and g_tanh > 0 and g_tma > 0 and g_log == 0
    assert r_cvt > 0 and r_mma == 0 and r_log == 0 and r_v4 > 0 and r_b8 == 0  # 16-byte code loads/stores
