"""SageSLA kernels (Triton, CPU interpreter on CPU) and reference vs independent fp32 math.

The fp32 oracle below is written from the semantics (TurboDiffusion main-branch SLA), with
explicit per-block loops; it does not call ``turbocompile.kernels.sagesla.ref``.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from tests._bits import COMPILED
from tests._env import kernel_device, triton_runs_here
from turbocompile.kernels.sagesla.triton_attn import exp2_fma
from turbocompile.kernels.sagesla.triton_prep import round_e4m3
from turbocompile.ops.attention import sagesla

DEV = kernel_device()
BACKENDS = ["torch"] + (["triton"] if triton_runs_here() else [])


# ----------------------------------------------------------------------------- oracle
def oracle_lut(q, k, topk, bq, bk):
    """Kept key blocks per (b, h, query block): list of sets, via explicit block loops."""
    B, L, H, D = q.shape
    qf, kf = q.double(), k.double()
    kf = kf - kf.mean(dim=1, keepdim=True)
    Qb, Kb = -(-L // bq), -(-L // bk)
    qbar = torch.stack([qf[:, i * bq:(i + 1) * bq].mean(1) for i in range(Qb)], 1)  # [B, Qb, H, D]
    kbar = torch.stack([kf[:, j * bk:(j + 1) * bk].mean(1) for j in range(Kb)], 1)  # [B, Kb, H, D]
    scores = torch.einsum("bihd,bjhd->bhij", qbar, kbar)
    keep = max(1, int(topk * Kb))
    return scores, keep


def oracle(q, k, v, topk, bq, bk, w=None, bias=None, lut=None):
    """fp32/fp64 SageSLA semantics without quantization. ``lut`` [B,H,Qb,T] may be given to
    score the same selection as the kernel (ties in the top-k may be broken either way)."""
    B, L, H, D = q.shape
    qf, kf, vf = q.double(), k.double(), v.double()
    scores, keep = oracle_lut(q, k, topk, bq, bk)
    Qb, Kb = scores.shape[-2:]
    out = torch.zeros(B, L, H, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(H):
            for i in range(Qb):
                sel = lut[b, h, i].tolist() if lut is not None else scores[b, h, i].topk(keep).indices.tolist()
                cols = torch.cat([torch.arange(j * bk, min(L, (j + 1) * bk)) for j in sorted(sel)]).to(q.device)
                rows = slice(i * bq, min(L, (i + 1) * bq))
                s = qf[b, rows, h] @ kf[b, cols, h].T / math.sqrt(D)
                out[b, rows, h] = torch.softmax(s, -1) @ vf[b, cols, h]
    if w is not None:
        pq, pk = torch.softmax(qf, -1), torch.softmax(kf, -1)
        kv = torch.einsum("blhd,blhe->bhde", pk, vf)
        ks = pk.sum(1)  # [B, H, D]
        ol = torch.einsum("blhd,bhde->blhe", pq, kv) / (1e-5 + torch.einsum("blhd,bhd->blh", pq, ks))[..., None]
        out = out + ol @ w.double().T
    if bias is not None:
        out = out + bias.double()
    return out


def assert_valid_topk(lut, scores, keep, tol=1e-4):
    """lut [B,H,Qb,T] (on any device) is a strictly ascending top-``keep`` of the oracle's block scores:
    no dropped block scores above a kept one (beyond ``tol``; ties may be broken either way)."""
    lut, scores = lut.long().cpu(), scores.cpu()
    assert lut.shape[-1] == keep
    assert (lut[..., 1:] > lut[..., :-1]).all(), "LUT must be strictly ascending"
    worst_kept = scores.gather(-1, lut).amin(-1)
    best_dropped = scores.scatter(-1, lut, -math.inf).amax(-1)
    assert (worst_kept >= best_dropped - tol).all(), (worst_kept - best_dropped).min()


def metrics(out, ref):
    o, r = out.double().flatten(), ref.double().flatten()
    cos = (o @ r / (o.norm() * r.norm() + 1e-300)).item()
    l1 = ((o - r).abs().sum() / r.abs().sum()).item()
    return cos, l1


def rand(B, L, H, D, dtype=torch.bfloat16, scale=1.0):
    return [(torch.randn(B, L, H, D, device=DEV) * scale).to(dtype) for _ in range(3)]


def e4m3_pv_floor(q, k, v):
    """rel-L1 vs exact attention of exact attention with only P (as 448·p) and V (per-channel scale)
    rounded to e4m3, everything else in fp64: the error that FP8 P·V alone costs, whatever the kernel."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    s = qd @ kd.transpose(-1, -2) / qd.shape[-1] ** 0.5
    p = torch.exp(s - s.amax(-1, keepdim=True))
    ref = (p @ vd) / p.sum(-1, keepdim=True)
    scale = vd.abs().amax(-2, keepdim=True) / 448 + 1e-30

    def e4m3(x):
        return x.float().to(torch.float8_e4m3fn).double()

    o = (e4m3(448 * p) / 448) @ (e4m3(vd / scale) * scale) / p.sum(-1, keepdim=True)
    return ((o - ref).abs().sum() / ref.abs().sum()).item()


