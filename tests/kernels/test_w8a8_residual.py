"""W8A8 GEMM with the gated residual epilogue (kernels/w8a8/triton_gemm_residual.py): x_new bit for bit.

The expected x_new is built from the same kernel's fp32 output (so the GEMM sums are the same), rounded
to the residual's dtype with torch (RNE), then the eager residual ``x + y * gate.to(dt)``: exactly what
the unfused graph computes from the GEMM's stored y. It is also checked against the x_new of the fused
norm kernel (``residual_ln_modulate_triton``), the kernel the epilogue replaces. On CPU the kernels run
in the Triton interpreter (TMA descriptors emulated, 3 "SMs" for the persistent loop).
"""

from __future__ import annotations

import pytest
import torch

from tests._bits import COMPILED
from tests._env import has_cuda, kernel_device, sm_at_least, triton_runs_here
from turbocompile.kernels.norms.ref import gated_residual_ref
from turbocompile.kernels.w8a8 import ref

pytestmark = pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")

DEV = kernel_device()
BF16 = torch.bfloat16
needs_tma = pytest.mark.skipif(has_cuda() and not sm_at_least(9), reason="TMA needs sm90+")


def _mods():
    from turbocompile.kernels.w8a8 import triton_gemm_epilogue, triton_gemm_residual, triton_gemm_tma

    return triton_gemm_residual, triton_gemm_tma, triton_gemm_epilogue


def _operands(m, k, n, fmt, ag="per_token", wg="per_channel", seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    x[0, :3] = torch.tensor([40.0, -0.0, 1e-6])  # an outlier and tiny values in row 0
    qa, sa = ref.quantize_ref(x, fmt, ag)
    qw, sw = ref.quantize_ref(torch.randn(n, k, generator=g) * 0.05, fmt, wg)
    b = torch.randn(n, generator=g).to(BF16).to(DEV) if bias else None
    return qa.to(DEV), sa.to(DEV), qw.to(DEV), sw.to(DEV), b


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so -0.0 and +0.0 differ), for bit-for-bit comparisons."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _y32(qa, sa, qw, sw, bias, ag, wg, path):
    """The GEMM's fp32 values, from the kernel (and config) the fused launch uses."""
    tr, tt, te = _mods()
    if path == "tma":
        return tt.w8a8_gemm_tma(qa, sa, qw, sw, bias, torch.float32)
    y = torch.empty(qa.shape[0], qw.shape[0], device=qa.device)
    te._launch_pointer(qa, sa, qw, sw, bias, ag, wg, y, None, "none", 0, None, None, "test")
    return y


def _check(fmt, path, load, res, gate, ag="per_token", wg="per_channel", bias=True, seed=0):
    tr, _, _ = _mods()
    n = res.shape[-1]
    m = res.numel() // n
    qa, sa, qw, sw, b = _operands(m, 256, n, fmt, ag, wg, seed, bias)
    out = tr.w8a8_gemm_residual_triton(qa, sa, qw, sw, b, ag, wg, res, gate, use_tma=path == "tma", res_load=load)
    y = _y32(qa, sa, qw, sw, b, ag, wg, path).to(res.dtype).reshape(res.shape)
    want = gated_residual_ref(res, y, gate)
    assert out.shape == res.shape and out.dtype == res.dtype and out.is_contiguous()
    if COMPILED and res.dtype == torch.float32 and gate is not None:
        # An fp32 residual has no rounding round trip to keep (rnd is the identity for fp32), so a GPU build
        # contracts x + y·g into one FMA: x_new = fp32(x + y·g) with the exact product, where eager rounds
        # y·g to fp32 first (seen on an H100: max |Δ| 9.5e-7). Every element is one of the two; y·g of two
        # fp32 values is exact in fp64, so the FMA's value is the fp64 sum rounded to fp32.
        fma = (res.double() + y.double() * gate.to(res.dtype).double()).float()
        ok = (_bits(out) == _bits(want)) | (_bits(out) == _bits(fma))
        assert ok.all(), (out.float() - want.float()).abs().max()
    else:
        assert torch.equal(_bits(out), _bits(want)), (out.float() - want.float()).abs().max()
    return out, y


