"""Pass fuse_sibling_gemms on wan-tiny: q, k, v as one GEMM, outputs equal to the unfused graph (torch and
Triton paths), weights concatenated once (also in a baked sampler), artifacts round-trip, and what it leaves
alone."""

from __future__ import annotations

import pytest
import torch

import turbocompile
import turbocompile.errors
from tests._env import triton_runs_here
from tests.passes._wan_tiny import count_calls as _count
from tests.passes._wan_tiny import inputs
from tests.passes._wan_tiny import recipe as _recipe
from tests.passes._wan_tiny import run as _run
from turbocompile.model.config import get_preset

OPS = torch.ops.turbocompile
LAYERS = get_preset("wan-tiny").num_layers


def _w8(fmt="int8", wgran="per_channel", act="per_token", backend="auto"):
    return {"name": "w8a8_linear", "options": {"format": fmt, "weight_granularity": wgran, "act_granularity": act,
                                               "backend": backend}}


def _stats(res):
    return next(p["stats"] for p in res.manifest["passes"] if p["name"] == "fuse_sibling_gemms")


@pytest.mark.parametrize("norms", [True, False], ids=["prequant_after_fuse_norms", "float_input_w8a8_only"])
@pytest.mark.parametrize("wgran", ["per_channel", "block128"])
def test_int8_fused_graph_equals_unfused_bit_for_bit(norms, wgran):
    act = "per_token" if wgran == "per_channel" else "block128"
    base = [_w8("int8", wgran, act)] + (["fuse_norms"] if norms else [])
    ref_res, ref_out = _run(_recipe(*base))
    res, out = _run(_recipe(*base, "fuse_sibling_gemms"), verify=True)
    assert _stats(res) == {"groups": LAYERS, "fused_linears": 3 * LAYERS, "unfusable": 0}
    gm, ref_gm = res.graph_module, ref_res.graph_module
    # the norms quantize for per-token consumers only; block-128 activations are quantized by the linear
    target = OPS.w8a8_linear_prequant.default if norms and act == "per_token" else OPS.w8a8_linear.default
    assert _count(gm, target) == _count(ref_gm, target) - 2 * LAYERS
    # one concatenated weight per block, the per-projection ones gone from the module
    names = dict(gm.named_buffers())
    assert sum(1 for k in names if k.endswith("self_attn.fused_q_k_v.qweight")) == LAYERS
    assert not any(k.endswith(("self_attn.q.qweight", "self_attn.k.qweight", "self_attn.v.qweight")) for k in names)
    w = names["blocks.0.self_attn.fused_q_k_v.qweight"]
    dim = get_preset("wan-tiny").dim
    assert w.shape == (3 * dim, dim)
    assert torch.equal(w[dim:2 * dim], dict(ref_gm.named_buffers())["blocks.0.self_attn.k.qweight"])
    assert torch.equal(out, ref_out)


def test_fp8_fused_graph_matches_unfused():
    base = [_w8("fp8"), "fuse_norms", "fuse_gemm_epilogues", {"name": "sagesla_attention", "options": {"topk": 0.5}}]
    _, ref_out = _run(_recipe(*base))
    res, out = _run(_recipe(*base, "fuse_sibling_gemms"))
    assert _stats(res)["groups"] == LAYERS
    rel = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    assert rel < 1e-5, rel  # fp32 products of the same codes; only the reference matmul's blocking may differ


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_triton_path_reads_strided_slices_and_equals_unfused():
    """The Triton GEMM writes [M, 3·dim]; rmsnorm_rope (q, k) and sagesla (v) read the narrow views in
    place. INT8 codes: every path is exact per column, so the graphs agree bit for bit."""
    tri = {"backend": "triton"}
    base = [_w8("int8", backend="triton"), {"name": "fuse_norms", "options": tri},
            {"name": "sagesla_attention", "options": {"topk": 0.5, **tri}}]
    _, ref_out = _run(_recipe(*base))
    res, out = _run(_recipe(*base, "fuse_sibling_gemms"))
    assert _stats(res)["groups"] == LAYERS
    narrows = [n for n in res.graph_module.graph.nodes if n.op == "call_method" and n.target == "narrow"]
    assert len(narrows) == 3 * LAYERS
    rms_inputs = [n.args[0] for n in res.graph_module.graph.nodes if n.op == "call_function"
                  and n.target is OPS.rmsnorm_rope.default]
    from_slices = [z for z in rms_inputs if z.op == "call_method" and z.target == "reshape" and z.args[0] in narrows]
    assert len(from_slices) == 2 * LAYERS  # self-attention q and k; the cross-attention q is its own GEMM
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref_out)


