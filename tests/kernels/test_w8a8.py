"""W8A8 kernels (Triton, interpreter on CPU) vs the PyTorch references in kernels/w8a8/ref.py."""

from __future__ import annotations

import pytest
import torch

from tests._bits import COMPILED
from tests._env import kernel_device, triton_runs_here
from turbocompile.kernels.w8a8 import ref

pytestmark = pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")

DEV = kernel_device()
FORMATS = ("int8", "fp8")

# fp32-output GEMMs vs the fp64 reference. INT8 partials are integers summed exactly in int32, and in the
# interpreter e4m3 products are summed in fp32 too, so only the fp32 rounding of the scaled sums is
# left: < 1e-6. Compiled for Hopper, Triton's FP8 tl.dot is wgmma adding the e4m3 products in the
# tensor core's reduced-precision accumulator (about 14 mantissa bits, the limited FP8 accumulation
# precision of the DeepSeek-V3 report; Triton's sm90 default max_num_imprecise_acc does not promote to
# fp32 during the K loop): measured on an H100 (Triton 3.6) up to 9.6e-5 for the plain GEMMs, 1.2e-4 for
# the block128 variants and 1.1e-4 with the fused activation quantizer; the bound is ~4x the largest.
# INT8 stays exact (measured <= 6.4e-8 there, the fp32 rounding of the scaled sums).
FP8_ACC_REL = 5e-4


def _tol32(fmt: str) -> float:
    """Relative bound of an fp32-output GEMM vs the fp64 reference (see FP8_ACC_REL)."""
    return FP8_ACC_REL if (COMPILED and fmt == "fp8") else 1e-6


def _quant():
    from turbocompile.kernels.w8a8.triton_quant import quantize_triton

    return quantize_triton


def _gemm():
    from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton

    return w8a8_gemm_triton


def _sqnr_db(ref_out: torch.Tensor, out: torch.Tensor) -> float:
    ref_out, out = ref_out.double(), out.double()
    return float(10 * torch.log10(ref_out.pow(2).sum() / (out - ref_out).pow(2).sum()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------------ quantizers


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("gran", ["block128", "per_token"])
@pytest.mark.parametrize("m,k", [(1, 128), (7, 200), (121, 96), (300, 256)])
def test_quantizer_bit_exact(fmt, gran, m, k):
    x = (torch.randn(m, k) * 3).to(torch.bfloat16).to(DEV)
    x[0, 0] = -50.0  # an outlier
    q, s = _quant()(x, fmt, gran)
    qr, sr = ref.quantize_ref(x, fmt, gran)
    want = (-(-m // 128), -(-k // 128)) if gran == "block128" else (m, 1)
    assert tuple(s.shape) == want and s.dtype == torch.float32
    assert torch.equal(s, sr)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)), "8-bit codes differ from the reference"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cfg", [dict(kernel="rows"), dict(kernel="rows", split=False),
                                 dict(kernel="rows", block_m=1, num_warps=4), dict(kernel="loop")])
@pytest.mark.parametrize("m,k", [(1, 16), (7, 200), (11, 384), (9, 1536), (3, 5120)])
def test_quantizer_rows_kernel_bit_exact(fmt, cfg, m, k):
    """The one/two-tile per-token kernel with the lean quantizer (one clamp; int8 code from the low
    byte of bits(v + 1.5·2^23)) gives the reference's codes and scales: outliers of either sign
    (codes -128 / +127), an all-zero row, ties (exact halves after scaling). kernel="loop" is the
    original per-token kernel, here (K <= 16384) on its ONE_PASS branch (rows kept in registers),
    which the default config never runs."""
    x = (torch.randn(m, k) * 3).to(torch.bfloat16)
    x[0, 0] = -50.0
    if m > 2:
        x[1] = 0.0
        x[2, 1] = 64.0
        x[2, 2] = 0.25  # 0.25 * 128 / 64 = 0.5: a tie, rounds to 0
        x[2, 3] = -0.75  # -1.5: rounds to -2
    x = x.to(DEV)
    q, s = _quant()(x, fmt, "per_token", config=cfg)
    qr, sr = ref.quantize_ref(x, fmt, "per_token")
    assert torch.equal(s, sr)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)), "8-bit codes differ from the reference"
    if fmt == "int8":
        assert q[0].min().item() == -128 and (m <= 2 or q[2].max().item() == 127)


def test_quantizer_per_token_two_pass_and_fp32_strided():
    # K > 16384 takes the two-sweep path; a transposed fp32 view checks strides.
    x = torch.randn(3, 17000, device=DEV)
    for fmt in FORMATS:
        q, s = _quant()(x, fmt, "per_token")
        qr, sr = ref.quantize_ref(x, fmt, "per_token")
        assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    xt = torch.randn(200, 130, device=DEV).t()
    q, s = _quant()(xt, "int8", "block128")
    qr, sr = ref.quantize_ref(xt.contiguous(), "int8", "block128")
    assert torch.equal(q, qr) and torch.equal(s, sr)


