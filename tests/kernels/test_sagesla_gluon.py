"""The Gluon SageSLA kernel (sm90): it cannot run on CPU (no interpreter for Gluon), so here it is
compiled for sm90 and its instructions checked; the dispatch between it and the Triton kernel is
tested on CPU. Its numerics are checked on the GPU against the Triton kernel (bit-identical) and the
reference by `benchmarks/ablate_sagesla.py` and `benchmarks/bench_sagesla.py` (RESULTS.md)."""

from __future__ import annotations

import subprocess

import pytest
import torch
import triton

from tests._bits import COMPILED
from tests.kernels.sm90_child import facts_in_child
from turbocompile.kernels.sagesla import gluon_attn
from turbocompile.kernels.sagesla.triton_attn import launch_attn
from turbocompile.kernels.sagesla.triton_prep import prepare

needs_gluon = pytest.mark.skipif(not gluon_attn.HAS_GLUON, reason="this Triton has no Gluon")


def _compile_sm90(dense: bool, linear: bool, head_d: int, stages: int = gluon_attn.DEFAULT_STAGES,
                  vperm: bool = True, pdl: bool = False, kvw_tma: bool = False, qout: bool = False,
                  launched: bool = False):
    """The kernel compiled for sm90; ``launched``: specialized as a launch on Wan's contiguous [B, L, H, D] tensors
    is (pointers, the other strides and Lpad divisible by 16, the unit strides of the last dims constant 1), else
    with no such knowledge."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    kq = torch.zeros(2, 256, head_d, dtype=torch.int8)
    vq = torch.zeros(2, head_d, 256, dtype=torch.float8_e4m3fn)
    kdesc, vdesc = gluon_attn.make_descriptors(kq, vq, 128)
    wdesc = gluon_attn.kvw_descriptor(torch.zeros(2, head_d, head_d, dtype=torch.bfloat16)) if kvw_tma else kdesc
    fn = gluon_attn._sagesla_fwd_gluon
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(q_ptr="*bf16", o_ptr="*bf16", kdesc=mangle_type(kdesc), vdesc=mangle_type(vdesc), wdesc=mangle_type(wdesc),
               kscale_ptr="*fp32", vscale_ptr="*fp32", lut_ptr="*i32", kvw_ptr="*bf16", ksum_ptr="*fp32",
               bias_ptr="*fp32", qk_scale="fp32", codes_ptr="*fp8e4nv", scale_ptr="*fp32", bound_ptr="*fp32")
    const = dict(BLOCK_M=64, BLOCK_N=128, HEAD_D=head_d, DENSE=dense, LINEAR=linear, HAS_BIAS=linear,
                 NS=stages, VPERM=vperm, ADD_OUT=False, LUT_PAD=256, PDL=pdl, KVW_TMA=kvw_tma, QOUT=qout, num_warps=4)
    attrs = {}
    if launched:
        const.update(stride_qd=1, stride_od=1)
        aligned = [name for name, ty in sig.items() if ty.startswith("*")] + [
            "stride_qb", "stride_ql", "stride_qh", "stride_ob", "stride_ol", "stride_oh", "Lpad"]
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    sig.update({key: "constexpr" for key in const})
    src = GluonASTSource(fn, sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "maxnreg": gluon_attn.MAX_REGS})


def _sm90_facts(dense: bool, linear: bool, head_d: int, vperm: bool = True, pdl: bool = False,
                kvw_tma: bool = False) -> dict:
    """What the compiled kernel contains (run in a child process: `sm90_child`)."""
    compiled = _compile_sm90(dense, linear, head_d, vperm=vperm, pdl=pdl, kvw_tma=kvw_tma)
    ptx = compiled.asm["ptx"]
    body = ptx[ptx.index(".entry"):]
    first_tma = body.index("cp.async.bulk.tensor.2d")
    return {"cubin": bool(compiled.asm.get("cubin")), "shared": compiled.metadata.shared,
            "qk_int8": "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8" in ptx,
            "pv_fp8": f"wgmma.mma_async.sync.aligned.m64n{head_d}k32.f32.e4m3.e4m3" in ptx,
            "tma": "cp.async.bulk.tensor.2d" in ptx and "mbarrier.try_wait.parity" in ptx,
            "tma_copies": ptx.count("cp.async.bulk.tensor.2d"), "local": ".local" in ptx,
            "ld_global": ptx.count("ld.global"),
            "linear_bf16": f"m64n{head_d}k16.f32.bf16.bf16" in ptx,
            "shfl_idx": ptx.count("shfl.sync.idx"), "maxnreg": f".maxnreg {gluon_attn.MAX_REGS}" in ptx,
            "gdc_wait": body.count("griddepcontrol.wait"), "gdc_release": body.count("griddepcontrol.launch_dependents"),
            # the wait sits after the q tile's global loads (the op's input) and before the first TMA
            "wait_after_q_before_tma": ("griddepcontrol.wait" in body
                                        and body.index("ld.global") < body.index("griddepcontrol.wait") < first_tma)}


@needs_gluon
@pytest.mark.parametrize("dense,linear,head_d", [(False, True, 128), (True, False, 128), (False, False, 64)])
def test_gluon_kernel_compiles_for_sm90(dense, linear, head_d):
    facts = facts_in_child("tests.kernels.test_sagesla_gluon", "_sm90_facts", dense, linear, head_d)
    assert facts["cubin"]
    # INT8 QK and FP8 PV on the tensor cores (wgmma), K/V through TMA with mbarriers
    assert facts["qk_int8"] and facts["pv_fp8"] and facts["tma"]
    assert facts["linear_bf16"] == linear  # the linear branch's product runs in the epilogue
    # three programs per SM: 168 registers, and at most a third of the 228 KB of shared memory less the
    # 1 KB each program reserves (with a staged LUT row of 256 entries: top-k 0.1 up to L ≈ 327 000)
    assert facts["maxnreg"]
    assert facts["shared"] <= 228 * 1024 // 3 - 1024


@needs_gluon
@pytest.mark.parametrize("dense", [False, True])
def test_gluon_kernel_joins_a_pdl_chain(dense):
    """With PDL the kernel quantizes its q tile first, then waits for the preparation kernels before it
    reads the LUT or starts a K/V copy; it releases no successor (the next op's kernels are not chained)."""
    on = facts_in_child("tests.kernels.test_sagesla_gluon", "_sm90_facts", dense, not dense, 128, pdl=True)
    off = facts_in_child("tests.kernels.test_sagesla_gluon", "_sm90_facts", dense, not dense, 128)
    assert on["gdc_wait"] == 1 and on["gdc_release"] == 0 and on["wait_after_q_before_tma"]
    assert off["gdc_wait"] == 0 and off["gdc_release"] == 0
    assert on["maxnreg"] and on["shared"] == off["shared"]


@needs_gluon
def test_gluon_kvw_by_tma():
    """KVW_TMA: the linear epilogue's [D, D] KVW tile arrives by one more TMA copy instead of global
    loads (16 x 16 bytes per thread, issued as 16 fewer global loads) and shared stores; same shared memory
    but for its barrier."""
    on = facts_in_child("tests.kernels.test_sagesla_gluon", "_sm90_facts", False, True, 128, kvw_tma=True)
    off = facts_in_child("tests.kernels.test_sagesla_gluon", "_sm90_facts", False, True, 128)
    assert on["tma_copies"] == off["tma_copies"] + 1
    assert on["ld_global"] <= off["ld_global"] - 16
    assert on["linear_bf16"] and on["maxnreg"] and on["shared"] <= off["shared"] + 16


@needs_gluon
def test_gluon_p_needs_no_shuffles_with_key_permuted_v():
    """With V's keys in `permute_keys` order, P goes from the QK accumulator layout to the PV wgmma
    A operand with no shuffles (the point of the permutation); with V in key order it needs them."""
    counts = {}
    for vperm in (True, False):
        counts[vperm] = facts_in_child("tests.kernels.test_sagesla_gluon", "_sm90_facts", True, False, 128,
                                       vperm=vperm)["shfl_idx"]
    assert counts[True] == 0 and counts[False] > 0, counts


def _sass_resources(compiled) -> dict | None:
    """Registers, stack bytes, spill instructions (STL/LDL) in all and inside the main loop (the backward branch
    around the first INT8 QK wgmma) of a compiled kernel, from `cuobjdump` of Triton's NVIDIA backend; None
    where that tool is missing."""
    import os
    import re
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", sass)]
    first_qk = next(a for a, text in ins if "IGMMA" in text)
    back = [(int(m.group(1), 16), a) for a, text in ins
            if (m := re.search(r"BRA\s+0x([0-9a-f]+)", text)) and int(m.group(1), 16) < a]
    lo, hi = next((b0, b1) for b0, b1 in back if b0 <= first_qk <= b1)
    spills = [a for a, text in ins if re.search(r"\b(STL|LDL)\b", text)]
    loop = [text for a, text in ins if lo <= a <= hi]
    return {"regs": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "spills": len(spills), "loop_spills": sum(lo <= a <= hi for a in spills),
            "loop_len": len(loop), "loop_r2ur": sum("R2UR" in text for text in loop)}


def _qout_facts(dense: bool, linear: bool, head_d: int) -> dict:
    """The kernel with (QOUT) and without the FP8-codes epilogue, default configuration otherwise (KVW by TMA)."""
    out = {}
    for qout in (False, True):
        compiled = _compile_sm90(dense, linear, head_d, kvw_tma=True, qout=qout, launched=True)
        ptx = compiled.asm["ptx"]
        out[str(qout)] = {"cubin": bool(compiled.asm.get("cubin")), "shared": compiled.metadata.shared,
                          "maxnreg": f".maxnreg {gluon_attn.MAX_REGS}" in ptx,
                          "e4m3_cvt": ptx.count("cvt.rn.satfinite.e4m3x2.f32"), "div_rn": ptx.count("div.rn.f32"),
                          "sass": _sass_resources(compiled)}
    return out


@needs_gluon
@pytest.mark.parametrize("dense,linear,head_d", [(False, True, 128), (True, True, 128), (False, False, 128),
                                                 (True, False, 64)])
def test_gluon_fp8_out_epilogue_compiles_for_sm90(dense, linear, head_d):
    """QOUT (the o projection's FP8 codes from the epilogue) compiles for sm90 within the 168-register cap, adds
    e4m3 casts (saturating RNE: the quantizer's clamp) but no division (448 / bound and bound / 448 come with the
    bounds), no shared memory, and no spill in the main loop; the epilogue spills about as the bf16 store's (as
    launched, Triton 3.6, D = 128: 16 -> 0 stack bytes without the linear branch, 48 -> 56 with it); the main
    loop is no longer than the bf16 kernel's and has no more R2URs."""
    facts = facts_in_child("tests.kernels.test_sagesla_gluon", "_qout_facts", dense, linear, head_d)
    off, on = facts["False"], facts["True"]
    assert on["cubin"] and on["maxnreg"] and on["shared"] == off["shared"]
    assert on["e4m3_cvt"] >= off["e4m3_cvt"] + head_d // 4  # 64 x D codes over 128 threads, two per cvt
    assert on["div_rn"] == off["div_rn"]  # the quotients come with the bounds: no division subroutine here
    if on["sass"] is None:
        pytest.skip("no cuobjdump in this Triton: registers and spills not checked")
    assert on["sass"]["regs"] <= gluon_attn.MAX_REGS
    assert on["sass"]["loop_spills"] == 0 and off["sass"]["loop_spills"] == 0
    assert on["sass"]["stack"] <= off["sass"]["stack"] + 32  # at most 8 more registers spilled, after the loop
    # the main loop no worse than the bf16 kernel's: an `if h == 0` in the epilogue once added R2URs to it
    # (Triton 3.6, sm90)
    assert on["sass"]["loop_r2ur"] <= off["sass"]["loop_r2ur"], (on["sass"], off["sass"])
    assert on["sass"]["loop_len"] <= off["sass"]["loop_len"] + 2, (on["sass"], off["sass"])


def _qkv(L=200, H=2, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, L, H, D, generator=g).to(torch.bfloat16) for _ in range(3)]


@pytest.mark.skipif(COMPILED, reason="CPU tensors run Triton kernels only in the interpreter")
def test_gluon_request_on_cpu_is_a_clear_error():
    q, k, v = _qkv()
    prep = prepare(q, k, v, 0.5, 64, 128, "int8-fp8", False)
    with pytest.raises(ValueError, match="sm90"):
        launch_attn(q, k, v, prep, None, None, 64, 128, kernel="gluon")
    with pytest.raises(ValueError, match="valid: 'triton', 'gluon', 'auto'"):
        launch_attn(q, k, v, prep, None, None, 64, 128, kernel="cuda")


@pytest.mark.skipif(COMPILED, reason="CPU tensors run Triton kernels only in the interpreter")
def test_auto_on_cpu_runs_the_triton_kernel():
    assert not gluon_attn.gluon_supported(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16), 1, 64, 128)
    q, k, v = _qkv(L=131)
    w = torch.randn(64, 64) / 8
    prep = prepare(q, k, v, 0.5, 64, 128, "int8-fp8", True)
    auto = launch_attn(q, k, v, prep, w, None, 64, 128, kernel="auto")
    tri = launch_attn(q, k, v, prep, w, None, 64, 128, kernel="triton")
    assert torch.equal(auto, tri)
