"""The TMA GEMM's "sumsq" epilogue (kernels/w8a8/triton_gemm_tma.py, ``amax_mode="sumsq"``) and its launcher
``triton_gemm.w8a8_gemm_sumsq_triton``: y as the GEMM stores it, plus the fp32 sums of squares of exactly those
stored values per (row, 128-column granule), against the references on awkward shapes; the fallback route for
shapes the TMA kernel refuses; the argument checks.

On CPU the kernel runs in Triton's interpreter (3 persistent "SMs", so programs walk several tiles), where the
bf16 cast of an epilogue with an extension is rounded explicitly (ROUND_BF16), as the GPU's cast rounds.
"""

from __future__ import annotations

import pytest
import torch

from tests._env import has_cuda, kernel_device, sm_at_least, triton_runs_here
from turbocompile.kernels.w8a8 import ref

pytestmark = [
    pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)"),
    pytest.mark.skipif(has_cuda() and not sm_at_least(9), reason="TMA needs sm90+"),
]

DEV = kernel_device()
# fp32 sums of at most 128 squares in two different orders (the kernel's tree, torch's): a few ulps apart, far
# below the 2^-9 relative change that squaring the fp32 accumulator instead of the stored bf16 value would make
SUM_RTOL = 1e-5
# stored widths (BLOCK_N, or BLOCK_N / 2 subtiled) of one and of two granules
CFGS = {
    "bn128": {"BLOCK_M": 64, "BLOCK_N": 128, "EPILOGUE_SUBTILE": False},
    "bn256sub": {"BLOCK_M": 64, "BLOCK_N": 256, "EPILOGUE_SUBTILE": True},
    "bn256": {"BLOCK_M": 32, "BLOCK_N": 256, "EPILOGUE_SUBTILE": False, "GROUP_M": 2},
}


def _tma():
    from turbocompile.kernels.w8a8 import triton_gemm_tma

    return triton_gemm_tma