@pytest.mark.parametrize("gran", ["block128", "per_token"])
def test_int8_saturation_at_amax(gran):
    x = torch.rand(130, 200, device=DEV) * 2 - 1
    x[5, 7] = 4.0  # +amax of its row / block -> 128 -> saturates to 127
    x[6, 9] = -4.0  # -amax -> -128 exactly
    for impl in (_quant(), ref.quantize_ref):
        q, s = impl(x.to(torch.bfloat16), "int8", gran)
        assert q[5, 7].item() == 127 and q[6, 9].item() == -128
        assert q.min().item() >= -128 and q.max().item() <= 127
        s_blk = s[0, 0] if gran == "block128" else s[5, 0]
        assert s_blk.item() == 4.0 / 128


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("gran", ["block128", "per_token"])
def test_zero_and_constant_inputs(fmt, gran):
    # +c -> +amax -> 127 (int8, saturated) or 448 (fp8); -c -> -128 / -448
    pos, neg = (127.0, -128.0) if fmt == "int8" else (448.0, -448.0)
    for fill in (0.0, 0.75, -3.0):
        x = torch.full((7, 200), fill, device=DEV, dtype=torch.bfloat16)
        for impl in (_quant(), ref.quantize_ref):
            q, s = impl(x, fmt, gran)
            assert torch.isfinite(s).all() and (s > 0).all()
            qf = q.float()
            assert not torch.isnan(qf).any()
            if fill == 0.0:
                assert (qf == 0).all()
            else:
                assert (qf == (pos if fill > 0 else neg)).all()
    # a zero block next to a non-zero one: finite scale, zeros stay zeros, GEMM output finite
    x = torch.zeros(130, 256, device=DEV, dtype=torch.bfloat16)
    x[:, 128:] = torch.randn(130, 128, device=DEV, dtype=torch.bfloat16)
    q, s = _quant()(x, fmt, gran)
    assert torch.isfinite(s).all() and (q[:, :128].float() == 0).all()


# ----------------------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize("ag,wg", [("block128", "block128"), ("per_token", "per_channel"),
                                   ("block128", "per_channel"), ("per_token", "block128")])