def test_e4m3_pv_floor_exceeds_the_l1_target_on_zero_mean_v():
    """Why int8-fp8 dense mode gets its own rel-L1 bound on zero-mean random V: rounding P and V to e4m3
    (3 mantissa bits, ~2.7% relative each) already costs more than 0.03 there, because the output is
    itself an average of zero-mean values and the rounding errors do not cancel against it. With a
    channel mean in V (real activations) the same rounding costs far less."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1000, 2, 128, generator=g) for _ in range(3))
    zero_mean = e4m3_pv_floor(q, k, v)
    with_mean = e4m3_pv_floor(q, k, v + 0.5)
    assert 0.033 < zero_mean < 0.042, zero_mean  # 0.037 measured
    assert with_mean < 0.01, with_mean


# ----------------------------------------------------------------------------- dense mode
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,D,quant,v_mean", [
    (1, 64, "int8-fp8", 0.0), (37, 128, "int8-fp8", 0.5), (200, 64, "int8-fp16", 0.0),
    (300, 128, "int8-fp8", 0.0), (300, 64, "int8-fp8", 0.5), (200, 128, "none", 0.0),
])
def test_dense_matches_sdpa(backend, L, D, quant, v_mean):
    q, k, v = rand(1, L, 2, D)
    v = (v.float() + v_mean).to(v.dtype)
    out = sagesla(q, k, v, topk=1.0, quant=quant, backend=backend)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    cos, l1 = metrics(out, ref)
    # Zero-mean random V is the worst case for FP8 P·V: e4m3 keeps 3 mantissa bits, so P and V
    # each carry ~2-3% relative rounding error that does not average out against an output that
    # is itself an average of zero-mean values. The bound there is the 0.03 or, where the
    # e4m3 rounding of P and V alone already costs more (`e4m3_pv_floor`), that floor plus 15% for
    # the INT8 Q/K (which adds ~0.013 in quadrature: 0.039 against a floor of 0.037 measured).
    # Real activations (V with a channel mean, as here with v_mean=0.5) land at 0.003-0.01.
    l1_max = 0.03
    if quant == "int8-fp8" and v_mean == 0.0:
        l1_max = max(0.03, 1.15 * e4m3_pv_floor(q, k, v))
    assert cos >= 0.999 and l1 <= l1_max, (cos, l1, l1_max)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant,v_mean", [("int8-fp8", 0.5), ("int8-fp16", 0.0)])
def test_dense_k_channel_outliers(backend, quant, v_mean):
    q, k, v = rand(1, 200, 2, 128)
    # K-channel outliers as observed in DiTs: large per-channel offsets shared by all tokens
    # (smooth-K removes them before INT8 quantization; without it, INT8 K collapses)
    k = (k.float() + torch.randn(128, device=DEV) * 8 + (torch.arange(128, device=DEV) == 5) * 40).bfloat16()
    v = (v.float() + v_mean).bfloat16()
    out = sagesla(q, k, v, topk=1.0, block_q=64, block_k=64, quant=quant, backend=backend)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    cos, l1 = metrics(out, ref)
    assert cos >= 0.999 and l1 <= 0.03, (cos, l1)


# ----------------------------------------------------------------------------- sparse mode
def _kernel_lut(q, k, topk, bq, bk, backend="torch"):
    """The selection the given backend makes (ties in the top-k may be broken differently:
    the reference uses torch.topk, the Triton block map a bisection that prefers low indices)."""
    if backend == "triton":
        from turbocompile.kernels.sagesla.triton_prep import prepare

        p = prepare(q, k, k, topk, bq, bk, "int8-fp8", linear=False)
        B, L, H, _ = q.shape
        if p["dense"]:
            return torch.arange(p["Kb"], device=q.device).expand(B, H, p["Qb"], p["Kb"])
        return p["lut"].view(B, H, -1, p["T"]).long()
    from turbocompile.kernels.sagesla.ref import block_lut_ref
    return block_lut_ref(q, k, topk, bq, bk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,D,bq,bk,topk,quant", [
    (300, 64, 32, 32, 0.3, "int8-fp8"),
    (300, 128, 64, 32, 0.25, "int8-fp16"),
    (200, 64, 16, 32, 0.5, "none"),
])
def test_sparse_matches_semantics(backend, L, D, bq, bk, topk, quant):
    q, k, v = rand(1, L, 2, D)
    w = torch.randn(D, D, device=DEV) / math.sqrt(D)
    bias = torch.randn(D, device=DEV) * 0.1
    out, dens = sagesla(q, k, v, topk=topk, proj_weight=w, proj_bias=bias, block_q=bq, block_k=bk,
                        quant=quant, backend=backend, return_density=True)
    kb = -(-L // bk)
    assert dens == pytest.approx(int(topk * kb) / kb)
    ref = oracle(q, k, v, topk, bq, bk, w, bias)
    cos, l1 = metrics(out, ref)
    # rel-L1 (cosine cannot see a scale error). Observed over seeds 0-2, both backends: int8-fp8 0.029-0.030
    # (zero-mean V, e4m3 P and V: the floor test_dense_matches_sdpa documents; bound as there), int8-fp16
    # 0.010-0.011, none 0.0014 (torch) / 0.006 (Triton: P rounded to bf16 for the PV product).
    l1_max = {"int8-fp8": 0.045, "int8-fp16": 0.02, "none": 0.003 if backend == "torch" else 0.012}[quant]
    assert cos >= 0.995 and l1 <= l1_max, (cos, l1)
    # a sparse result must differ from dense attention (the selection is really applied)
    dense = oracle(q, k, v, 1.0, bq, bk, w, bias)
    assert metrics(ref, dense)[0] < 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_block_kept(backend):
    q, k, v = rand(1, 300, 1, 64)
    out, dens = sagesla(q, k, v, topk=1e-3, block_q=32, block_k=32, backend=backend, return_density=True)
    assert dens == pytest.approx(1 / 10)
    ref = oracle(q, k, v, 1e-3, 32, 32)
    cos, l1 = metrics(out, ref)
    assert cos >= 0.995 and l1 <= 0.045, (cos, l1)  # int8-fp8, zero-mean V: l1 0.033-0.034 observed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["zero_blocks", "constant_rows", "huge"])
def test_awkward_inputs_finite_and_close(backend, case):
    q, k, v = rand(1, 200, 2, 64)
    if case == "zero_blocks":
        q[:, :64] = 0
        k[:, 64:128] = 0
        v[:, 64:128] = 0
        v[..., 3] = 0  # an all-zero V channel: its FP8 scale must not give 0/0
    elif case == "constant_rows":
        q[:, 10:50] = 0.5
        k[:, :] = 0.25
    else:
        q = q * 200  # very peaked softmax, scores ~ 1e4
        v = v * 3000
    w = torch.randn(64, 64, device=DEV) * 0.1
    out = sagesla(q, k, v, topk=0.5, proj_weight=w, block_q=32, block_k=32, backend=backend)
    assert torch.isfinite(out).all()
    lut = _kernel_lut(q, k, 0.5, 32, 32, backend)  # constant inputs tie every score: score the same pick
    scores, keep = oracle_lut(q, k, 0.5, 32, 32)
    # the pick is a valid top-k of the fp64 block scores (zero / constant blocks tie; the rest must rank)
    assert_valid_topk(lut, scores, keep, tol=1e-4 * max(1.0, scores.abs().max().item()))
    ref = oracle(q, k, v, 0.5, 32, 32, w, lut=lut)
    cos, l1 = metrics(out, ref)
    # rel-L1 observed over seeds 0-2, both backends: zero_blocks 0.029-0.031, constant_rows 0.020-0.028.
    # huge: scores ~1e4 make the softmax one-hot, and INT8 Q/K (steps of 1/127 of a block's max) move
    # scores by tens, so in some rows another key wins outright; the row then is a different V row.
    # Over seeds 0-11 (CPU) cos 0.984-0.998, rel-L1 0.030-0.053; an H100's sample (seed 0): cos 0.9949.
    cos_min, l1_max = (0.98, 0.07) if case == "huge" else (0.995, 0.045)
    assert cos >= cos_min and l1 <= l1_max, (cos, l1)


# ----------------------------------------------------------------------------- block map
@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("L,bq,bk,topk", [(300, 32, 32, 0.3), (200, 16, 64, 0.5), (37, 64, 128, 0.1)])
def test_block_map_matches_torch(L, bq, bk, topk):
    from turbocompile.kernels.sagesla.triton_prep import prepare

    q, k, v = rand(2, L, 2, 64)
    p = prepare(q, k, v, topk, bq, bk, "int8-fp8", linear=False)
    scores, keep = oracle_lut(q, k, topk, bq, bk)
    assert p["T"] == keep
    if p["dense"]:  # every key block kept: the kernel iterates them directly, no LUT is built
        assert p["lut"] is None and keep == p["Kb"]
        lut = torch.arange(p["Kb"]).expand(2, 2, p["Qb"], p["Kb"])
    else:
        lut = p["lut"].view(2, 2, -1, p["T"])
    assert_valid_topk(lut, scores, keep)  # a valid top-k (ties either way)


# ----------------------------------------------------------------------------- dtype / layout
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_layout_and_strided_inputs(backend):
    B, L, H, D = 2, 70, 2, 64
    qkv = torch.randn(B, L, 3, H, D, device=DEV).half()
    q, k, v = qkv.unbind(2)  # non-contiguous views, as a fused qkv projection produces
    w = torch.randn(D, D, device=DEV) * 0.05
    out = sagesla(q, k, v, topk=0.5, proj_weight=w, block_q=32, block_k=32, backend=backend)
    assert out.dtype == torch.float16 and out.shape == (B, L, H, D) and out.is_contiguous()
    ref = sagesla(q.contiguous(), k.contiguous(), v.contiguous(), topk=0.5, proj_weight=w,
                  block_q=32, block_k=32, backend=backend)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    cos, l1 = metrics(out, oracle(q, k, v, 0.5, 32, 32, w))
    assert cos >= 0.995 and l1 <= 0.045, (cos, l1)  # int8-fp8, zero-mean V: l1 0.031-0.033 observed


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("shape", ["small_blocks", "default_blocks"])
@pytest.mark.parametrize("quant", ["int8-fp8", "int8-fp16", "none"])
def test_triton_matches_reference_closely(quant, shape):
    """Same quantization recipe in both: the kernel tracks the fake-quant reference tightly.
    default_blocks: the production block_q=64 / block_k=128 tiles, B=2, D=64, L=1000 (8 key blocks, the
    last one partial: 104 rows), T=2 blocks per query block, and a V channel with x50 outliers (its own
    FP8 scale)."""
    if shape == "small_blocks":
        q, k, v = rand(1, 150, 2, 128)
        kw = dict(topk=0.4, block_q=32, block_k=32)
    else:
        q, k, v = rand(2, 1000, 1, 64)
        v[..., 7] *= 50
        kw = dict(topk=0.3)
        lut = _kernel_lut(q, k, 0.3, 64, 128, "triton")
        assert lut.shape[-1] == 2 and (lut == 7).any()  # the partial tail block is attended
    D = q.shape[-1]
    w = torch.randn(D, D, device=DEV) * 0.05
    b = torch.randn(D, device=DEV) * 0.05
    kw.update(proj_weight=w, proj_bias=b, quant=quant)
    t = sagesla(q, k, v, backend="triton", **kw)
    r = sagesla(q, k, v, backend="torch", **kw)
    cos, l1 = metrics(t, r)
    # int8-fp8: P is rounded to e4m3 (6% steps) in both; an exponent that differs in its last
    # fp32 bits (MUFU ex2 vs torch.exp, FMA order) moves a few P values across a rounding
    # boundary, which puts the agreement floor at cos ~0.99990 +- 1e-5 over seeds.
    assert cos >= (0.9998 if quant == "int8-fp8" else 0.9999) and l1 <= 0.015, (cos, l1)


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("split_linear", [True, False])
def test_dense_block_m_and_linear_epilogue_variants(split_linear):
    """Dense mode with 128-row programs (two 64-row quantization groups per tile) equals the
    64-row programs; the linear branch split into its own kernel matches the fused epilogue."""
    from turbocompile.kernels.sagesla.triton_attn import launch_attn
    from turbocompile.kernels.sagesla.triton_prep import prepare

    q, k, v = rand(1, 200, 1, 64)
    w = torch.randn(64, 64, device=DEV) * 0.1
    b = torch.randn(64, device=DEV) * 0.1
    p = prepare(q, k, v, 1.0, 64, 128, "int8-fp8", linear=True)
    assert p["dense"] and p["lut"] is None
    o64 = launch_attn(q, k, v, p, w, b, 64, 128, block_m=64, split_linear=split_linear)
    o128 = launch_attn(q, k, v, p, w, b, 64, 128, block_m=128, split_linear=split_linear)
    if COMPILED:  # on sm90 block_m 64 is the Gluon kernel, 128 the Triton one: other MMA shapes and orders,
        # so the fp32 accumulators differ in their last bits and some outputs round to the next bf16 step
        # (H100: 31.5% of elements one step apart, max |Δ| 2^-8, i.e. rel-L1 ~1.6e-3). Bound: every element
        # one bf16 step apart at most (a step is 2^-8..2^-7 of the value: rel-L1 <= ~6e-3)
        cos, l1 = metrics(o64, o128)
        assert cos >= 0.9999 and l1 <= 6e-3, (cos, l1)
    else:
        torch.testing.assert_close(o64, o128, atol=0, rtol=0)
    fused = launch_attn(q, k, v, p, w, b, 64, 128, split_linear=False)
    assert metrics(o64, fused)[0] >= 0.99999  # split: o_l rounded to the output dtype once more


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("quant", ["int8-fp8", "int8-fp16"])
@pytest.mark.parametrize("var", [dict(cvt=0), dict(cvt=1), dict(cvt=2), dict(expm=1), dict(expm=2),
                                 dict(p8=1), dict(tma=True), dict(cvt=2, expm=2, p8=1, tma=True)])
def test_inner_loop_variants_agree(quant, var):
    """Every inner-loop variant (int32->fp32 conversion, exponent on MUFU or the FMA polynomial,
    P cast, TMA K/V loads) computes the same attention; L = 200 leaves a partial tail block."""
    from turbocompile.kernels.sagesla.triton_attn import launch_attn
    from turbocompile.kernels.sagesla.triton_prep import prepare

    if quant == "int8-fp16" and "p8" in var:
        pytest.skip("p8 is the FP8 P cast")
    q, k, v = rand(1, 200, 2, 64)
    prep = prepare(q, k, v, 0.5, 32, 32, quant, False)
    ref = launch_attn(q, k, v, prep, None, None, 32, 32, cvt=0, expm=0, p8=0, tma=False)
    out = launch_attn(q, k, v, prep, None, None, 32, 32, **var)
    cos, l1 = metrics(out, ref)
    assert torch.isfinite(out).all() and cos >= 0.99995 and l1 <= 0.006, (cos, l1)


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("block_k", [32, 128, 16])
def test_fp8_v_key_order(block_k):
    """FP8 V is stored with its keys in `permute_keys` order within every 32 (block_k a multiple
    of 32; other sizes keep key order): it is exactly the key-order operand permuted, and the
    attention kernel (which permutes P alike) gives bit-identical outputs from either layout."""
    from turbocompile.kernels.sagesla.triton_attn import launch_attn
    from turbocompile.kernels.sagesla.triton_prep import prepare

    q, k, v = rand(1, 150, 2, 64)
    perm = prepare(q, k, v, 0.5, 32, block_k, "int8-fp8", False)
    plain = prepare(q, k, v, 0.5, 32, block_k, "int8-fp8", False, tune=dict(v_perm=0))
    assert perm["v_perm"] == (block_k % 32 == 0) and not plain["v_perm"]
    r = torch.arange(perm["Lpad"])
    c = r % 32
    pos = r - c + (c & 16) + ((c >> 1) & 3) * 4 + ((c >> 3) & 1) * 2 + (c & 1) if perm["v_perm"] else r
    assert sorted(pos.tolist()) == r.tolist()  # a permutation within each block
    assert torch.equal(perm["vq"][..., pos].view(torch.int8), plain["vq"].view(torch.int8))
    for key in ("kq", "kscale", "vscale", "lut"):
        assert torch.equal(perm[key], plain[key]), key
    o_perm = launch_attn(q, k, v, perm, None, None, 32, block_k)
    o_plain = launch_attn(q, k, v, plain, None, None, 32, block_k)
    assert torch.equal(o_perm, o_plain)


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("L,D", [(1, 64), (97, 64), (67, 128)])  # odd lengths: a short last block
def test_linear_statistics_placements_agree(L, D):
    """φ(k)ᵀv and Σφ(k) are the same wherever they are computed: pass A, pass B, their own kernel
    (row-major or transposed k tiles, the transposed product vᵀφ(k), several rows per step and
    programs per head), and vs fp64."""
    from turbocompile.kernels.sagesla.linear_fold import linear_state
    from turbocompile.kernels.sagesla.triton_prep import prepare

    q, k, v = rand(2, L, 2, D)
    pk = torch.softmax(k.double(), -1)
    kv_ref = torch.einsum("blhd,blhe->bhde", pk, v.double()).reshape(4, D, D)
    ks_ref = pk.sum(1).reshape(4, D)
    tunes = [dict(linear_in="a"), dict(linear_in="b"), dict(linear_in="c"), dict(linear_in="c", lin_kt=1),
             dict(linear_in="c", lin_block=32, progs_l=16, lin_stages=1), dict(linear_in="c", lin_kt=1, lin_block=16),
             dict(linear_in="c", lin_vmax=0), dict(linear_in="c", lin_vt=0),
             dict(linear_in="c", lin_vt=1, lin_vmax=1, lin_block=16, progs_l=16),
             dict(linear_in="c", lin_vt=1, lin_ks8=0), dict(linear_in="c", lin_vt=1, lin_ks8=1, lin_block=16, progs_l=16)]
    base = prepare(q, k, v, 0.3, 32, 32, "int8-fp8", False)  # no linear branch: pass A takes the V maxima
    for tune in tunes:
        p = prepare(q, k, v, 0.3, 32, 32, "int8-fp8", True, tune=tune)
        for key in ("vscale", "kq", "kscale", "lut"):  # V maxima from pass A or the statistics kernel: exact
            assert (p[key] is None and base[key] is None) or torch.equal(p[key], base[key]), (tune, key)
        assert torch.equal(p["vq"].view(torch.int8), base["vq"].view(torch.int8)), tune
        kv, ks = linear_state(p)
        kv_rel = ((kv.double() - kv_ref).norm() / kv_ref.norm()).item()
        ks_rel = ((ks.double() - ks_ref).norm() / ks_ref.norm()).item()
        assert kv_rel < 8e-3 and ks_rel < 1e-5, (tune, kv_rel, ks_rel)  # φ(k) is rounded to bf16 for the dot
    with pytest.raises(ValueError, match="valid: 'a', 'b', 'c'"):
        prepare(q, k, v, 0.3, 32, 32, "int8-fp8", True, tune=dict(linear_in="x"))


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("L,bq,bk,lb,topk,dtype", [
    (1, 64, 128, 64, 0.1, torch.bfloat16), (203, 32, 64, 16, 0.3, torch.float16), (300, 64, 16, 16, 0.2, torch.bfloat16),
    (129, 16, 32, 16, 1.0, torch.bfloat16), (257, 128, 64, 32, 0.5, torch.float16)])
def test_statistics_kernel_takes_over_pass_a(monkeypatch, L, bq, bk, lb, topk, dtype):
    """With lin_pool the linear statistics kernel also computes pass A's outputs (q block means, k block
    sums, V maxima: column sums on the tensor cores, partial maxima), pass A is not launched, and every
    operand equals the one made with pass A (sparse and dense, odd L, query blocks smaller or larger than
    key blocks, strided q)."""
    from turbocompile.kernels.sagesla import triton_prep
    from turbocompile.kernels.sagesla.linear_fold import linear_state

    q, k, v = rand(1, L, 3, 64, dtype=dtype, scale=2.0)
    q = torch.cat([q, q], dim=-1)[..., ::2]  # a strided q (stride 2 along D): same values
    tune = dict(lin_block=lb, progs_l=7)
    seen = []  # pass A's outputs as the glue kernel receives them: q means, k sums, V maxima (reduced)
    key_means = triton_prep.key_means
    monkeypatch.setattr(triton_prep, "key_means", lambda qp, kb, vm, *a: seen.append((qp, kb, vm.amax(1))) or
                        key_means(qp, kb, vm, *a))
    base = triton_prep.prepare(q, k, v, topk, bq, bk, "int8-fp8", True, tune=dict(tune, lin_pool=0))
    monkeypatch.setattr(triton_prep, "_pool_kernel", _NoPassA())
    fused = triton_prep.prepare(q, k, v, topk, bq, bk, "int8-fp8", True, tune=dict(tune, lin_pool=1))
    (qp0, kb0, vm0), (qp1, kb1, vm1) = seen
    if not fused["dense"]:  # dense (also small-L top-k keeping every block): no q means at all
        assert torch.allclose(qp1, qp0, rtol=1e-6, atol=1e-7)
    assert torch.allclose(kb1, kb0, rtol=1e-6, atol=1e-6) and torch.equal(vm1, vm0)
    for key in ("vscale", "kq", "kscale", "lut"):
        assert (fused[key] is None and base[key] is None) or torch.equal(fused[key], base[key]), key
    assert torch.equal(fused["vq"].view(torch.int8), base["vq"].view(torch.int8))
    for a, b in zip(linear_state(fused), linear_state(base)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
def test_prepare_folds_proj_l_for_the_attention_kernel():
    """prepare(fold=...) folds proj_l as soon as the statistics exist (beside the rest of the preparation on
    CUDA) and launch_attn uses that fold; the same output as folding inside launch_attn, and another weight
    than the folded one is folded afresh."""
    from turbocompile.kernels.sagesla.linear_fold import fold_linear
    from turbocompile.kernels.sagesla.triton_attn import launch_attn
    from turbocompile.kernels.sagesla.triton_prep import prepare

    q, k, v = rand(1, 300, 2, 64)
    w = (torch.randn(64, 64) * 0.1).to(DEV)
    plain = prepare(q, k, v, 0.3, 64, 128, "int8-fp8", True)
    pre = prepare(q, k, v, 0.3, 64, 128, "int8-fp8", True, fold=(w, q.dtype))
    weight, kvw, ksum, done = pre["folded"]
    assert weight is w and (done is None) == (DEV == "cpu") and pre["side_events"] == [done]
    kvw0, ksum0 = fold_linear(plain, w, q.dtype)
    assert torch.equal(kvw, kvw0) and torch.equal(ksum, ksum0)
    out = launch_attn(q, k, v, pre, w, None, 64, 128)
    assert torch.equal(out, launch_attn(q, k, v, plain, w, None, 64, 128))
    w2 = w * 2
    assert torch.equal(launch_attn(q, k, v, pre, w2, None, 64, 128), launch_attn(q, k, v, plain, w2, None, 64, 128))


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("D,dtype,nc,wform", [(64, torch.bfloat16, 1, "t"), (128, torch.bfloat16, 9, "plain"),
                                              (64, torch.float16, 17, "bf16"), (128, torch.float16, 8, "step"),
                                              (64, torch.bfloat16, 44, "plain")])
def test_linear_fold_kernel_matches_torch(D, dtype, nc, wform):
    """One launch sums the statistics partials (several load steps, a partial last one), rounds KV and W
    to the model dtype and folds proj_l (KVW = KV·Wᵀ): equal to the torch
    ops up to the last bit of a near-tie (a different fp32 summation order), for contiguous, transposed,
    column-strided and bf16 weights, outlier rows and non-contiguous partials."""
    from turbocompile.kernels.sagesla.linear_fold import fold_linear, fold_proj, linear_state

    g = torch.Generator().manual_seed(D + nc)
    kvp = torch.randn(3, nc, D, D, generator=g) * 4
    kvp[1, :, 5] *= 300.0  # an outlier row of KV
    ksp = torch.rand(3, nc, D, generator=g) * 50
    w = torch.randn(D, 3 * D, generator=g) / math.sqrt(D)
    w = {"t": w[:, :D].t(), "plain": w[:, :D].contiguous(), "bf16": w[:, :D].to(torch.bfloat16),
         "step": w[:, ::3]}[wform]
    kvp, ksp, w = kvp.to(DEV), ksp.to(DEV), w.to(DEV)
    prep = {"kv_parts": kvp, "ks_parts": ksp}
    kv, ks = linear_state(prep)
    ref = fold_proj(kv, w, dtype)
    kvw, ksum = fold_linear(prep, w, dtype)
    assert kvw.dtype == dtype and kvw.shape == ref.shape
    torch.testing.assert_close(ksum, ks, rtol=1e-6, atol=1e-5)
    diff = (kvw.float() - ref.float()).abs()
    # KV summed in another order may round to the neighbouring step of the model dtype (a near-tie); each
    # such KV element moves its row of KVW by at most one half step times |W|, and the result rounds once
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    bound = eps * (kv.to(dtype).float().abs() @ w.to(dtype).float().abs().t()) + 2 * eps * ref.float().abs() + 1e-6
    assert bool((diff <= bound).all()), (diff - bound).max()
    assert (diff > 0).float().mean() < 0.02  # and only at near-ties
    # non-contiguous partials (same values) give the same result
    strided = {"kv_parts": kvp.transpose(2, 3).contiguous().transpose(2, 3), "ks_parts": ksp}
    assert not strided["kv_parts"].is_contiguous()
    assert torch.equal(fold_linear(strided, w, dtype)[0], kvw)


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
def test_linear_fold_keeps_nan_and_rejects_bad_input():
    """A NaN in KV (with the all-ones payload the GPU's fp32 units produce) stays NaN in its KVW row, as
    in torch; wrong shapes, dtypes and devices are one-line errors."""
    from turbocompile.kernels.sagesla.linear_fold import fold_linear, fold_proj, linear_state

    kvp = torch.randn(2, 3, 64, 64)
    kvp.view(torch.int32)[1, 2, 7, 9] = 0x7FFFFFFF
    kvp = kvp.to(DEV)
    prep = {"kv_parts": kvp, "ks_parts": torch.rand(2, 3, 64, device=DEV)}
    w = torch.randn(64, 64, device=DEV) / 8
    kvw = fold_linear(prep, w, torch.bfloat16)[0]
    ref = fold_proj(linear_state(prep)[0], w, torch.bfloat16)
    assert torch.equal(torch.isnan(kvw), torch.isnan(ref)) and bool(torch.isnan(kvw[1, 7]).all())
    with pytest.raises(ValueError, match=r"proj_weight \(64, 32\) must be \[D, D\]"):
        fold_linear(prep, torch.zeros(64, 32, device=DEV), torch.bfloat16)
    with pytest.raises(ValueError, match="valid: torch.bfloat16, torch.float16"):
        fold_linear(prep, w, torch.float32)
    with pytest.raises(ValueError, match="valid: torch.float32"):
        fold_linear({"kv_parts": kvp.double(), "ks_parts": prep["ks_parts"]}, w, torch.bfloat16)
    with pytest.raises(ValueError, match="D a power of two"):
        fold_linear({"kv_parts": torch.zeros(2, 3, 48, 48, device=DEV), "ks_parts": torch.zeros(2, 3, 48, device=DEV)},
                    torch.zeros(48, 48, device=DEV), torch.bfloat16)
    with pytest.raises(ValueError, match="all must be on one device"):
        fold_linear(prep, w.to("meta"), torch.bfloat16)


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("L", [1, 63, 200, 389])  # 389: 7 row tiles, 4 to a program, the last one short
def test_linear_out_tiling_covers_every_row(L):
    """The split linear-branch kernel (several row tiles per program, proj_l folded into KVW)
    writes every row once: launches with 1 to many tiles per program, and the branch computed
    in the attention kernel's prologue instead, give the same output,
    which matches the fp64 linear branch + proj_l + bias (zero sparse branch excluded)."""
    from turbocompile.kernels.sagesla.triton_attn import launch_attn, linear_out_grid
    from turbocompile.kernels.sagesla.triton_prep import prepare

    q, k, v = rand(1, L, 3, 64)
    w = torch.randn(64, 64, device=DEV) * 0.1
    b = torch.randn(64, device=DEV) * 0.1
    p = prepare(q, k, v, 1.0, 64, 64, "int8-fp16", linear=True)
    outs = [launch_attn(q, k, v, p, w, b, 64, 64, linear_cfg=cfg)
            for cfg in (dict(where="kernel", waves=1), dict(where="kernel", waves=64),
                        dict(where="kernel", block_m=16, waves=2, stages=1), dict(where="prologue"),
                        dict(where="epilogue"))]
    for o in outs[1:]:
        assert metrics(o, outs[0])[0] >= 0.99999
    with pytest.raises(ValueError, match="valid: 'auto', 'kernel', 'prologue', 'epilogue'"):
        launch_attn(q, k, v, p, w, b, 64, 64, linear_cfg=dict(where="nowhere"))
    ref = oracle(q, k, v, 1.0, 64, 64, w, b)
    cos, l1 = metrics(outs[0], ref)
    assert torch.isfinite(outs[0]).all() and cos >= 0.999 and l1 <= 0.03, (cos, l1)
    for Lx, BH in ((1, 1), (63, 40), (75600, 40), (32760, 12)):
        per_head, tiles = linear_out_grid(Lx, BH, 64, 132)
        n = -(-Lx // 64)
        assert per_head * tiles >= n and (per_head - 1) * tiles < n


def _linear_inputs(L, dtype=torch.float32):
    """q, k, v [B=2, H=2, L, D=64] (head 1: q and k peaked on different channels, so φ(q)·Σφ(k) ≈ 1e-5 at
    small L and the 1e-5 in the denominator weighs as much as the keys), proj_l weight and bias."""
    q, k, v = (torch.randn(2, 2, L, 64) for _ in range(3))
    q[:, 1, :, 0] += 12.0
    k[:, 1, :, 1] += 12.0
    return [t.to(dtype).to(DEV) for t in (q, k, v)] + [(torch.randn(64, 64) / 8).to(DEV), torch.randn(64).to(DEV)]


def _linear_fp64(q, k, v, w, bias):
    """The linear branch + proj_l written out in fp64 ([B, H, L, D]), φ = softmax over D:
    o = Σ_m (φ(q)·φ(k_m)) v_m / (1e-5 + Σ_m φ(q)·φ(k_m)) (associated unlike the reference's φ(q)(φ(k)ᵀv))."""
    def phi(x):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)

    a = phi(q.double()) @ phi(k.double()).transpose(-1, -2)  # [B, H, L, L]
    return (a @ v.double()) / (1e-5 + a.sum(-1, keepdim=True)) @ w.double().T + bias.double()


def _rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("L", [1, 2, 3, 300])
def test_linear_branch_ref_matches_fp64_formula(L):
    """The reference's linear branch (fp32) equals the fp64 formula to rel-L2 1e-5 (observed <= 2e-7), so its
    1e-5 is exactly that: at small L (Σφ(k) small) and on the peaked head an eps of 1e-3 moves the output by
    30-60%, at L=300 by ~1%. rel-L2, not cosine: a wrong eps mostly rescales rows."""
    from turbocompile.kernels.sagesla.ref import linear_branch_ref

    q, k, v, w, bias = _linear_inputs(L)
    assert _rel_l2(linear_branch_ref(q, k, v, w, bias), _linear_fp64(q, k, v, w, bias)) <= 1e-5


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("L", [1, 2, 3])
def test_triton_linear_branch_tiny_L(L):
    """The Triton linear branch (+ proj_l folded into KVW, + bias) vs the fp64 formula at L = 1..3, where
    the 1e-5 matters: the split kernel alone, and each placement (own kernel, attention prologue and
    epilogue) as the attention output minus the sparse branch alone. fp16: φ and KVW rounded to fp16 for
    the product, observed rel-L2 <= 9e-4 (an eps of 1e-3 would give ~0.3)."""
    from turbocompile.kernels.sagesla.linear_fold import fold_linear
    from turbocompile.kernels.sagesla.triton_attn import DEFAULT_LINEAR_OUT, _launch_linear_out, launch_attn
    from turbocompile.kernels.sagesla.triton_prep import prepare

    q, k, v, w, bias = _linear_inputs(L, torch.float16)
    want = _linear_fp64(q, k, v, w, bias).transpose(1, 2)  # [B, L, H, D]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, L, H, D] views
    p = prepare(q, k, v, 1.0, 64, 64, "int8-fp16", linear=True)
    kvw, ksum = fold_linear(p, w, q.dtype)
    out = torch.zeros(q.shape, dtype=q.dtype, device=DEV)
    _launch_linear_out(q, kvw, ksum, bias.float().contiguous(), out, True, DEFAULT_LINEAR_OUT)
    assert _rel_l2(out, want) <= 2e-3
    sparse = launch_attn(q, k, v, p, None, None, 64, 64).float()
    for where in ("kernel", "prologue", "epilogue"):
        o = launch_attn(q, k, v, p, w, bias, 64, 64, linear_cfg=dict(where=where)).float()
        assert _rel_l2(o - sparse, want) <= 2e-3, where


@triton.jit
def _exp2_fma_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + o, exp2_fma(tl.load(x_ptr + o, mask=o < N, other=0.0)), mask=o < N)


