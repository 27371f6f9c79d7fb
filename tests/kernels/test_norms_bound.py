"""The LayerNorm quant kernel's "bound" row scales (``wbound``): the GELU GEMM's power-of-two per-row scales
computed from the FP8 codes while they are in registers, vs ``ref.row_bound_scale_ref`` of the same codes, on
random and awkward inputs (odd M, M = 1, zero rows, outliers, D not a power of two, both tile layouts, every
launch configuration); the codes and per-token scales stay the plain quant kernel's."""

from __future__ import annotations

import pytest
import torch

from tests._bits import assert_same_bits, assert_same_codes
from tests._env import kernel_device, triton_runs_here
from turbocompile.kernels.w8a8 import ref as wref

pytestmark = pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")

DEV = kernel_device()


def _wbound(c=0.37, b=1.25) -> torch.Tensor:
    """[C, b] as ``gelu_bound_constants_ref`` returns them (fp32), on the kernel device."""
    return torch.tensor([c, b], dtype=torch.float32, device=DEV)


def _inputs(B, L, D, dt, seed=0):
    """x and per-sample AdaLN shift / scale whose first and last channels are amplified 40x: a LayerNorm row has
    ||LN(x)||² = D whatever x, so without them every row's bound would sit at the same place in its binade
    (and a mixed-up row or a dropped column tile could go unseen); with them the rows' norms spread over
    several binades, the second column tile's (if any) included."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, L, D, generator=g) * 3 + 1).to(dt)
    sh = torch.randn(B, 1, D, generator=g)
    sc = torch.randn(B, 1, D, generator=g) * 0.5
    sc[..., 0] = sc[..., -1] = 40.0
    return x.to(DEV), sh.to(DEV), sc.to(DEV)


def assert_bound_scales(sb, q, s, wb, what=""):
    """``sb`` equals ``row_bound_scale_ref(q, s, wb)`` (powers of two, [M, 1] fp32), except that a row's exponent
    may be one off where its bound lies within a few fp32 ulps of the power-of-two multiple of 448 between the
    two exponents (the kernel sums the squared codes in another order; the stated caveat)."""
    got, want = sb.cpu(), wref.row_bound_scale_ref(q.cpu(), s.cpu(), wb.cpu())
    assert got.dtype == torch.float32 and got.shape == want.shape, f"{what}: {got.dtype} {tuple(got.shape)}"
    assert (torch.frexp(got)[0] == 0.5).all(), f"{what}: bound scales are not all powers of two"
    off = got != want
    if off.any():
        n2 = q.cpu().double().square().sum(1, keepdim=True)
        bound = (s.cpu().double() * n2.sqrt() * float(wb[0]) + float(wb[1])) * wref.BOUND_MARGIN
        edge = 448.0 * torch.minimum(got, want).double()  # B <= edge gives the smaller exponent
        ratio = (got / want).double()
        near = ((bound - edge).abs() <= 16 * 2.0**-24 * bound) & ((ratio == 2.0) | (ratio == 0.5))
        assert near[off].all(), f"{what}: {int(off.sum())} row exponents differ away from a boundary"


def _run(x, sh, sc, wb, res, config=None, weight=None, bias=None):
    """(q, s, sb, q_plain, s_plain): the bound kernel, and the plain FP8 quant kernel of the same config."""
    from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton, residual_ln_modulate_triton

    quant = ("fp8", "per_token")
    if res:
        y = torch.randn_like(x)
        gate = torch.randn(x.shape[0], 1, x.shape[-1], device=DEV)
        xn, q, s, sb = residual_ln_modulate_triton(x, y, gate, weight, bias, sh, sc, 1e-6, x.dtype, quant=quant,
                                                   config=config, wbound=wb)
        xn0, q0, s0 = residual_ln_modulate_triton(x, y, gate, weight, bias, sh, sc, 1e-6, x.dtype, quant=quant,
                                                  config=config)
        assert torch.equal(xn, xn0)
    else:
        q, s, sb = ln_modulate_triton(x, weight, bias, sh, sc, 1e-6, x.dtype, quant=quant, config=config, wbound=wb)
        q0, s0 = ln_modulate_triton(x, weight, bias, sh, sc, 1e-6, x.dtype, quant=quant, config=config)
    return q, s, sb, q0, s0


def _check(x, sh, sc, wb, res, config=None, what="", **kw):
    q, s, sb, q0, s0 = _run(x, sh, sc, wb, res, config, **kw)
    m = x.numel() // x.shape[-1]
    assert q.shape == (m, x.shape[-1]) and sb.shape == (m, 1) and sb.is_contiguous()
    assert_same_codes(q, q0, what=f"{what} codes")  # the bound epilogue leaves the codes and scales alone
    assert_same_bits(s, s0, max_ulps=0, what=f"{what} per-token scales")
    assert_bound_scales(sb, q, s, wb, what)
    return q, s, sb


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,rows", [(64, 33), (200, 7), (256, 1), (1536, 5), (5120, 3)])
@pytest.mark.parametrize("res", [False, True], ids=["ln", "residual"])
def test_bound_scales_equal_the_reference_of_the_codes(dt, D, rows, res):
    """D = 200: one masked tile; 1536 = 1024 + 512 and 5120 = 4096 + 1024: two tiles (both summed); odd M,
    M = 1. The row bound exceeds the rows' own amax scale, as ffn.0's weight constants make it."""
    x, sh, sc = _inputs(1, rows, D, dt, seed=D + rows)
    x[0, rows // 2, D // 3] = 60.0  # an outlier: one code at 448, the rest of its row small
    _check(x, sh, sc, _wbound(), res, what=f"{dt} D={D} M={rows}")


@pytest.mark.parametrize("cfg", [dict(split=False), dict(persist=1, prefetch=True), dict(block_m=2, persist=1),
                                 dict(block_m=2, persist=1, prefetch=True, num_warps=4), dict(stats=1),
                                 dict(stats=1, block_m=2, qv=1), dict(qv=2), dict(qv=1)])
@pytest.mark.parametrize("res", [False, True], ids=["ln", "residual"])
def test_every_launch_configuration(cfg, res):
    """Persistent grids with and without prefetch (the bound is stored per block of the walk), one vs two column
    tiles, blocks of rows sharing one per-sample shift/scale load (B = 2, L = 4), every quantizer variant."""
    x, sh, sc = _inputs(2, 4, 1536, torch.bfloat16, seed=3)
    _check(x, sh, sc, _wbound(0.05, 0.0), res, config=cfg, what=str(cfg))


@pytest.mark.parametrize("D", [200, 1536, 5120])
def test_many_rows(D):
    """Enough rows (spread over several binades by _inputs) that a bound off by a few percent, or a row or column
    tile left out, moves some row's exponent: exact reference exponents, up to the boundary caveat."""
    rows = 1024 if D < 1536 else 96
    x, sh, sc = _inputs(1, rows, D, torch.bfloat16, seed=D)
    q, s, sb = _check(x, sh, sc, _wbound(), False, what=f"D={D}")
    n2 = q.cpu().double().square().sum(1)
    bound = (s.cpu().double().flatten() * n2.sqrt() * 0.37 + 1.25) * wref.BOUND_MARGIN
    frac = (bound / 448.0).log2() % 1.0  # position of each bound in its binade
    assert frac.std() > 0.12, "rows too alike for this test to see a wrong bound"
    assert sb.unique().numel() >= 2