def _operands(m, k, n, fmt, seed=0, zero_rows=(), outlier=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    if outlier and m > 1:
        x[m // 2, k // 3] = 300.0  # one huge activation: its row's values are large, the others small
        x[0, :3] = torch.tensor([40.0, -0.0, 1e-6])
    for r in zero_rows:
        x[r] = 0.0
    w = torch.randn(n, k, generator=g) * 0.05
    w[n // 3] *= 40.0  # an outlier output channel: one column of large values
    b = (torch.randn(n, generator=g) * 0.5).to(torch.bfloat16) if bias else None
    qa, sa = ref.quantize_ref(x, fmt, "per_token")
    qw, sw = ref.quantize_ref(w, fmt, "per_channel")
    return [t if t is None else t.to(DEV) for t in (qa, sa, qw, sw, b)]


def _sums64(y: torch.Tensor) -> torch.Tensor:
    """float64 sums of squares of y's values per 128-column granule (independent of the fp32 reference)."""
    m, n = y.shape
    g = -(-n // 128)
    sq = torch.nn.functional.pad(y.cpu().double().square(), (0, g * 128 - n))
    return sq.view(m, g, 128).sum(-1)


def _run(ops, out_dtype, cfg):
    qa, sa, qw, sw, b = ops
    m, n = qa.shape[0], qw.shape[0]
    buf = torch.full((m, -(-n // 128)), float("nan"), device=DEV)  # every entry must be written
    y = _tma().w8a8_gemm_tma(qa, sa, qw, sw, b, out_dtype, config=cfg, amax_mode="sumsq", amax_out=buf)
    return y, buf


# (m, k, n): M = 1 and odd; N below one granule, not a multiple of 128 nor of 256, exactly 256; several tiles
SHAPES = [(1, 128, 136), (7, 208, 200), (45, 144, 392), (130, 256, 256), (67, 128, 520)]


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("cfg", list(CFGS))
def test_sums_of_squares_of_the_stored_values(fmt, m, k, n, cfg):
    ops = _operands(m, k, n, fmt, zero_rows=(m - 1,) if m > 2 else ())
    y, ss = _run(ops, torch.bfloat16, CFGS[cfg])
    assert ss.shape == (m, -(-n // 128)) and ss.dtype == torch.float32 and torch.isfinite(ss).all()
    # y is the GEMM rounded to bf16 (one rounding of the fp32 epilogue value; the reference rounds the fp64 one)
    want_y = ref.w8a8_gemm_ref(*[t if t is None else t.cpu() for t in ops], "per_token", "per_channel", torch.float64)
    rel = ((y.cpu().double() - want_y).norm() / want_y.norm()).item()
    assert y.dtype == torch.bfloat16 and rel < 4e-3
    # the sums are those of the values y holds: the fp32 reference on the stored y, and float64 sums
    assert torch.allclose(ss.cpu(), ref.granule_sumsq_ref(y.cpu()), rtol=SUM_RTOL, atol=0)
    assert torch.allclose(ss.cpu().double(), _sums64(y), rtol=SUM_RTOL, atol=0)
    if m > 2:  # a zero input row with a bias: the sums of the bias row's squares; the granule of the partial
        # tail holds its real columns only
        assert torch.allclose(ss[-1].cpu(), ref.granule_sumsq_ref(ops[4].cpu()[None]).squeeze(0), rtol=SUM_RTOL)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_fp16_and_fp32_outputs(out_dtype):
    ops = _operands(37, 160, 264, "fp8", seed=2)
    y, ss = _run(ops, out_dtype, CFGS["bn256sub"])
    assert y.dtype == out_dtype
    assert torch.allclose(ss.cpu().double(), _sums64(y), rtol=SUM_RTOL, atol=0)


def test_squares_are_of_the_rounded_output_not_the_accumulator():
    """The difference the contract is about: fp32 sums of the fp32 GEMM values (before the bf16 cast) differ
    from the sums of the stored values by far more than the tolerance used above."""
    ops = _operands(33, 128, 384, "fp8", seed=4)
    y, ss = _run(ops, torch.bfloat16, CFGS["bn128"])
    y32 = _tma().w8a8_gemm_tma(*ops, torch.float32, config=CFGS["bn128"])
    unrounded = ref.granule_sumsq_ref(y32.cpu())
    assert not torch.allclose(ss.cpu(), unrounded, rtol=SUM_RTOL * 10, atol=0)
    assert torch.allclose(ss.cpu(), unrounded, rtol=2e-2)  # ... but the same statistic


def test_zero_rows_without_bias_sum_to_zero_and_rows_past_m_are_untouched():
    qa, sa, qw, sw, _ = _operands(20, 128, 200, "int8", zero_rows=(3, 19), bias=False)
    big = torch.full((25, 2), -7.0, device=DEV)  # rows 20.. lie past M: the kernel must not write them
    _tma().w8a8_gemm_tma(qa, sa, qw, sw, None, torch.bfloat16, config=CFGS["bn128"], amax_mode="sumsq",
                         amax_out=big[:20])
    assert (big[20:] == -7.0).all()
    assert (big[[3, 19]] == 0).all() and (big[:20].cpu().sum(-1) > 0).sum() == 18


def test_plain_y_unchanged_by_the_mode():
    """y of the "sumsq" launch equals the "partial" launch's (same rounding path), and the partial maxima are
    the same granules' maxima: the two modes see the same stored tile."""
    ops = _operands(45, 144, 392, "fp8", seed=5)
    y, ss = _run(ops, torch.bfloat16, CFGS["bn256"])
    pa = torch.empty_like(ss)
    y2 = _tma().w8a8_gemm_tma(*ops, torch.bfloat16, config=CFGS["bn256"], amax_mode="partial", amax_out=pa)
    assert torch.equal(y, y2)
    g = ss.shape[1]
    amax = torch.nn.functional.pad(y.cpu().float().abs(), (0, g * 128 - 392)).view(45, g, 128).amax(-1)
    assert torch.equal(pa.cpu(), amax)


def test_k0_and_empty_m():
    qa, sa, qw, sw, b = _operands(6, 128, 200, "int8")
    buf = torch.full((6, 2), float("nan"), device=DEV)
    y = _tma().w8a8_gemm_tma(qa[:, :0], sa, qw[:, :0], sw, b, torch.bfloat16, amax_mode="sumsq", amax_out=buf)
    assert torch.equal(y.cpu(), b.cpu().expand(6, 200))
    assert torch.equal(buf.cpu(), ref.granule_sumsq_ref(b.cpu()[None]).expand(6, 2))
    y0 = _tma().w8a8_gemm_tma(qa[:0], sa[:0], qw, sw, b, torch.bfloat16, amax_mode="sumsq",
                              amax_out=torch.empty(0, 2, device=DEV))
    assert y0.shape == (0, 200)


def test_argument_errors():
    tt = _tma()
    qa, sa, qw, sw, b = _operands(9, 128, 200, "fp8")
    with pytest.raises(ValueError, match="amax_mode='sumsq' needs amax_out \\[9, 2\\] fp32"):
        tt.w8a8_gemm_tma(qa, sa, qw, sw, b, torch.bfloat16, amax_mode="sumsq")
    with pytest.raises(ValueError, match="amax_out for amax_mode='sumsq' must be a \\[9, 2\\] fp32"):
        tt.w8a8_gemm_tma(qa, sa, qw, sw, b, torch.bfloat16, amax_mode="sumsq", amax_out=torch.zeros(9, 1, device=DEV))
    # a stored width that splits a granule (subtiled 128 -> 64-column halves) is refused, as for "partial"
    with pytest.raises(ValueError, match="amax_mode='sumsq' needs the stored tile width"):
        tt.w8a8_gemm_tma(qa, sa, qw, sw, b, torch.bfloat16, amax_mode="sumsq", amax_out=torch.zeros(9, 2, device=DEV),
                         config={"BLOCK_N": 128, "EPILOGUE_SUBTILE": True})
    with pytest.raises(ValueError, match="unknown amax_mode 'sumsquares'; valid: .*sumsq"):
        tt.w8a8_gemm_tma(qa, sa, qw, sw, b, torch.bfloat16, amax_mode="sumsquares")


# ------------------------------------------------------------------ launcher: TMA route and fallback


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_launcher_tma_route_matches_reference(fmt):
    from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_sumsq_triton

    ops = _operands(19, 144, 264, fmt, seed=6)
    y, ss = w8a8_gemm_sumsq_triton(*ops, torch.bfloat16, use_tma=True)
    y_ref, ss_ref = ref.w8a8_gemm_sumsq_ref(*[t.cpu() for t in ops], "per_token", "per_channel", torch.bfloat16)
    assert ss.shape == ss_ref.shape == (19, 3)
    assert ((y.cpu().float() - y_ref.float()).norm() / y_ref.float().norm()).item() < 4e-3
    assert torch.allclose(ss.cpu(), ref.granule_sumsq_ref(y.cpu()), rtol=SUM_RTOL, atol=0)
    assert torch.allclose(ss.cpu(), ss_ref, rtol=2e-2)  # against the reference's own y: bf16 rounding apart


@pytest.mark.parametrize("m,k,n,why", [(9, 200, 136, "row stride 200 B"),  # K % 16 != 0
                                       (9, 128, 100, "output row of N=100")])  # 200-byte bf16 rows
def test_launcher_falls_back_for_shapes_outside_the_tma_rule(monkeypatch, m, k, n, why):
    """The pointer GEMM then torch sums: the same contract, and the TMA launcher is never called."""
    from turbocompile.kernels.w8a8 import triton_gemm as tg

    ops = _operands(m, k, n, "fp8", seed=7)
    assert why in tg.gemm_path(ops[0], ops[2], torch.bfloat16, "per_token", "per_channel", use_tma=True)[1]

    def boom(*a, **kw):
        raise AssertionError("TMA kernel called for a shape outside its rule")

    monkeypatch.setattr(_tma(), "w8a8_gemm_tma", boom)
    y, ss = tg.w8a8_gemm_sumsq_triton(*ops, torch.bfloat16, use_tma=True)
    assert ss.shape == (m, -(-n // 128)) and ss.dtype == torch.float32
    assert torch.allclose(ss.cpu(), ref.granule_sumsq_ref(y.cpu()), rtol=SUM_RTOL, atol=0)
    y_plain = tg.w8a8_gemm_triton(*ops, "per_token", "per_channel", torch.bfloat16, use_tma=True)
    assert torch.equal(y, y_plain)  # y by the existing route


def test_launcher_default_route_and_refused_request(monkeypatch):
    from turbocompile.kernels.w8a8 import triton_gemm as tg

    ops = _operands(5, 128, 128, "fp8")
    called = []
    real = _tma().w8a8_gemm_tma
    monkeypatch.setattr(_tma(), "w8a8_gemm_tma", lambda *a, **kw: called.append(kw.get("amax_mode")) or real(*a, **kw))
    tg.w8a8_gemm_sumsq_triton(*ops, torch.bfloat16)
    # default: the TMA epilogue on a CUDA sm90+ device, the fallback in the interpreter (as the plain GEMM)
    assert called == (["sumsq"] if DEV == "cuda" else [])
    monkeypatch.setattr(_tma(), "tma_hardware_ok", lambda device: False)
    with pytest.raises(ValueError, match="use_tma=True needs"):
        tg.w8a8_gemm_sumsq_triton(*ops, torch.bfloat16, use_tma=True)


def _sm90_ttgir(amax_mode: int, subtile: bool) -> str:
    """TTGIR of the FP8 TMA kernel with amax mode ``amax_mode``, compiled for sm90 (a GPU build, no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from turbocompile.kernels.w8a8.triton_gemm_tma import _w8a8_gemm_tma_kernel as fn

    bn = 256
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(a_desc="tensordesc<fp8e4nv[128,128]>", w_desc=f"tensordesc<fp8e4nv[{bn},128]>",
               y_desc=f"tensordesc<bf16[128,{bn // 2 if subtile else bn}]>", sa_ptr="*fp32", sw_ptr="*fp32",
               bias_ptr="*bf16", amax_ptr="*fp32")
    const = dict(IS_FP8=True, FP8_PROMOTE=False, GELU_SHORT=True,
                 HAS_BIAS=True, OUT_KIND=0, ACTIVATION=0, ROUND_BF16=False, NATIVE=2,
                 AMAX_MODE=amax_mode, RESIDUAL=0, RES_TMA=False, GATE_MODE=0, r_desc=None, GRANULE=128, NUM_SMS=132,
                 FLATTEN=True, BLOCK_M=128, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, EPILOGUE_SUBTILE=subtile)
    sig.update({key: "constexpr" for key in const})
    src = ASTSource(fn, sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3}).asm["ttgir"]


@pytest.mark.parametrize("subtile", [True, False])
def test_sumsq_epilogue_lowers_for_sm90(subtile):
    """The interpreter does not lower the kernel: compile it for sm90 (child process, outside TRITON_INTERPRET)
    with the sumsq epilogue, one granule per store (subtiled) and two (reshape + reduction); it must keep the
    wgmma K loop and store the sums with plain (masked) stores, no atomics."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    code = (f"from tests.kernels.test_w8a8_gemm_sumsq import _sm90_ttgir; t = _sm90_ttgir(5, {subtile}); "
            "print(t.count('warp_group_dot'), t.count('atomic'), t.count('tt.store'), t.count('async_tma_copy_local_to_global'))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    n_dot, n_atomic, n_store, n_desc = map(int, run.stdout.split()[-4:])
    assert n_dot > 0 and n_atomic == 0
    assert n_store >= (2 if subtile else 1) and n_desc >= (2 if subtile else 1)