def test_exp2_polynomial_accuracy():
    """exp2_fma (the FMA-pipe 2^x) is within 1.1e-4 relative of 2^x over the softmax range,
    and maps -inf / very negative inputs to ~0 without NaN."""
    if not triton_runs_here():
        pytest.skip("Triton cannot run here")
    _k = _exp2_fma_kernel
    x = torch.cat([torch.linspace(-120.0, 9.0, 4001), torch.tensor([float("-inf"), -1e30, 0.0, 0.5, -0.5])]).to(DEV)
    y = torch.empty_like(x)
    _k[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = torch.exp2(x.double())
    fin = x > -120.5
    rel = ((y.double() - ref).abs() / ref)[fin]
    assert rel.max().item() <= 1.1e-4, rel.max().item()
    assert torch.isfinite(y).all() and (y[~fin] < 1e-37).all()


@triton.jit
def _round_e4m3_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + o, round_e4m3(tl.load(x_ptr + o, mask=o < N, other=0.0)), mask=o < N)


def test_round_e4m3_is_the_reference_rounding():
    """round_e4m3 (the interpreter's stand-in for the GPU's RNE e4m3 cast of P and V) equals the
    reference's quant_fp8 (clamp to ±448, torch's RNE cast) on every e4m3 value, every exact tie between
    neighbours (normal binades and subnormals: half to even, not half up), one fp32 ulp either side of
    each tie, both signs, zero, and values past 448 (saturation); and on random values over 2^-12..2^9."""
    from turbocompile.kernels.sagesla.ref import quant_fp8
    from turbocompile.kernels.sagesla.triton_prep import INTERPRET

    if not INTERPRET:  # the GPU casts natively (EXACT_FP8 is off there); the helper's log2/exp2 are approximate
        pytest.skip("round_e4m3 is the interpreter's helper")

    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448 (0x7f is NaN)
    ties = (grid[:-1] + grid[1:]) / 2
    near = torch.cat([torch.nextafter(ties, torch.zeros(())), torch.nextafter(ties, torch.full((), 1e3))])
    past = torch.tensor([448.5, 463.9, 464.0, 464.1, 480.0, 1000.0, 1e30])
    rnd = torch.randn(4096) * 2.0 ** torch.randint(-12, 10, (4096,)).float()
    x = torch.cat([grid, ties, near, past, rnd])
    x = torch.cat([x, -x]).to(DEV)
    y = torch.empty_like(x)
    _round_e4m3_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = quant_fp8(x)
    bad = (y != want).nonzero().flatten()[:8]
    assert bad.numel() == 0, list(zip(x[bad].tolist(), y[bad].tolist(), want[bad].tolist()))


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_block_score_precisions_and_topk_launches(precision):
    """The block scores at TF32 (a no-op on CPU) or TurboDiffusion's bf16 rounding stay a valid
    top-k of the fp32 scores up to that rounding; the top-k kernel's launch shape (rows per
    program, warps) does not change the LUT."""
    from turbocompile.kernels.sagesla.triton_prep import block_scores, prepare

    q, k, v = rand(1, 600, 2, 64)
    base = prepare(q, k, v, 0.2, 32, 32, "int8-fp8", False)
    for tune in (dict(topk_rows=1), dict(topk_rows=8, topk_warps=8)):
        assert torch.equal(prepare(q, k, v, 0.2, 32, 32, "int8-fp8", False, tune=tune)["lut"], base["lut"])
    p = prepare(q, k, v, 0.2, 32, 32, "int8-fp8", False, tune=dict(scores=precision))
    scores, keep = oracle_lut(q, k, 0.2, 32, 32)
    lut = p["lut"].view(1, 2, -1, p["T"]).long().cpu()
    chosen = scores.cpu().gather(-1, lut)
    dropped = scores.cpu().scatter(-1, lut, -math.inf)
    tol = 1e-4 if precision == "tf32" else 2e-2 * scores.abs().amax().item()
    assert (chosen.amin(-1) >= dropped.amax(-1) - tol).all()
    a, b = torch.randn(3, 5, 64), torch.randn(3, 7, 64)
    torch.testing.assert_close(block_scores(a, b, "fp32"), a @ b.transpose(1, 2))
    with pytest.raises(ValueError, match="valid: 'fp32', 'tf32', 'bf16'"):
        block_scores(a, b, "fp16")


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("L,block_k,D,NC", [(203, 32, 64, 3), (1000, 16, 128, 37), (5, 128, 64, 1)])
def test_key_means_kernel_matches_torch(L, block_k, D, NC):
    """`key_means` (one launch between passes A and B) vs the torch ops it replaces: key mean, V
    scale, and block scores at every precision, with a short last key block, more key blocks than
    one tile, and partial-maxima counts that are not a multiple of the kernel's chunk."""
    from turbocompile.kernels.sagesla.triton_prep import EPS_SCALE, FP8_MAX, key_means

    g = torch.Generator().manual_seed(L)
    BH, Kb, Qb = 3, -(-L // block_k), -(-L // 64) + 2
    kblk = (torch.randn(BH, Kb, D, generator=g) * block_k).to(DEV)
    qpool = torch.randn(BH, Qb, D, generator=g).to(DEV)
    vmax = torch.rand(BH, NC, D, generator=g).to(DEV) * 5
    cnt = torch.full((Kb,), float(block_k))
    cnt[-1] = L - (Kb - 1) * block_k
    km_ref = kblk.double().sum(1) / L
    kbar = kblk.double().cpu() / cnt[:, None].double() - km_ref.cpu()[:, None, :]
    s_ref = qpool.double().cpu() @ kbar.transpose(1, 2)
    # tf32: the interpreter multiplies in fp32; a GPU rounds both operands to 10 mantissa bits (2^-11
    # relative each), and the mean-centred scores cancel: 7.8e-4 measured on an H100.
    # fp32 on a GPU: the block means' `/` compiles to div.full.f32 (<= 2 ulp) while the key mean is
    # rounded exactly (div_rn), so at L = 5 (one block) the centred mean cancels to 0 on CPU but to a
    # few ulp of |k̄| ~ 26 per channel on the GPU: 1.4e-5 measured on an H100 (session 22)
    for prec, tol in (("fp32", 1e-4 if COMPILED else 1e-5), ("tf32", 3e-3 if COMPILED else 1e-5), ("bf16", 2e-2)):
        km, vscale, scores = key_means(qpool, kblk, vmax, L, block_k, prec)
        assert torch.allclose(km.double(), km_ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(vscale, vmax.amax(1) / FP8_MAX + EPS_SCALE, rtol=1e-6, atol=0)
        # one key block (L=5): k̄ = 0, every score is 0
        err = ((scores.double().cpu() - s_ref).norm() / max(s_ref.norm().item(), 1.0)).item()
        assert scores.shape == (BH, Qb, Kb) and err < tol, (prec, err)
    km2, vscale2, none = key_means(qpool, kblk, vmax, L, block_k, None)  # dense: no scores
    assert none is None and torch.equal(km2, km) and torch.equal(vscale2, vscale)
    with pytest.raises(ValueError, match="valid: 'fp32', 'tf32', 'bf16'"):
        key_means(qpool, kblk, vmax, L, block_k, "fp16")


# ----------------------------------------------------------------------------- precomputed pass-A statistics
def _pass_a_stats(q, k, v, bq, bk, v_rows):
    """Pass A's outputs computed independently (float32 torch, [B, L, H*D] views): q means per query block,
    k sums per key block, |v| maxima per chunk of ``v_rows`` rows (any chunking: they are reduced over it)."""
    from turbocompile.kernels.norms.ref import pool_heads_ref

    B, L, H, D = q.shape
    flat = [t.reshape(B, L, H * D) for t in (q, k, v)]
    return (pool_heads_ref(flat[0], H, bq, "mean"), pool_heads_ref(flat[1], H, bk, "sum"),
            pool_heads_ref(flat[2], H, v_rows, "absmax"))


class _NoPassA:
    def __getitem__(self, grid):
        raise AssertionError("SageSLA's pooling kernel (pass A) was launched")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,topk,quant,proj,v_rows", [
    (1, 0.5, "int8-fp8", True, 128), (2, 0.3, "int8-fp8", False, 70), (1, 1.0, "int8-fp16", True, 200),
    (1, 0.5, "none", False, 1),
])
def test_precomputed_pooling_equals_pass_a(monkeypatch, backend, B, topk, quant, proj, v_rows):
    """sagesla with q_pool / k_blocksum / v_absmax given equals sagesla computing them itself (Triton: only the
    fp32 summation order of the sums can differ; the reference recomputes them). The Triton path launches
    no pass A. Dense (topk 1.0): q_pool may be left out."""
    from turbocompile.kernels.sagesla import triton_prep

    L, H, D, bq, bk = 200, 2, 64, 64, 128
    q, k, v = rand(B, L, H, D)
    w = (torch.randn(D, D) * 0.1).to(DEV) if proj else None
    kw = dict(topk=topk, quant=quant, proj_weight=w, block_q=bq, block_k=bk, backend=backend)
    base = sagesla(q, k, v, **kw)
    qp, kb, vm = _pass_a_stats(q, k, v, bq, bk, v_rows)
    monkeypatch.setattr(triton_prep, "_pool_kernel", _NoPassA())
    out = sagesla(q, k, v, q_pool=None if topk == 1.0 else qp, k_blocksum=kb, v_absmax=vm, **kw)
    err = ((out.float() - base.float()).norm() / base.float().norm()).item()
    assert torch.equal(out, base) or err <= 1e-6, err


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
def test_prepare_with_precomputed_pooling():
    """prepare(pooled=...): the same operands as pass A's (the V maxima also when the statistics kernel would
    take them, lin_vmax); linear_in 'a' (statistics inside pass A) and a missing sparse q_pool are errors."""
    from turbocompile.kernels.sagesla.linear_fold import linear_state
    from turbocompile.kernels.sagesla.triton_prep import prepare

    q, k, v = rand(1, 100, 2, 64)
    pooled = _pass_a_stats(q, k, v, 32, 32, 32)
    base = prepare(q, k, v, 0.3, 32, 32, "int8-fp8", True)
    for tune in (None, dict(lin_vmax=1), dict(linear_in="b")):
        p = prepare(q, k, v, 0.3, 32, 32, "int8-fp8", True, tune=tune, pooled=pooled)
        for key in ("vscale", "kq", "kscale", "lut"):
            assert torch.equal(p[key], base[key]), (tune, key)
        assert torch.allclose(linear_state(p)[0], linear_state(base)[0], rtol=1e-5, atol=1e-6), tune
    with pytest.raises(ValueError, match="linear_in='a'.*valid with pooled: 'b', 'c'"):
        prepare(q, k, v, 0.3, 32, 32, "int8-fp8", True, tune=dict(linear_in="a"), pooled=pooled)
    with pytest.raises(ValueError, match="qpool is needed unless every key block is kept"):
        prepare(q, k, v, 0.3, 32, 32, "int8-fp8", False, pooled=(None, *pooled[1:]))