@needs_tma
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("path,load", [("tma", "tma"), ("tma", "pointer"), ("pointer", None)])
def test_bit_exact_per_sample_gate_tiles_across_samples(fmt, path, load, monkeypatch):
    """B=3 samples of L=67 rows (odd M=201), N=136 (not a tile multiple), a per-sample [B, 1, N] fp32 gate
    sliced out of the modulation (strided): 64-row tiles straddle samples (GATE_MODE 1, two gate rows)."""
    tr, _, _ = _mods()
    monkeypatch.setattr(tr, "MAX_BLOCK_M", 64)  # the interpreter's tiles are 64 rows
    g = torch.Generator().manual_seed(1)
    res = (torch.randn(3, 67, 136, generator=g) * 3).to(BF16).to(DEV)
    gate = torch.randn(3, 6, 136, generator=g).to(DEV)[:, 2:3]
    assert tr.residual_args(res, gate).gate_mode == 1
    out, y = _check(fmt, path, load, res, gate, bias=fmt == "int8")
    if path == "tma" and load == "tma":
        # the fused norm kernel's own x_new from the same y: the epilogue replaces exactly that
        from turbocompile.kernels.norms.triton_layernorm import residual_ln_modulate_triton

        x_new, _ = residual_ln_modulate_triton(res, y, gate, None, None, None, None, 1e-6, BF16)
        assert torch.equal(_bits(out), _bits(x_new))


@needs_tma
@pytest.mark.parametrize("case", ["no_gate", "one_sample", "per_token_gate", "zeros"])
def test_bit_exact_gate_variants(case):
    tr, _, _ = _mods()
    g = torch.Generator().manual_seed(2)
    res = (torch.randn(1, 75, 72, generator=g) * 3).to(BF16).to(DEV)
    gate = {"no_gate": None, "one_sample": torch.randn(1, 1, 72, generator=g),
            "per_token_gate": torch.randn(1, 75, 72, generator=g), "zeros": torch.zeros(72)}[case]
    gate = gate.to(DEV) if gate is not None else None
    if case == "zeros":
        res = torch.zeros_like(res)
        res[0, 0, :4] = torch.tensor([-0.0, 1.0, -2.0, 0.0])
    mode = tr.residual_args(res, gate).gate_mode
    assert mode == {"no_gate": 0, "one_sample": 0, "per_token_gate": 2, "zeros": 0}[case]
    out, _ = _check("int8", "tma", "tma", res, gate, seed=3)
    if case == "zeros":  # y·0 = ±0, then x + (±0): values unchanged (the signs follow the eager ops, see _check)
        assert torch.equal(out, res)


@pytest.mark.parametrize("fmt,ag,wg", [("int8", "block128", "block128"), ("fp8", "block128", "per_channel"),
                                       ("int8", "per_token", "block128")])
def test_block128_scales_run_on_the_pointer_kernel(fmt, ag, wg):
    tr, _, _ = _mods()
    g = torch.Generator().manual_seed(4)
    res = (torch.randn(2, 70, 130, generator=g) * 3).to(BF16).to(DEV)
    gate = torch.randn(2, 1, 130, generator=g).to(DEV)
    assert tr.residual_gemm_path(torch.zeros(140, 256, dtype=torch.int8), torch.zeros(130, 256, dtype=torch.int8),
                                 BF16, ag, wg, use_tma=True)[0] == "pointer"
    _check(fmt, "pointer", None, res, gate, ag, wg)


@needs_tma
@pytest.mark.parametrize("dt", [torch.float32, torch.float16])
def test_fp32_and_fp16_residual(dt):
    g = torch.Generator().manual_seed(5)
    res = (torch.randn(50, 64, generator=g) * 3).to(dt).to(DEV)
    gate = torch.randn(64, generator=g).to(DEV)
    _check("fp8", "tma", "tma", res, gate, seed=6)


