"""The Gluon kernel of the fused cross-attention (sm90). Gluon has no CPU interpreter: on CPU the kernel is compiled
for sm90 (in a child process) and its instructions and resources checked, and the dispatch is tested; on an sm90 GPU
it is compared with the reference and with the Triton kernel on awkward shapes and layouts."""

from __future__ import annotations

import pytest
import torch

from tests._bits import COMPILED
from tests._env import sm_at_least
from tests.kernels.sm90_child import facts_in_child
from tests.kernels.test_norm_attention_quant import _case, _deq, _pipeline64, rel
from turbocompile.kernels.sagesla.gluon_attn import HAS_GLUON
from turbocompile.kernels.text_attention import gluon_norm_attn_quant as gmod
from turbocompile.kernels.text_attention import ref
from turbocompile.kernels.text_attention.triton_norm_attn_quant import norm_attention_quant_triton

needs_gluon = pytest.mark.skipif(not HAS_GLUON, reason="this Triton has no Gluon")
needs_sm90 = pytest.mark.skipif(not (HAS_GLUON and sm_at_least(9) and not sm_at_least(10)),
                                reason="the Gluon kernel runs on sm90 GPUs only")


def _sm90_facts(has_tail: bool, has_ssq: bool, head_d: int, block_n: int, slots: int) -> dict:
    """The kernel compiled for sm90 as a launch specializes it (pointers and D divisible by 16)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    def desc(rows, box):
        t = torch.zeros(rows, 16 * head_d, dtype=torch.bfloat16)
        return TensorDescriptor(t, list(t.shape), list(t.stride()), box,
                                gl.NVMMASharedLayout.get_default_for(box, gl.bfloat16))

    fn = gmod._text_attn_gluon
    zd, kd = desc(4096, [gmod.BLOCK_M, head_d]), desc(512, [block_n, head_d])
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(zdesc=mangle_type(zd), kdesc=mangle_type(kd), vdesc=mangle_type(kd), rstd_ptr="*fp32",
               ssq_ptr="*fp32", w_ptr="*bf16", n_ptr="*i32", bound_ptr="*fp32", codes_ptr="*fp8e4nv",
               scale_ptr="*fp32", qk_scale="fp32", eps="fp32")
    const = dict(HAS_TAIL=has_tail, HAS_SSQ=has_ssq, BLOCK_G=8, BLOCK_M=gmod.BLOCK_M, BLOCK_N=block_n,
                 DH=head_d, NRES=slots, num_warps=4)
    sig.update({key: "constexpr" for key in const})
    aligned = [n for n, ty in sig.items() if ty.startswith("*")] + ["D", "LK"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    compiled = triton.compile(GluonASTSource(fn, sig, constexprs=const, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    facts = {"cubin": bool(compiled.asm.get("cubin")), "shared": compiled.metadata.shared,
             "qk": f"wgmma.mma_async.sync.aligned.m64n{block_n}k16.f32.bf16.bf16" in ptx,
             "pv": f"wgmma.mma_async.sync.aligned.m64n{head_d}k16.f32.bf16.bf16" in ptx,
             "tma": ptx.count("cp.async.bulk.tensor.2d"), "try_wait": "mbarrier.try_wait.parity" in ptx,
             "local": ".local" in ptx, "st_v4": ptx.count("st.global.v4.b32"),
             "st_b8": ptx.count("st.global.b8") + ptx.count("st.global.u8"), "shfl": ptx.count("shfl.sync.idx"),
             "regs": None}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(tool):
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        facts["regs"] = int(re.search(r"REG:(\d+)", usage).group(1))
        facts["stack"] = int(re.search(r"STACK:(\d+)", usage).group(1))
    return facts


@needs_gluon
@pytest.mark.parametrize("has_tail,has_ssq,head_d,block_n,slots", [(True, False, 128, 64, 2), (False, True, 128, 64, 2),
                                                                   (True, False, 64, 64, 2), (True, False, 128, 128, 1)])
def test_gluon_kernel_compiles_for_sm90(has_tail, has_ssq, head_d, block_n, slots):
    f = facts_in_child("tests.kernels.test_norm_attention_quant_gluon", "_sm90_facts", has_tail, has_ssq, head_d,
                       block_n, slots)
    assert f["cubin"] and f["qk"] and f["pv"]  # both products are bf16 wgmmas
    assert f["tma"] >= 3 and f["try_wait"]  # the query tile and the key / value blocks arrive by TMA
    # two programs per SM: half the 228 KB of shared memory less the 1 KB each reserves, no spills
    assert f["shared"] <= 228 * 1024 // gmod.PROGRAMS_PER_SM - 1024 and not f["local"]
    # codes leave as 16-byte stores (a layout conversion), not one byte at a time from the accumulator layout
    assert f["st_v4"] >= 1 and f["st_b8"] == 0
    if f["regs"] is None:
        pytest.skip("no cuobjdump in this Triton: registers not checked")
    assert f["regs"] * 128 * gmod.PROGRAMS_PER_SM <= 65536 and f["stack"] == 0


@pytest.mark.skipif(COMPILED, reason="CPU tensors run Triton kernels only in the interpreter")
def test_dispatch_on_cpu():
    """The Gluon kernel is never chosen on CPU; asking for it is a one-line error naming the alternatives."""
    z, w, k, v, tail = _case(1, 20, 2, 64, 9, 5)
    vb = ref.value_bound_ref(v)
    assert not gmod.gluon_supported(z, k, v)
    with pytest.raises(ValueError, match="kernel='gluon' needs an sm90"):
        norm_attention_quant_triton(z, w, k, v, vb, tail, 2, 1e-6, kernel="gluon")
    with pytest.raises(ValueError, match="kernel must be one of auto, triton, gluon"):
        norm_attention_quant_triton(z, w, k, v, vb, tail, 2, 1e-6, kernel="cuda")


def test_flat_rows_views_the_same_memory():
    """The TMA views: [B, R, H, d] -> [B*R, H*d] over the same storage, or None where no single row stride exists."""
    kv = torch.zeros(2, 7, 4 * 3 * 8)
    k = kv[..., 3 * 8: 2 * 3 * 8].unflatten(-1, (3, 8))
    flat = gmod._flat_rows(k)
    assert flat.shape == (14, 24) and flat.stride() == (96, 1) and flat.data_ptr() == k.data_ptr()
    assert torch.equal(flat.view(2, 7, 3, 8), k)
    assert gmod._flat_rows(torch.zeros(2, 7, 9)[:, :5]) is None  # sample stride 63 != 5 rows of 9
    assert gmod._flat_rows(torch.zeros(1, 7, 9)[:, :5]) is not None  # one sample: any sample stride


# ----------------------------------------------------------------------------- on an sm90 GPU
_CASES = [  # B, L, H, d, Lk, n, dtype, weight dtype, persistent programs (None: two per SM)
    (1, 4096, 4, 128, 512, 100, torch.bfloat16, None, None),  # a merged 100-token prompt: resident keys
    (2, 77, 3, 128, 40, 17, torch.bfloat16, None, None),  # tiles past L read the next sample's rows
    (1, 1000, 3, 128, 300, None, torch.bfloat16, None, 5),  # 5 key blocks stream; programs cross heads
    (2, 130, 5, 64, 512, 0, torch.float16, torch.float32, 7),  # every key repeats; fp16, fp32 weight, d 64
    (1, 1, 2, 128, 70, 69, torch.bfloat16, None, None),  # one token; 70 keys, 2 blocks resident, tail of one
    (3, 200, 2, 64, 129, 128, torch.bfloat16, None, 2),  # 129 keys: 3 blocks, streamed; two programs
]


@needs_sm90
@pytest.mark.parametrize("block_n,slots", [(64, 2), (128, 1)])
@pytest.mark.parametrize("B,L,H,d,Lk,n,dt,wdt,programs", _CASES)
def test_gluon_matches_reference_and_triton(B, L, H, d, Lk, n, dt, wdt, programs, block_n, slots):
    z, w, k, v, tail = _case(B, L, H, d, Lk, n, dt, wdt)
    z[0, 0] = 0  # a zero query row
    vb = ref.value_bound_ref(v)
    args = [t.cuda() if t is not None else None for t in (z, w, k, v, vb, tail)]
    assert gmod.gluon_supported(args[0], args[2], args[3])
    cfg = {"GLUON_PROGRAMS": programs, "GLUON_BLOCK_N": block_n, "GLUON_SLOTS": slots}
    gc, gs = norm_attention_quant_triton(*args, H, 1e-6, config=cfg, kernel="gluon")
    tc, ts = norm_attention_quant_triton(*args, H, 1e-6, kernel="triton")
    rc, rs = ref.norm_attention_quant_ref(z, w, k, v, vb, tail, H, 1e-6)
    assert torch.equal(gs.cpu(), rs) and torch.equal(ts.cpu(), rs)
    assert torch.isfinite(gc.float()).all()
    assert rel(_deq(gc.cpu(), gs.cpu()), _deq(rc, rs)) < 2e-2
    assert rel(_deq(gc.cpu(), gs.cpu()), _pipeline64(z, w, k, v, H)) < 4e-2
    # same arithmetic as the Triton kernel: codes differ only where a last-bit difference crosses a rounding
    assert rel(_deq(gc, gs), _deq(tc, ts)) < 5e-3
    assert (gc.float() != tc.float()).float().mean().item() < 2e-2


@needs_sm90
def test_gluon_strided_views_sumsq_and_outlier():
    """k and v as views of one fused K/V projection output, z a view of a wider row, a value outlier (the bound
    follows it), and the row statistic from granule sums of squares instead of the rstd pass."""
    B, L, H, d, Lk = 2, 300, 4, 128, 96
    g = torch.Generator().manual_seed(5)
    zw = torch.randn(B, L, 3 * H * d, generator=g).mul_(2).to(torch.bfloat16).cuda()
    z = zw[..., H * d: 2 * H * d]
    w = (torch.rand(H * d, generator=g) + 0.5).to(torch.bfloat16).cuda()
    kv = torch.randn(B, Lk, 4 * H * d, generator=g).to(torch.bfloat16).cuda()
    kv[1, 3, 2 * H * d + 5] = 3000.0
    k = kv[..., : H * d].unflatten(-1, (H, d))
    v = kv[..., 2 * H * d: 3 * H * d].unflatten(-1, (H, d))
    vb = ref.value_bound_ref(v)
    assert gmod.gluon_supported(z, k, v)
    zf = z.float().reshape(B * L, H * d)
    ssq = zf.square().unflatten(-1, (-1, 128)).sum(-1).contiguous()
    rc, rs = ref.norm_attention_quant_ref(z.cpu(), w.cpu(), k.cpu(), v.cpu(), vb.cpu(), None, H, 1e-6)
    for sumsq in (None, ssq):
        gc, gs = norm_attention_quant_triton(z, w, k, v, vb, None, H, 1e-6, sumsq=sumsq, kernel="gluon")
        tc, ts = norm_attention_quant_triton(z, w, k, v, vb, None, H, 1e-6, sumsq=sumsq, kernel="triton")
        assert torch.equal(gs.cpu(), rs)
        assert rel(_deq(gc.cpu(), gs.cpu()), _deq(rc, rs)) < 2e-2
        assert rel(_deq(gc, gs), _deq(tc, ts)) < 5e-3