def test_artifact_round_trip(tmp_path):
    _, out = _run(_recipe(_w8(), "fuse_norms", "fuse_sibling_gemms"), out=tmp_path / "a")
    model = turbocompile.load(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(model(*inputs()), out)


def test_baked_sampler_shares_one_fused_weight_per_block():
    bake = {"name": "bake_rcm_sampler", "options": {"steps": 2}}
    res = turbocompile.optimize("wan-tiny", _recipe(_w8(), "fuse_norms", bake, "fuse_sibling_gemms"), seed=0)
    names = [p["name"] for p in res.manifest["passes"]]
    assert names.index("fuse_sibling_gemms") < names.index("bake_rcm_sampler")  # `after` orders it before
    gm = res.graph_module
    fused = [k for k, _ in gm.named_buffers() if k.endswith("fused_q_k_v.qweight")]
    assert len(fused) == LAYERS
    gets = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("fused_q_k_v.qweight")]
    assert len({n.target for n in gets}) == LAYERS


def test_leaves_alone_what_it_must():
    # it fuses W8A8 GEMMs only: without w8a8_linear the pipeline says so
    with pytest.raises(turbocompile.errors.PipelineError, match="requires 'w8a8'"):
        _run(_recipe("fuse_norms", "fuse_sibling_gemms"))
    # include matches no self-attention linear
    res, _ = _run(_recipe(_w8(), {"name": "fuse_sibling_gemms", "options": {"include": ["blocks.*.ffn.*"]}}))
    assert _stats(res)["groups"] == 0
    # included, the cross-attention k and v of EVERY block read the same text embedding: one GEMM for all
    # of them (each q reads its own block's activation)
    res, out = _run(_recipe(_w8(), {"name": "fuse_sibling_gemms", "options": {"include": ["blocks.*.cross_attn.*"]}}))
    assert _stats(res) == {"groups": 1, "fused_linears": 2 * LAYERS, "unfusable": 0}
    _, ref_out = _run(_recipe(_w8()))
    assert torch.equal(out, ref_out)
    # groups smaller than min_members stay as they are
    res, _ = _run(_recipe(_w8(), {"name": "fuse_sibling_gemms", "options": {"min_members": 4}}))
    assert _stats(res)["groups"] == 0


def test_weights_too_big_for_l2_stay_apart():
    """max_weight_mib: a fused weight bigger than that (14B's q/k/v: 75 MiB) is not built; the note says why."""
    res, out = _run(_recipe(_w8(), {"name": "fuse_sibling_gemms", "options": {"max_weight_mib": 0.1}}))
    rec = next(p for p in res.manifest["passes"] if p["name"] == "fuse_sibling_gemms")
    assert rec["stats"] == {"groups": 0, "fused_linears": 0, "unfusable": LAYERS}
    assert "0.2 MiB > max_weight_mib 0.1" in rec["notes"][0]
    _, ref_out = _run(_recipe(_w8()))
    assert torch.equal(out, ref_out)


def test_turbo_recipes_fuse_qkv_before_the_bake():
    from turbocompile.recipe import load_recipe

    for name in ("turbo-int8", "turbo-fp8", "turbo-int8-rcm"):
        assert "fuse_sibling_gemms" in [p.name for p in load_recipe(name).passes], name
    res = turbocompile.optimize("wan-tiny", "turbo-int8-rcm", seed=0)
    names = [p["name"] for p in res.manifest["passes"]]
    assert names.index("fuse_sibling_gemms") < names.index("bake_rcm_sampler")
    assert _stats(res)["groups"] == LAYERS