def test_zero_rows_outliers_and_edge_constants():
    """All-zero rows without modulation give all-zero codes: the bound is the bias term alone, or the 1e-8 floor
    (2^-35) when b = 0 too; C = 0 (a zero weight) gives the bias term on every row; huge and tiny rows; an
    affine LN, with and without the residual."""
    D, rows = 200, 9
    x, _, _ = _inputs(1, rows, D, torch.bfloat16, seed=11)
    x[0, 2] = 0.0
    x[0, 5] = 0.0
    x[0, 7, 0] = 3.0e4
    x[0, 8] *= 1e-3
    for wb in (_wbound(0.37, 1.25), _wbound(0.0, 0.5), _wbound(3.0e3, 0.0), _wbound(0.37, 0.0)):
        q, s, sb = _check(x, None, None, wb, res=False, what=f"wb={wb.tolist()}")
        assert (q[2].float() == 0).all() and (q[5].float() == 0).all()
        want_zero_row = wref._exp2i(wref.pow2_exponent_ref(wb[1:].cpu() * wref.BOUND_MARGIN)).item()
        assert sb[2].item() == sb[5].item() == want_zero_row
        if float(wb[0]) == 0.0:
            assert (sb == want_zero_row).all()
    assert want_zero_row == 2.0**-35  # the last wb: b = 0, floor 1e-8
    w, b = torch.randn(D, device=DEV), torch.randn(D, device=DEV)
    for res in (False, True):
        _check(x, None, None, _wbound(), res, weight=w, bias=b, what=f"affine res={res}")


