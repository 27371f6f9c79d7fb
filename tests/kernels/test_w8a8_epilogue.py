"""Triton GEMM + GELU(tanh) epilogue (+ per-token quantization of its output) vs the references."""

from __future__ import annotations

import pytest
import torch

from tests._bits import COMPILED
from tests._env import has_cuda, kernel_device, sm_at_least, triton_runs_here
from turbocompile.kernels.w8a8 import ref
from turbocompile.ops.w8a8 import quantize_weight

pytestmark = pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")

# Relative bounds of the fp32 GELU output vs the fp64 truth (and vs the unfused fp32 reference). In the
# interpreter: one fp32 rounding of exact sums and a correctly rounded GELU, < 1e-6. Compiled:
# - FP8: Hopper's FP8 wgmma adds the e4m3 products in the tensor core's reduced-precision accumulator
#   (about 14 mantissa bits, the limited FP8 accumulation of the DeepSeek-V3 report; Triton's sm90
#   default does not promote to fp32 during the K loop). Measured on an H100 (Triton 3.6): 2.1e-4 for
#   the pointer kernel and 3.5e-4 for the TMA kernel, both on operands with an outlier activation
#   (its row is dominated by one product, whose magnitude sets the accumulator's truncation); ~4x.
# - INT8 accumulates exactly (int32), but the GPU GELU is PTX tanh.approx.f32 (_epilogue_math,
#   GELU_NATIVE_FORM; documented max relative error ~2^-11, far less on average) with FMA-contracted
#   polynomials: measured 1.15e-6 on an H100 (a single 128-wide row with no outlier); ~3.5x.
FP8_ACC_REL = 1.5e-3
GELU_APPROX_REL = 4e-6


def _tol32(fmt: str) -> float:
    """Bound of the fp32-output GELU GEMM's relative error (see FP8_ACC_REL, GELU_APPROX_REL)."""
    if not COMPILED:
        return 1e-6
    return FP8_ACC_REL if fmt == "fp8" else GELU_APPROX_REL