@pytest.mark.parametrize("m,k,n", [(7, 200, 96), (130, 256, 128)])
def test_int8_accumulation_is_exact(ag, wg, m, k, n):
    # Unit scales + fp32 output: every partial sum is an integer below 2^24, so the Triton result
    # must equal the int64 matmul bit for bit (before any scaling happens).
    qa = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=DEV)
    qw = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEV)
    qa[0] = -128
    qw[0] = -128  # extreme products
    kb = -(-k // 128)
    sa = torch.ones((-(-m // 128), kb) if ag == "block128" else (m, 1), device=DEV)
    sw = torch.ones((-(-n // 128), kb) if wg == "block128" else (n, 1), device=DEV)
    y = _gemm()(qa, sa, qw, sw, None, ag, wg, torch.float32)
    exact = (qa.long().cpu() @ qw.long().cpu().T).float()
    assert torch.equal(y.cpu(), exact)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("ag,wg", [("block128", "block128"), ("per_token", "per_channel"), ("per_token", "block128"),
                                   ("block128", "per_channel")])
@pytest.mark.parametrize("m,k,n", [(1, 128, 200), (121, 200, 96), (300, 96, 256)])
def test_gemm_vs_fp64_reference(fmt, ag, wg, m, k, n):
    """k=200: two K blocks with their own activation scales (block128 activations), so a scale taken
    from the wrong K block shows; unit-scale exactness is test_int8_accumulation_is_exact's."""
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV) * 0.05
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    qa, sa = ref.quantize_ref(x, fmt, ag)
    qw, sw = ref.quantize_ref(w, fmt, wg)
    out = _gemm()(qa, sa, qw, sw, bias, ag, wg, torch.float32)
    want = ref.w8a8_gemm_ref(qa, sa, qw, sw, bias, ag, wg, torch.float32)
    assert not torch.isnan(out).any()
    # fp32 accumulation of exact integer/e4m3 partials: only fp32 rounding of the scaled sums (and on a
    # GPU, wgmma's FP8 accumulator: FP8_ACC_REL).
    rel = _rel(out, want)
    assert rel < _tol32(fmt), rel
    ybf = _gemm()(qa, sa, qw, sw, bias, ag, wg, torch.bfloat16)
    assert ybf.dtype == torch.bfloat16 and _rel(ybf, want) < 8e-3  # bf16 output rounding


BLOCK_VARIANTS = [("int8", "v1"), ("int8", "scalar"), ("int8", "magic"), ("fp8", "v1"), ("fp8", "scalar"),
                  ("fp8", "skew")]


@pytest.mark.parametrize("variant", ["v1", "scalar", "magic"])
@pytest.mark.parametrize("m,k,n", [(7, 200, 96), (130, 384, 200)])
def test_block_variants_int8_exact(variant, m, k, n):
    # Every block128 x block128 kernel variant: integer partials converted exactly (incl. the
    # exponent-trick conversion at the extreme partial -128*-128*128 = 2^21), unit scales.
    qa = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=DEV)
    qw = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEV)
    qa[0] = -128
    qw[0] = -128
    qa[1] = -128
    qw[1] = 127
    kb = -(-k // 128)
    sa = torch.ones((-(-m // 128), kb), device=DEV)
    sw = torch.ones((-(-n // 128), kb), device=DEV)
    y = _gemm()(qa, sa, qw, sw, None, "block128", "block128", torch.float32, block_variant=variant)
    assert torch.equal(y.cpu(), (qa.long().cpu() @ qw.long().cpu().T).float())


@pytest.mark.parametrize("fmt,variant", BLOCK_VARIANTS)
@pytest.mark.parametrize("m,k,n", [(1, 128, 200), (121, 520, 96)])
def test_block_variants_vs_fp64_reference(fmt, variant, m, k, n):
    # Per-block scales that differ along K, rows and columns (a wrong scale index must show);
    # k=520 gives 5 K blocks with a 8-wide tail (skewed loop prologue/epilogue + masking).
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    x[:, 128:256] *= 20.0
    w = torch.randn(n, k, device=DEV) * 0.05
    w[:64] *= 0.1
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    qa, sa = ref.quantize_ref(x, fmt, "block128")
    qw, sw = ref.quantize_ref(w, fmt, "block128")
    out = _gemm()(qa, sa, qw, sw, bias, "block128", "block128", torch.float32, block_variant=variant)
    want = ref.w8a8_gemm_ref(qa, sa, qw, sw, bias, "block128", "block128", torch.float32)
    assert not torch.isnan(out).any()
    rel = _rel(out, want)
    assert rel < _tol32(fmt), rel
    ybf = _gemm()(qa, sa, qw, sw, bias, "block128", "block128", torch.bfloat16, block_variant=variant)
    assert _rel(ybf, want) < 8e-3


def test_block_variant_errors():
    qa = torch.zeros(4, 128, dtype=torch.int8, device=DEV)
    s = torch.ones(1, 1, device=DEV)
    with pytest.raises(ValueError, match="unknown block_variant"):
        _gemm()(qa, s, qa, s, None, "block128", "block128", torch.float32, block_variant="nope")
    with pytest.raises(ValueError, match="fp8 only"):
        _gemm()(qa, s, qa, s, None, "block128", "block128", torch.float32, block_variant="skew")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("wg", ["block128", "per_channel"])
def test_fused_activation_quant_gemm(fmt, wg):
    m, k, n = 130, 200, 96
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16) * 2
    w = torch.randn(n, k, device=DEV) * 0.05
    qw, sw = ref.quantize_ref(w, fmt, wg)
    out = _gemm()(x, None, qw, sw, None, "block128", wg, torch.float32, fuse_quant=True)
    want = ref.w8a8_linear_ref(x.float(), qw, sw, None, fmt, "block128", wg)
    rel = _rel(out, want)
    assert rel < _tol32(fmt), rel


def test_sqnr_report_vs_float_linear(capsys):
    """SQNR of W8A8 vs the float linear on Gaussian data, every format/granularity (printed)."""
    m, k, n = 256, 384, 256
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV) * k**-0.5
    y_float = torch.nn.functional.linear(x.double(), w.double())
    rows = []
    for fmt in FORMATS:
        for ag in ("block128", "per_token"):
            for wg in ("block128", "per_channel"):
                qa, sa = _quant()(x, fmt, ag)
                qw, sw = ref.quantize_ref(w, fmt, wg)
                y = _gemm()(qa, sa, qw, sw, None, ag, wg, torch.float32)
                db = _sqnr_db(y_float, y)
                rows.append((fmt, ag, wg, db))
                floor = 30.0 if fmt == "int8" else 25.0  # e4m3 keeps 3 mantissa bits: ~31 dB
                assert db >= floor, (fmt, ag, wg, db)
    with capsys.disabled():
        print("\nW8A8 SQNR vs float linear (Gaussian x, w):")
        for fmt, ag, wg, db in rows:
            print(f"  {fmt:5s} act={ag:9s} weight={wg:11s} {db:5.1f} dB")
    int8_block = [r[3] for r in rows if r[:3] == ("int8", "block128", "block128")][0]
    assert int8_block >= 30.0