def test_empty_rows_and_refusals():
    from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton

    x, sh, sc = _inputs(1, 0, 64, torch.bfloat16)
    q, s, sb = ln_modulate_triton(x, None, None, sh, sc, 1e-6, x.dtype, quant=("fp8", "per_token"), wbound=_wbound())
    assert q.shape == (0, 64) and s.shape == sb.shape == (0, 1)
    x, sh, sc = _inputs(1, 5, 64, torch.bfloat16)
    for quant in (("int8", "per_token"), ("fp8", "block128"), None):
        with pytest.raises(ValueError, match=r"wbound \(the bound row scales\) needs quant \('fp8', 'per_token'\)"):
            ln_modulate_triton(x, None, None, sh, sc, 1e-6, x.dtype, quant=quant, wbound=_wbound())
    for bad in (torch.zeros(3, device=DEV), torch.zeros(2, dtype=torch.float64, device=DEV)):
        with pytest.raises(ValueError, match=r"wbound must be the \[2\] float32 \[C, b\]"):
            ln_modulate_triton(x, None, None, sh, sc, 1e-6, x.dtype, quant=("fp8", "per_token"), wbound=bad)


def test_bound_scales_feed_the_gelu_gemm_like_the_row_bound_kernel():
    """Norm kernel -> codes + bound scales, vs the separate row-bound kernel reading those codes: the same
    scales (what the graph rewrite relies on)."""
    from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton
    from turbocompile.kernels.w8a8.triton_bound import row_bound_scale_triton

    x, sh, sc = _inputs(1, 65, 1536, torch.bfloat16, seed=5)
    wb = _wbound(0.9, 0.3)
    q, s, sb = ln_modulate_triton(x, None, None, sh, sc, 1e-6, x.dtype, quant=("fp8", "per_token"), wbound=wb)
    assert_bound_scales(sb, q, s, wb)
    assert_bound_scales(row_bound_scale_triton(q, s, wb), q, s, wb)
    # the bound must depend on the codes: scaling C by 2^4 moves every exponent by 4 (b = 0.3 is negligible here)
    sb16 = ln_modulate_triton(x, None, None, sh, sc, 1e-6, x.dtype, quant=("fp8", "per_token"),
                              wbound=_wbound(0.9 * 16, 0.3))[2]
    assert ((sb16 / sb).log2().round() == 4).float().mean() > 0.9


# ------------------------------------------------------------------- sm90 build (no GPU needed)


def _sm90_ln_ptx(bound: bool, res: bool) -> str:
    """PTX of the FP8 per-token LayerNorm quant kernel at Wan2.1-1.3B's D = 1536 (two column tiles, two rows per
    program, lean quantizer, the residual's one-pass statistics), GPU forms, with or without the bound scales."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from turbocompile.kernels.norms.triton_layernorm import _ln_rows_kernel as kernel

    sig = {name: "i32" for name in kernel.arg_names}
    sig.update(x_ptr="*bf16", y_ptr="*bf16", gate_ptr="*fp32", w_ptr="*bf16", b_ptr="*bf16", shift_ptr="*fp32",
               scale_ptr="*fp32", xnew_ptr="*bf16", out_ptr="*fp8e4nv", qscale_ptr="*fp32", wb_ptr="*fp32",
               bscale_ptr="*fp32", eps="fp32")
    const = dict(HAS_RES=res, HAS_GATE=res, HAS_W=False, HAS_B=False, HAS_SHIFT=True, HAS_SCALE=True, OUT_MODE=2,
                 ROUND_LN=True, BLOCK_M=2, BLOCK_D=1024, BLOCK_D2=512, VEC_SHARED=True, PERSIST=False, PREFETCH=False,
                 NUM_STAGES=1, NATIVE=True, EVEN=True, QV=1, STATS=1 if res else 0, BOUND=bound)
    sig.update({key: "constexpr" for key in const})
    return triton.compile(ASTSource(kernel, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4}).asm["ptx"]


def test_bound_epilogue_builds_for_sm90():
    """Compiles for sm90 (child process: the session runs under TRITON_INTERPRET). The bound costs two scalar loads
    ([C, b]) and one store per row, never a re-read of the codes: the global loads and stores grow by exactly that,
    and the FP8 conversions stay the same (the squares are taken from the codes in registers)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    code = ("from tests.kernels.test_norms_bound import _sm90_ln_ptx\n"
            "for res in (False, True):\n"
            "    p0, p1 = _sm90_ln_ptx(False, res), _sm90_ln_ptx(True, res)\n"
            "    print(*[p1.count(s) - p0.count(s) for s in ('ld.global', 'st.global', 'cvt.rn.satfinite.e4m3x2.f32',"
            " 'sqrt.rn')])\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    for line in run.stdout.strip().splitlines()[-2:]:
        loads, stores, cvts, sqrts = map(int, line.split())
        assert (loads, stores, cvts) == (2, 1, 0) and sqrts == 2, line  # 2 rows per program: 2 sqrt.rn