def _operands(m, k, n, fmt, ag, wg, dev, seed=0, outlier=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    if outlier:
        x[m // 2, k // 3] = 300.0  # one huge activation: its row's scale absorbs it
    w = torch.randn(n, k, generator=g) * 0.08
    b = torch.randn(n, generator=g)
    qx, sx = ref.quantize_ref(x, fmt, ag)
    qw, sw = quantize_weight(w, fmt, wg)
    return [t.to(dev) for t in (qx, sx, qw, sw, b)]


CASES = [  # m, k, n, fmt, act, weight
    (37, 200, 300, "int8", "per_token", "per_channel"),
    (70, 256, 130, "int8", "block128", "block128"),
    (33, 130, 257, "fp8", "per_token", "per_channel"),
    (1, 128, 128, "int8", "per_token", "block128"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gelu_epilogue_matches_reference(case, dt):
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_triton

    m, k, n, fmt, ag, wg = case
    qx, sx, qw, sw, b = _operands(m, k, n, fmt, ag, wg, kernel_device(), outlier=m > 1)
    # fp64 truth: exact GEMM, GELU in fp64, no intermediate rounding
    y64 = ref.w8a8_gemm_ref(qx.cpu(), sx.cpu(), qw.cpu(), sw.cpu(), b.cpu(), ag, wg, torch.float64)
    truth = torch.nn.functional.gelu(y64, approximate="tanh")
    h, amax = w8a8_gemm_gelu_triton(qx, sx, qw, sw, b, ag, wg, dt)
    assert amax is None and h.dtype == dt and h.shape == (m, n)
    rel = ((h.cpu().double() - truth).norm() / truth.norm()).item()
    # one rounding to dt (the unfused reference rounds twice); compiled, see FP8_ACC_REL / GELU_APPROX_REL
    tol32 = _tol32(fmt)
    assert rel < (2.5e-3 if dt == torch.bfloat16 else tol32), rel
    unfused = ref.w8a8_gemm_gelu_ref(qx.cpu(), sx.cpu(), qw.cpu(), sw.cpu(), b.cpu(), ag, wg, dt)
    rel_u = ((h.cpu().float() - unfused.float()).norm() / unfused.float().norm()).item()
    assert rel_u < (6e-3 if dt == torch.bfloat16 else tol32), rel_u


@pytest.mark.parametrize("mode", ["partial", "atomic", "none"])
@pytest.mark.parametrize("out_fmt", ["int8", "fp8"])
def test_gelu_quant_codes_equal_quantizing_the_stored_output(mode, out_fmt):
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_quant_triton, w8a8_gemm_gelu_triton

    m, k, n = 45, 200, 390  # n: 3 full granules + a partial one
    qx, sx, qw, sw, b = _operands(m, k, n, "int8", "per_token", "per_channel", kernel_device(), seed=3, outlier=True)
    q, s = w8a8_gemm_gelu_quant_triton(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16, out_fmt,
                                       amax_mode=mode)
    h, _ = w8a8_gemm_gelu_triton(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16)
    q_ref, s_ref = ref.quantize_ref(h.cpu(), out_fmt, "per_token")
    assert q.dtype == ref.quant_dtype(out_fmt) and s.shape == (m, 1)
    assert torch.equal(s.cpu(), s_ref)
    # equal values (the e4m3 sign of a zero may differ from torch's cast, as in triton_quant)...
    assert torch.equal(q.cpu().float(), q_ref.float())
    # ...and bit-identical to the standalone Triton per-token quantizer on the same h
    from turbocompile.kernels.w8a8.triton_quant import quantize_triton

    q_t, s_t = quantize_triton(h, out_fmt, "per_token")
    assert torch.equal(s, s_t)
    if COMPILED and out_fmt == "fp8":
        # Same h, same amax, same scale, so the same code values; only the sign of a zero code may differ:
        # on a GPU the standalone per-token quantizer casts with the hardware's cvt (-0 for a small negative
        # value), the fused one (quant_scale_math) rounds to the e4m3 grid in fp32 first, whose subnormal
        # add-and-subtract turns those values into +0.
        assert torch.equal(q.float(), q_t.float())
        nonzero = q_t.float() != 0
        assert torch.equal(q.view(torch.uint8)[nonzero], q_t.view(torch.uint8)[nonzero])
    else:
        assert torch.equal(q.view(torch.uint8), q_t.view(torch.uint8))


def test_partial_amax_buffer_holds_granule_maxima():
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import AMAX_GRANULE, w8a8_gemm_gelu_triton

    m, k, n = 20, 128, 300
    qx, sx, qw, sw, b = _operands(m, k, n, "int8", "per_token", "per_channel", kernel_device(), seed=5)
    h, pa = w8a8_gemm_gelu_triton(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16, amax_mode="partial")
    hp = torch.nn.functional.pad(h.cpu().float().abs(), (0, 3 * AMAX_GRANULE - n))
    want = hp.view(m, 3, AMAX_GRANULE).amax(-1)
    assert torch.equal(pa.cpu(), want)


def test_zero_rows_and_degenerate_shapes():
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_quant_triton

    dev = kernel_device()
    m, k, n = 9, 128, 140
    qx, sx, qw, sw, _ = _operands(m, k, n, "int8", "per_token", "per_channel", dev, seed=7)
    qx[2:5] = 0  # GELU(0 + no bias) = 0: amax floor keeps the scale finite, codes all zero
    q, s = w8a8_gemm_gelu_quant_triton(qx, sx, qw, sw, None, "per_token", "per_channel", torch.bfloat16, "int8")
    assert torch.all(q[2:5] == 0) and torch.all(torch.isfinite(s)) and torch.all(s[2:5] == 1e-8 / 128)
    q0, s0 = w8a8_gemm_gelu_quant_triton(qx[:0], sx[:0], qw, sw, None, "per_token", "per_channel",
                                         torch.bfloat16, "int8")
    assert q0.shape == (0, n) and s0.shape == (0, 1)


def test_bad_amax_mode_and_config():
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_triton

    qx, sx, qw, sw, b = _operands(4, 128, 128, "int8", "per_token", "per_channel", kernel_device())
    with pytest.raises(ValueError, match="amax_mode"):
        w8a8_gemm_gelu_triton(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16, amax_mode="max")
    with pytest.raises(ValueError, match="multiple of 128"):
        w8a8_gemm_gelu_triton(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16,
                              config={"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 4, "num_warps": 4, "num_stages": 1})


# ------------------------------------------------------------ TMA kernel with the GELU / amax epilogue
#
# Per-token x per-channel GELU GEMMs run the persistent TMA kernel (triton_gemm_tma) when
# use_tma=True (the default only on CUDA sm90+). Under the interpreter it must agree bit for bit with
# the pointer kernel above (same epilogue order of fp32 operations, explicit bf16 rounding in both).

needs_tma = pytest.mark.skipif(has_cuda() and not sm_at_least(9), reason="TMA needs sm90+")

# M, N, K tails: M = 70 (second 64-row tile mostly empty), N = 264 = 2 granules + 8 columns (N * 2 % 16
# == 0 for the bf16 TMA store), K = 160 (not a multiple of BLOCK_K = 128)
TMA_MKN = (70, 160, 264)
# fixed TMA configs: stored widths 128, 2 x 128 (second half of the last N tile wholly past N), 256
# (two granules per store); None = the interpreter default (autotuned on a GPU)
TMA_CFGS = {
    "default": None,
    "bn128": {"BLOCK_M": 64, "BLOCK_N": 128, "EPILOGUE_SUBTILE": False},
    "bn256sub": {"BLOCK_M": 64, "BLOCK_N": 256, "EPILOGUE_SUBTILE": True},
    "bn256": {"BLOCK_M": 64, "BLOCK_N": 256, "EPILOGUE_SUBTILE": False},
}


def _tma_operands(fmt, seed=0, outlier=True):
    m, k, n = TMA_MKN
    return _operands(m, k, n, fmt, "per_token", "per_channel", kernel_device(), seed=seed, outlier=outlier)


def _same_as_pointer(fmt: str) -> bool:
    """Bit-identical to the pointer kernel expected: always in the interpreter, int8 on a GPU (exact
    int32 accumulation; Hopper's fp8 wgmma sums in a different order / precision per kernel)."""
    return kernel_device() == "cpu" or fmt == "int8"


@needs_tma
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_tma_gelu_matches_reference_and_pointer_kernel(fmt, has_bias, dt):
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import gelu_gemm_path, w8a8_gemm_gelu_triton

    m, _, n = TMA_MKN
    qx, sx, qw, sw, b = _tma_operands(fmt)
    b = b if has_bias else None
    args = (qx, sx, qw, sw, b, "per_token", "per_channel", dt)
    assert gelu_gemm_path(qx, qw, dt, "per_token", "per_channel", use_tma=True)[0] == "tma"
    h, amax = w8a8_gemm_gelu_triton(*args, use_tma=True, tma_config=TMA_CFGS["bn256sub"])
    assert amax is None and h.dtype == dt and h.shape == (m, n) and not torch.isnan(h).any()
    cpu = [t.cpu() if t is not None else None for t in (qx, sx, qw, sw, b)]
    truth = torch.nn.functional.gelu(ref.w8a8_gemm_ref(*cpu, "per_token", "per_channel", torch.float64),
                                     approximate="tanh")
    rel = ((h.cpu().double() - truth).norm() / truth.norm()).item()
    tol32 = _tol32(fmt)
    assert rel < (2.5e-3 if dt == torch.bfloat16 else tol32), rel
    unfused = ref.w8a8_gemm_gelu_ref(*cpu, "per_token", "per_channel", dt)
    rel_u = ((h.cpu().float() - unfused.float()).norm() / unfused.float().norm()).item()
    assert rel_u < (6e-3 if dt == torch.bfloat16 else tol32), rel_u
    h_ptr, _ = w8a8_gemm_gelu_triton(*args, use_tma=False)
    if _same_as_pointer(fmt):
        assert torch.equal(h, h_ptr)
    else:
        assert ((h.float() - h_ptr.float()).norm() / h_ptr.float().norm()).item() < 6e-3


@needs_tma
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("mode", ["partial", "atomic"])
@pytest.mark.parametrize("cfg", list(TMA_CFGS))
def test_tma_gelu_amax_buffer_holds_maxima_of_stored_output(fmt, mode, cfg):
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import AMAX_GRANULE, w8a8_gemm_gelu_triton

    m, _, n = TMA_MKN
    qx, sx, qw, sw, b = _tma_operands(fmt, seed=5)
    args = (qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16)
    h, amax = w8a8_gemm_gelu_triton(*args, amax_mode=mode, use_tma=True, tma_config=TMA_CFGS[cfg])
    ah = h.cpu().float().abs()
    if mode == "partial":
        g = -(-n // AMAX_GRANULE)
        want = torch.nn.functional.pad(ah, (0, g * AMAX_GRANULE - n)).view(m, g, AMAX_GRANULE).amax(-1)
    else:
        want = ah.amax(dim=1, keepdim=True)
    assert amax.shape == want.shape and torch.equal(amax.cpu(), want)
    if _same_as_pointer(fmt):  # same h, hence the same buffer as the pointer kernel's
        h_ptr, amax_ptr = w8a8_gemm_gelu_triton(*args, amax_mode=mode, use_tma=False)
        assert torch.equal(h, h_ptr) and torch.equal(amax, amax_ptr)


@needs_tma
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("mode", ["partial", "atomic", "none"])
def test_tma_gelu_quant_codes_equal_quantizing_the_stored_output(fmt, mode):
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_quant_triton, w8a8_gemm_gelu_triton

    m, _, n = TMA_MKN
    qx, sx, qw, sw, b = _tma_operands(fmt, seed=3)
    args = (qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16)
    cfg = TMA_CFGS["bn256sub"]
    q, s = w8a8_gemm_gelu_quant_triton(*args, fmt, amax_mode=mode, use_tma=True, tma_config=cfg)
    h, _ = w8a8_gemm_gelu_triton(*args, use_tma=True, tma_config=cfg)
    q_ref, s_ref = ref.quantize_ref(h.cpu(), fmt, "per_token")
    assert q.dtype == ref.quant_dtype(fmt) and q.shape == (m, n) and s.shape == (m, 1)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu().float(), q_ref.float())  # values (the e4m3 sign of a zero may differ)
    if _same_as_pointer(fmt):  # the whole GEMM + quantizer chain as with the pointer kernel
        q_p, s_p = w8a8_gemm_gelu_quant_triton(*args, fmt, amax_mode=mode, use_tma=False)
        assert torch.equal(q.view(torch.uint8), q_p.view(torch.uint8)) and torch.equal(s, s_p)


@needs_tma
def test_tma_gelu_k0_keeps_the_contract():
    """K = 0 (a view, so the rows stay 16-byte aligned and the TMA rule holds): h = GELU(bias)."""
    from turbocompile.kernels.w8a8.triton_gemm_tma import w8a8_gemm_tma

    m, _, n = TMA_MKN
    qx, sx, qw, sw, b = _tma_operands("int8")
    pa = torch.empty((m, 3), dtype=torch.float32, device=qx.device)
    h = w8a8_gemm_tma(qx[:, :0], sx, qw[:, :0], sw, b, torch.bfloat16, activation="gelu_tanh",
                      amax_mode="partial", amax_out=pa)
    want = torch.nn.functional.gelu(b.cpu().float(), approximate="tanh").to(torch.bfloat16).expand(m, n)
    assert torch.equal(h.cpu(), want)
    ah = torch.nn.functional.pad(want.float().abs(), (0, 3 * 128 - n)).view(m, 3, 128).amax(-1)
    assert torch.equal(pa.cpu(), ah)


@needs_tma
def test_tma_gelu_dispatch_rule(monkeypatch):
    from turbocompile.kernels.w8a8 import triton_gemm_epilogue as te
    from turbocompile.kernels.w8a8 import triton_gemm_tma as tt

    qx, sx, qw, sw, b = _tma_operands("int8")
    q8, _, w8, _, _ = _tma_operands("fp8")
    path = te.gelu_gemm_path
    args = ("per_token", "per_channel")
    assert path(qx, qw, torch.bfloat16, *args, use_tma=True) == ("tma", "shape rule holds")
    assert path(qx, qw, torch.bfloat16, *args, use_tma=False) == ("pointer", "TMA off")
    # the default (use_tma=None): INT8 codes keep the pointer kernel everywhere (rule 1: the TMA GELU
    # kernel measured no faster for INT8); FP8 codes take TMA on an sm90+ GPU, never in the interpreter
    assert path(qx, qw, torch.bfloat16, *args) == ("pointer", "INT8 codes (the TMA GELU kernel is no faster)")
    assert path(q8, w8, torch.bfloat16, *args)[0] == ("tma" if kernel_device() == "cuda" else "pointer")
    assert path(qx, qw, torch.bfloat16, "block128", "block128", use_tma=True)[0] == "pointer"
    monkeypatch.setattr(te, "USE_TMA", False)
    assert path(qx, qw, torch.bfloat16, *args) == ("pointer", "TMA off")
    assert path(q8, w8, torch.bfloat16, *args) == ("pointer", "TMA off")
    monkeypatch.setattr(te, "USE_TMA", True)

    # shapes outside the rule run the pointer kernel even when TMA is requested
    def boom(*a, **k):
        raise AssertionError("TMA kernel called for a shape outside its rule")

    monkeypatch.setattr(tt, "w8a8_gemm_tma", boom)
    q2, s2, w2, sw2, b2 = _operands(9, 200, 136, "int8", "per_token", "per_channel", kernel_device())  # K % 16
    kind, why = path(q2, w2, torch.bfloat16, *args, use_tma=True)
    assert kind == "pointer" and "row stride 200 B" in why
    h, pa = te.w8a8_gemm_gelu_triton(q2, s2, w2, sw2, b2, *args, torch.bfloat16, amax_mode="partial", use_tma=True)
    assert h.shape == (9, 136) and pa.shape == (9, 2)
    with pytest.raises(AssertionError, match="TMA kernel called"):
        te.w8a8_gemm_gelu_triton(qx, sx, qw, sw, b, *args, torch.bfloat16, use_tma=True)
    monkeypatch.undo()
    # an explicit request on hardware without TMA is an error, not a silent fallback
    monkeypatch.setattr(tt, "tma_hardware_ok", lambda device: False)
    with pytest.raises(ValueError, match="use_tma=True needs"):
        te.w8a8_gemm_gelu_triton(qx, sx, qw, sw, b, *args, torch.bfloat16, use_tma=True)
    assert path(q8, w8, torch.bfloat16, *args)[0] == "pointer"  # FP8, whose default is otherwise TMA on a GPU


@needs_tma
def test_tma_epilogue_argument_errors():
    from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_triton
    from turbocompile.kernels.w8a8.triton_gemm_tma import tma_configs, w8a8_gemm_tma

    m = TMA_MKN[0]
    qx, sx, qw, sw, b = _tma_operands("int8")
    # partial amax: a stored width that splits a granule (subtiled 128 -> 64-column halves) is refused
    with pytest.raises(ValueError, match="multiple of 128"):
        w8a8_gemm_gelu_triton(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16, amax_mode="partial",
                              use_tma=True, tma_config={"BLOCK_N": 128, "EPILOGUE_SUBTILE": True})
    # ... but only the partial amax needs whole granules: GELU alone and atomic take any width
    for mode in ("none", "atomic"):
        w8a8_gemm_gelu_triton(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16, amax_mode=mode,
                              use_tma=True, tma_config={"BLOCK_N": 64, "EPILOGUE_SUBTILE": True})
    # the autotune list keeps configs that the partial amax cannot use: they are filtered at launch
    assert any((c.kwargs["BLOCK_N"] // (2 if c.kwargs["EPILOGUE_SUBTILE"] else 1)) % 128 for c in tma_configs())
    with pytest.raises(ValueError, match="unknown activation"):
        w8a8_gemm_tma(qx, sx, qw, sw, b, torch.bfloat16, activation="relu")
    with pytest.raises(ValueError, match="needs amax_out"):
        w8a8_gemm_tma(qx, sx, qw, sw, b, torch.bfloat16, amax_mode="partial")
    with pytest.raises(ValueError, match="amax_out for amax_mode='partial' must be"):
        w8a8_gemm_tma(qx, sx, qw, sw, b, torch.bfloat16, amax_mode="partial",
                      amax_out=torch.zeros(m, 1, device=qx.device))
    with pytest.raises(ValueError, match="amax_mode='none'"):
        w8a8_gemm_tma(qx, sx, qw, sw, b, torch.bfloat16, amax_out=torch.zeros(m, 3, device=qx.device))