@needs_tma
def test_strided_residual_rows_are_read_in_place_or_by_pointer_loads():
    """A row-strided residual (a slice of a wider buffer) is read in place: through TMA when its row stride
    is 16-byte aligned, else with pointer loads (the rule, not a failure, decides)."""
    tr, _, _ = _mods()
    g = torch.Generator().manual_seed(7)
    wide = (torch.randn(1, 40, 80, generator=g) * 3).to(BF16).to(DEV)
    aligned, odd = wide[..., :72], wide[..., 1:73]
    assert tr.residual_args(aligned, None).load == "tma" and tr.residual_args(aligned, None).x.data_ptr() == \
        wide.data_ptr()
    assert tr.residual_args(odd, None, "tma").load == "pointer"  # base not 16-byte aligned
    gate = torch.randn(72, generator=g).to(DEV)
    _check("int8", "tma", "tma", aligned, gate, seed=8)
    _check("int8", "tma", "tma", odd, gate, seed=8)


def test_degenerate_shapes():
    tr, _, _ = _mods()
    qa, sa, qw, sw, b = _operands(5, 128, 16, "int8")
    res = torch.randn(5, 16).to(BF16).to(DEV)
    gate = torch.randn(16).to(DEV)
    out = tr.w8a8_gemm_residual_triton(qa[:, :0], sa, qw[:, :0], sw, b, "per_token", "per_channel", res, gate,
                                       use_tma=False)
    assert torch.equal(out, gated_residual_ref(res, b.expand(5, 16), gate))  # K = 0: y = bias
    empty = tr.w8a8_gemm_residual_triton(qa[:0], sa[:0], qw, sw, b, "per_token", "per_channel", res[:0], None)
    assert empty.shape == (0, 16)
    with pytest.raises(ValueError, match="unknown residual load 'smem'; valid: tma, pointer"):
        tr.residual_args(res, None, "smem")


def _sm90_ptx_counts(residual: int, res_tma: bool) -> tuple[int, int, int]:
    """(bf16 conversions, TMA copies, wgmma) in the PTX of the FP8 TMA kernel, 128x128 tiles, 8 warps, compiled
    for sm90 (a GPU build: NATIVE roundings), with RESIDUAL ``residual`` and one gate row (GATE_MODE 0)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from turbocompile.kernels.w8a8.triton_gemm_tma import _w8a8_gemm_tma_kernel as fn

    sig = {name: "i32" for name in fn.arg_names}
    sig.update(a_desc="tensordesc<fp8e4nv[128,128]>", w_desc="tensordesc<fp8e4nv[128,128]>",
               y_desc="tensordesc<bf16[128,128]>", sa_ptr="*fp32", sw_ptr="*fp32", bias_ptr="*bf16",
               amax_ptr="*fp32", res_ptr="*bf16", gate_ptr="*fp32")
    const = dict(IS_FP8=True, FP8_PROMOTE=False, GELU_SHORT=True,
                 HAS_BIAS=True, OUT_KIND=0, ACTIVATION=0, ROUND_BF16=False, NATIVE=2, AMAX_MODE=0,
                 RESIDUAL=residual, RES_TMA=res_tma, GATE_MODE=0, GRANULE=128, NUM_SMS=132, FLATTEN=True,
                 BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, EPILOGUE_SUBTILE=False)
    if res_tma:
        sig["r_desc"] = "tensordesc<bf16[128,128]>"
    else:
        const["r_desc"] = None
    sig.update({key: "constexpr" for key in const})
    ptx = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 8, "num_stages": 4}).asm["ptx"]
    return ptx.count("cvt.rn.bf16"), ptx.count("cp.async.bulk.tensor"), ptx.count("wgmma.mma_async")


def test_sm90_build_keeps_every_rounding():
    """On a GPU build each residual element is rounded four times (y, y·g, x + t, the store's cast) besides the
    gate: none of the ``rnd`` round trips may be folded away (seen for a plain ``.to(bf16).to(fp32)`` on an
    H200). Compiled for sm90 in a child process (the test session runs under TRITON_INTERPRET)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated (3.9 warns when it is unset)
    code = ("from tests.kernels.test_w8a8_residual import _sm90_ptx_counts as c; "
            "print(*c(0, False), *c(2, True))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    cvt0, tma0, mma0, cvt2, tma2, mma2 = map(int, run.stdout.split()[-6:])
    assert mma0 > 0 and mma2 == mma0
    assert cvt2 >= 4 * cvt0 > 0, (cvt0, cvt2)  # the plain GEMM converts each element once, at the store
    assert tma2 > tma0  # the residual tile comes through its own descriptor
