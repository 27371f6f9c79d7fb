"""`block_map` (key means, V scales, block scores and the top-k LUT in one launch) against the two-kernel
path it replaces (`key_means` + `topk_lut`) and against fp64 block scores centred on the key mean."""

from __future__ import annotations

import pytest
import torch

from tests._env import kernel_device, triton_runs_here

DEV = kernel_device()
pytestmark = pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")


def _inputs(L, block_k, D, BH, Qb, NC, seed):
    """Pass A's outputs for random k with large channel means (so that centring matters)."""
    g = torch.Generator().manual_seed(seed)
    Kb = -(-L // block_k)
    cnt = torch.full((Kb,), float(block_k))
    cnt[-1] = L - (Kb - 1) * block_k
    means = 4.0 * torch.randn(BH, 1, D, generator=g)
    kblk = (means + torch.randn(BH, Kb, D, generator=g)) * cnt[None, :, None]  # k sums per key block
    qpool = torch.randn(BH, Qb, D, generator=g)
    vmax = torch.rand(BH, NC, D, generator=g) * 5
    return qpool.to(DEV), kblk.to(DEV), vmax.to(DEV), cnt


def _exact_scores(qpool, kblk, cnt, L):
    """fp64 q̄·(k̄ − km), k̄ the key block means and km the key mean."""
    kb = kblk.double().cpu()
    km = kb.sum(1, keepdim=True) / L
    return qpool.double().cpu() @ (kb / cnt[None, :, None].double() - km).transpose(1, 2)


@pytest.mark.parametrize("L,block_k,D,Qb,rows,precision", [
    (1000, 16, 64, 20, 16, "tf32"),  # 63 key blocks, Qb not a multiple of the rows per program
    (4100, 16, 128, 40, 16, "fp32"),  # 257 key blocks: the top-k runs 8 of the 16 rows at a time
    (203, 32, 64, 7, 32, "tf32"),  # one program's rows past Qb, a short last key block
    (40, 32, 64, 3, 16, "fp32"),  # two key blocks, keep one
])
def test_block_map_matches_two_kernel_path(L, block_k, D, Qb, rows, precision):
    from turbocompile.kernels.sagesla.block_map import block_map
    from turbocompile.kernels.sagesla.triton_prep import EPS_SCALE, key_means, topk_lut

    BH, NC = 3, 5
    qpool, kblk, vmax, cnt = _inputs(L, block_k, D, BH, Qb, NC, seed=L)
    Kb = kblk.shape[1]
    T = max(1, int(0.1 * Kb))
    km, vscale, lut = block_map(qpool, kblk, vmax, L, block_k, T, EPS_SCALE, precision, rows=rows)
    km2, vscale2, scores = key_means(qpool, kblk, vmax, L, block_k, precision)
    lut2 = topk_lut(scores, T, 1, 4)
    assert lut.shape == (BH, Qb, T) and lut.dtype == torch.int32
    assert torch.equal(vscale, vscale2)
    assert torch.allclose(km, km2, rtol=1e-6, atol=1e-6)
    assert torch.equal(lut, lut2)  # centring on another vector keeps each row's ranking
    # and it is a top-T of the exact km-centred scores
    exact = _exact_scores(qpool, kblk, cnt, L)
    sel = lut.long().cpu()
    assert (sel[..., 1:] > sel[..., :-1]).all(), "LUT rows must be strictly ascending"
    kept = exact.gather(-1, sel).amin(-1)
    dropped = exact.scatter(-1, sel, -float("inf")).amax(-1)
    assert (kept >= dropped - 1e-6 * exact.abs().amax()).all()


def test_block_map_ties_keep_the_lowest_blocks():
    """Identical key blocks (the last one short) tie every score: each row keeps blocks 0..T-1."""
    from turbocompile.kernels.sagesla.block_map import block_map

    L, block_k, D, BH, Qb = 300, 32, 64, 2, 5
    Kb = -(-L // block_k)
    cnt = torch.full((Kb,), float(block_k))
    cnt[-1] = L - (Kb - 1) * block_k
    kblk = (0.5 * torch.ones(BH, Kb, D) * cnt[None, :, None]).to(DEV)  # every block mean is exactly 0.5
    qpool = torch.randn(BH, Qb, D).to(DEV)
    vmax = torch.zeros(BH, 1, D).to(DEV)
    km, vscale, lut = block_map(qpool, kblk, vmax, L, block_k, 3, 1e-7)
    assert torch.equal(lut.cpu(), torch.arange(3, dtype=torch.int32).expand(BH, Qb, 3))
    assert torch.allclose(km.cpu(), torch.full((BH, D), 0.5))
    assert torch.equal(vscale.cpu(), torch.full((BH, D), 1e-7))  # zero maxima: the epsilon alone


def test_prepare_with_the_fused_block_map():
    """`prepare(tune={"topk": "fused"})` gives the operands of the default path; contradictory knobs
    are refused with the valid choices."""
    from turbocompile.kernels.sagesla.triton_prep import prepare

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 700, 2, 64, generator=g).to(DEV) for _ in range(3))
    k = k + 3.0 * torch.randn(1, 1, 2, 64, generator=g).to(DEV)
    base = prepare(q, k, v, 0.2, 32, 32, "int8-fp8", True)
    fused = prepare(q, k, v, 0.2, 32, 32, "int8-fp8", True, tune={"topk": "fused", "map_rows": 32})
    for key in ("lut", "kq", "kscale", "vq", "vscale", "kv_parts", "ks_parts"):
        assert torch.equal(fused[key], base[key]), key
    dense = prepare(q, k, v, 1.0, 32, 32, "int8-fp8", False, tune={"topk": "fused"})
    assert dense["dense"] and dense["lut"] is None
    with pytest.raises(ValueError, match="need topk 'triton' or 'torch'"):
        prepare(q, k, v, 0.2, 32, 32, "int8-fp8", False, tune={"topk": "fused", "scores": "bf16"})
    with pytest.raises(ValueError, match="valid: 'triton', 'torch', 'fused'"):
        prepare(q, k, v, 0.2, 32, 32, "int8-fp8", False, tune={"topk": "heap"})


