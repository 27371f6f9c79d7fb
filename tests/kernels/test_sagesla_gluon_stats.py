"""The Gluon statistics kernel of SageSLA's linear branch (sm90). Gluon has no interpreter, so on CPU it is
compiled for sm90 and its instructions checked, and `prepare`'s dispatch and grid are tested; its numbers
are checked on the GPU against an fp64 reference and the Triton kernel by `benchmarks/probe_gluon_stats.py`
(RESULTS.md)."""

from __future__ import annotations

import math

import pytest
import torch
import triton

from tests._bits import COMPILED
from tests.kernels.sm90_child import facts_in_child
from turbocompile.kernels.sagesla import gluon_stats
from turbocompile.kernels.sagesla.linear_fold import linear_state
from turbocompile.kernels.sagesla.triton_prep import prepare

needs_gluon = pytest.mark.skipif(not gluon_stats.HAS_GLUON, reason="this Triton has no Gluon")


def _sm90_facts(pool: bool, pool_q: bool, stages: int, pdl: bool = False) -> dict:
    """What the kernel compiled for sm90 contains (run in a child process: `sm90_child`)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    x = torch.zeros(2, 300, 3, 128, dtype=torch.bfloat16)
    lay = gl.NVMMASharedLayout.get_default_for([1, gluon_stats.ROWS, 1, 128], gl.bfloat16)
    desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [1, gluon_stats.ROWS, 1, 128], lay)
    fn = gluon_stats._linear_stats_gluon
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(qdesc=mangle_type(desc), kdesc=mangle_type(desc), vdesc=mangle_type(desc), kv_ptr="*fp32",
               ks_ptr="*fp32", vmax_ptr="*fp32", qpool_ptr="*fp32", kblk_ptr="*fp32")
    const = dict(CHUNK=384, ROWS=gluon_stats.ROWS, HEAD_D=128, NS=stages, POOL=pool, POOL_Q=pool_q, BLOCK_Q=64,
                 BLOCK_K=128, PDL=pdl, num_warps=gluon_stats.WARPS)
    sig.update({key: "constexpr" for key in const})
    compiled = triton.compile(GluonASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": gluon_stats.WARPS})
    ptx = compiled.asm["ptx"]
    return {"shared": compiled.metadata.shared, "tma4d": ptx.count("cp.async.bulk.tensor.4d"),
            "wgmma_bf16": "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in ptx,
            "mma_sync": ptx.count("mma.sync.aligned"), "local": ".local" in ptx,
            "gdc": [ptx.count("griddepcontrol.wait"), ptx.count("griddepcontrol.launch_dependents")]}


@needs_gluon
@pytest.mark.parametrize("pool,pool_q,stages,pdl", [(True, True, 3, False), (True, False, 3, True), (False, False, 4, False)])
def test_gluon_stats_compiles_for_sm90(pool, pool_q, stages, pdl):
    facts = facts_in_child("tests.kernels.test_sagesla_gluon_stats", "_sm90_facts", pool, pool_q, stages, pdl)
    # a chained launch (`pdl`) waits for the previous kernel and releases the next one, once each
    assert facts["gdc"] == ([1, 1] if pdl else [0, 0])
    # k and v (and q) by 4-d TMA straight from [B, L, H, D]: the prologue's NS steps and the loop's refill
    assert facts["tma4d"] >= (stages + 1) * (3 if pool_q else 2)
    assert facts["wgmma_bf16"]  # vᵀ·φ(k) on the tensor cores
    assert (facts["mma_sync"] > 0) == pool  # column sums (k, and q) on the tensor cores only when pooling
    assert not facts["local"]  # no spills to local memory
    assert facts["shared"] <= 227 * 1024  # fits one program per SM


def test_chunks_fill_whole_waves_and_hold_whole_blocks():
    for L, BH, sms in ((32760, 12, 132), (75600, 40, 132), (32760, 12, 114), (4096, 4, 132), (100, 1, 132)):
        rows = gluon_stats.chunk_rows(L, BH, 128, sms)
        assert rows % 128 == 0 and rows >= 128
        progs = BH * math.ceil(L / rows)
        if L >= 32760:  # large inputs: at least 90% of the SM slots of the last wave are busy
            assert progs / (math.ceil(progs / sms) * sms) >= 0.9, (L, BH, sms, rows, progs)
    assert gluon_stats.chunk_rows(32760, 12, 128, 132) == 3072  # 11 chunks per head: 132 programs


@pytest.mark.skipif(COMPILED, reason="CPU tensors run Triton kernels only in the interpreter")
def test_not_supported_on_cpu_so_prepare_runs_the_triton_kernel():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 300, 2, 128, generator=g).to(torch.bfloat16) for _ in range(3))
    assert not gluon_stats.stats_supported(q, k, v, 64, 128)
    on = prepare(q, k, v, 0.3, 64, 128, "int8-fp8", True, {"lin_gluon": 1})
    off = prepare(q, k, v, 0.3, 64, 128, "int8-fp8", True, {"lin_gluon": 0})
    for a, b in zip(linear_state(on), linear_state(off)):
        assert torch.equal(a, b)
    assert torch.equal(on["lut"], off["lut"]) and torch.equal(on["kq"], off["kq"])