def test_block_map_rejects_bf16_scores():
    from turbocompile.kernels.sagesla.block_map import block_map

    qpool, kblk, vmax, _ = _inputs(100, 32, 64, 1, 2, 1, seed=0)
    with pytest.raises(ValueError, match="valid: 'fp32', 'tf32'"):
        block_map(qpool, kblk, vmax, 100, 32, 1, 1e-7, "bf16")


def _pdl_ptx_facts() -> dict:
    """Each chained Triton kernel of `prepare`, compiled for sm90 with PDL: (waits, releases, wait before
    release and before the first global access). Run in a child process (`sm90_child`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from turbocompile.kernels.sagesla import block_map, triton_prep

    f32 = "*fp32"
    kernels = {
        "block_map": (block_map._block_map_kernel,
                      dict(qpool_ptr=f32, kblk_ptr=f32, vmax_ptr=f32, km_ptr=f32, vscale_ptr=f32, scores_ptr=f32,
                           lut_ptr="*i32", eps="fp32"),
                      dict(HEAD_D=128, ROWS=16, TOPK_ROWS=16, BK=32, KBP=256, BC=16, TF32=True, STAGES=2)),
        "key_means": (triton_prep._key_means_kernel,
                      dict(qpool_ptr=f32, kblk_ptr=f32, vmax_ptr=f32, km_ptr=f32, vscale_ptr=f32, scores_ptr=f32,
                           eps="fp32"),
                      dict(HEAD_D=128, BQ=64, BK=32, BC=16, SCORES=True, PREC=1, STAGES=1)),
        "topk": (triton_prep._topk_lut_kernel, dict(s_ptr=f32, lut_ptr="*i32"), dict(ROWS=1, KBP=256)),
        "quant": (triton_prep._quant_kv_kernel,
                  dict(k_ptr="*bf16", v_ptr="*bf16", km_ptr=f32, vscale_ptr=f32, kq_ptr="*i8", kscale_ptr=f32,
                       vq_ptr="*fp8e4nv", kv_ptr=f32, ks_ptr=f32),
                  dict(CHUNK=128, BLOCK_K=128, HEAD_D=128, QUANT=1, LINEAR=False, EXACT_FP8=False, STAGES=1,
                       VPERM=True)),
    }
    facts = {}
    for name, (fn, ptrs, const) in kernels.items():
        const = dict(const, PDL=True)
        sig = {arg: "i32" for arg in fn.arg_names}
        sig.update(ptrs)
        sig.update({key: "constexpr" for key in const})
        ptx = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": 4, "launch_pdl": True}).asm["ptx"]
        body = ptx[ptx.index(".entry"):]
        wait, release = body.find("griddepcontrol.wait"), body.find("griddepcontrol.launch_dependents")
        first_access = min(i for i in (body.find("ld.global"), body.find("st.global"), body.find("cp.async"))
                           if i >= 0)
        facts[name] = [body.count("griddepcontrol.wait"), body.count("griddepcontrol.launch_dependents"),
                       0 <= wait < release < first_access]
    return facts


def test_chained_kernels_wait_before_they_read():
    """Programmatic dependent launch (`pdl`): every chained Triton kernel waits for the previous kernel
    and only then releases the next one, before its first global memory access (the order that makes any
    mix of chained and plain launches safe)."""
    from tests.kernels.sm90_child import facts_in_child

    facts = facts_in_child("tests.kernels.test_sagesla_block_map", "_pdl_ptx_facts")
    assert facts == {name: [1, 1, True] for name in ("block_map", "key_means", "topk", "quant")}, facts


def test_pdl_knob_is_inert_off_hopper():
    """``pdl`` asks for chained launches; where they cannot run (CPU, the interpreter) `prepare` launches as
    usual and returns the same operands, and says so in ``pdl``."""
    from turbocompile.kernels.sagesla.pdl import pdl_active, pdl_launch_kwargs
    from turbocompile.kernels.sagesla.triton_prep import prepare

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 300, 2, 64, generator=g).to(DEV) for _ in range(3))
    base = prepare(q, k, v, 0.3, 32, 32, "int8-fp8", True)
    chained = prepare(q, k, v, 0.3, 32, 32, "int8-fp8", True, tune={"pdl": 1})
    assert base["pdl"] is False and chained["pdl"] is pdl_active(1, q)
    if not q.is_cuda:
        assert chained["pdl"] is False and pdl_launch_kwargs(False) == {}
    for key in ("lut", "kq", "kscale", "vq", "vscale", "kv_parts", "ks_parts"):
        assert torch.equal(chained[key], base[key]), key
