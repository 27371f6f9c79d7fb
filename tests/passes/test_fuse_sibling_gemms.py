"""Pass fuse_sibling_gemms on wan-tiny: q, k, v as one GEMM per block and the cross-attention k, v of all
blocks as one GEMM, outputs equal to the unfused graph (torch and Triton paths), weights concatenated once
(also in a baked sampler), the weight-size limit and its small-M exemption, artifacts round-trip, and what it
leaves alone."""

from __future__ import annotations

import pytest
import torch

import turbocompile
import turbocompile.errors
from tests._env import kernel_device, triton_runs_here
from tests.passes._wan_tiny import count_calls as _count
from tests.passes._wan_tiny import inputs
from tests.passes._wan_tiny import recipe as _recipe
from tests.passes._wan_tiny import run as _run
from turbocompile.model.config import get_preset
from turbocompile.passes.bake_rcm_sampler import count_cross_kv, count_cross_kv_gemms
from turbocompile.recipe import load_recipe

OPS = torch.ops.turbocompile
TINY = get_preset("wan-tiny")
LAYERS = TINY.num_layers
TEXT_ROWS = TINY.text_len                 # M of the cross-attention k, v (batch 1)
VIDEO_ROWS = TINY.video_shape().seq_len   # M of the self-attention q, k, v
CROSS = f"fused_blocks_0_cross_attn_k_and_{2 * LAYERS - 1}_more"  # the one fused cross K/V weight
OLD_INCLUDE = ["blocks.*.self_attn.*"]    # the default before the cross K/V were included


def _w8(fmt="int8", wgran="per_channel", act="per_token", backend="auto"):
    return {"name": "w8a8_linear", "options": {"format": fmt, "weight_granularity": wgran, "act_granularity": act,
                                               "backend": backend}}


def _stats(res):
    return next(p["stats"] for p in res.manifest["passes"] if p["name"] == "fuse_sibling_gemms")


def _sib(**options):
    return {"name": "fuse_sibling_gemms", "options": options}


def _cross_gemms(gm):
    """GEMM nodes computing a cross-attention k or v: (fused nodes, unfused nodes)."""
    fused, alone = [], []
    for n in gm.graph.nodes:
        if n.op != "call_function" or "w8a8" not in str(n.target):
            continue
        members = n.meta.get("tc_fused_members") or []
        if any(".cross_attn." in p for p in members):
            fused.append(n)
        elif any(a.op == "get_attr" and (".cross_attn.k." in a.target or ".cross_attn.v." in a.target)
                 for a in n.all_input_nodes):
            alone.append(n)
    return fused, alone


@pytest.mark.parametrize("norms", [True, False], ids=["prequant_after_fuse_norms", "float_input_w8a8_only"])
@pytest.mark.parametrize("wgran", ["per_channel", "block128"])
def test_int8_fused_graph_equals_unfused_bit_for_bit(norms, wgran):
    act = "per_token" if wgran == "per_channel" else "block128"
    base = [_w8("int8", wgran, act)] + (["fuse_norms"] if norms else [])
    ref_res, ref_out = _run(_recipe(*base))
    res, out = _run(_recipe(*base, "fuse_sibling_gemms"), verify=True)
    # q, k, v of each block, and the cross-attention k, v of all blocks (they read the text embedding)
    assert _stats(res) == {"groups": LAYERS + 1, "fused_linears": 5 * LAYERS, "unfusable": 0, "small_m": 0}
    gm, ref_gm = res.graph_module, ref_res.graph_module
    # the norms quantize for per-token consumers only; block-128 activations are quantized by the linear
    target = OPS.w8a8_linear_prequant.default if norms and act == "per_token" else OPS.w8a8_linear.default
    pre, flt = OPS.w8a8_linear_prequant.default, OPS.w8a8_linear.default
    # the cross k, v read the float text embedding (no norm before them): 2·LAYERS float-input GEMMs -> 1
    assert _count(gm, pre) == _count(ref_gm, pre) - 2 * LAYERS * (target is pre)
    assert _count(gm, flt) == _count(ref_gm, flt) - 2 * LAYERS * (target is flt) - (2 * LAYERS - 1)
    # one concatenated weight per block, the per-projection ones gone from the module
    names = dict(gm.named_buffers())
    assert sum(1 for k in names if k.endswith("self_attn.fused_q_k_v.qweight")) == LAYERS
    assert not any(k.endswith(("self_attn.q.qweight", "self_attn.k.qweight", "self_attn.v.qweight")) for k in names)
    w = names["blocks.0.self_attn.fused_q_k_v.qweight"]
    dim = get_preset("wan-tiny").dim
    assert w.shape == (3 * dim, dim)
    assert torch.equal(w[dim:2 * dim], dict(ref_gm.named_buffers())["blocks.0.self_attn.k.qweight"])
    # one weight for the cross k, v of every block, in graph order (block 1's v is the last slice)
    cross = names[f"{CROSS}.qweight"]
    assert cross.shape == (2 * LAYERS * dim, dim)
    assert torch.equal(cross[-dim:], dict(ref_gm.named_buffers())[f"blocks.{LAYERS - 1}.cross_attn.v.qweight"])
    assert not any(k.endswith(("cross_attn.k.qweight", "cross_attn.v.qweight")) for k in names)
    assert "blocks.0.cross_attn.q.qweight" in names and "blocks.0.cross_attn.o.qweight" in names
    assert torch.equal(out, ref_out)


def test_fp8_fused_graph_matches_unfused():
    base = [_w8("fp8"), "fuse_norms", "fuse_gemm_epilogues", {"name": "sagesla_attention", "options": {"topk": 0.5}}]
    _, ref_out = _run(_recipe(*base))
    res, out = _run(_recipe(*base, "fuse_sibling_gemms"))
    assert _stats(res)["groups"] == LAYERS + 1
    rel = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    assert rel < 1e-5, rel  # fp32 products of the same codes; only the reference matmul's blocking may differ


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_triton_path_reads_strided_slices_and_equals_unfused():
    """The Triton GEMM writes [M, 3·dim] (and [text, 2·LAYERS·dim] for the cross K/V); rmsnorm_rope (q, k,
    cross k) and sagesla (v) read the narrow views in place. INT8 codes: every path is exact per column, so the
    graphs agree bit for bit (on the GPU where there is one, else in the interpreter)."""
    tri = {"backend": "triton"}
    base = [_w8("int8", backend="triton"), {"name": "fuse_norms", "options": tri},
            {"name": "sagesla_attention", "options": {"topk": 0.5, **tri}}]
    _, ref_out = _run(_recipe(*base, device=kernel_device()))
    res, out = _run(_recipe(*base, "fuse_sibling_gemms", device=kernel_device()))
    assert _stats(res)["groups"] == LAYERS + 1
    narrows = [n for n in res.graph_module.graph.nodes if n.op == "call_method" and n.target == "narrow"]
    assert len(narrows) == 3 * LAYERS + 2 * LAYERS  # self-attention q, k, v; cross-attention k, v
    rms_inputs = [n.args[0] for n in res.graph_module.graph.nodes if n.op == "call_function"
                  and n.target is OPS.rmsnorm_rope.default]
    from_slices = [z for z in rms_inputs if z.op == "call_method" and z.target == "reshape" and z.args[0] in narrows]
    assert len(from_slices) == 2 * LAYERS  # self-attention q and k; the cross-attention q is its own GEMM
    # the cross-attention k's norm reads its slice of the all-blocks cross K/V output directly
    assert sum(1 for z in rms_inputs if z in narrows) == LAYERS
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
    # the cross K/V GEMM of all blocks depends on the text only: one for both steps
    assert len(_cross_gemms(gm)[0]) == 1
    assert sorted(k for k, _ in gm.named_buffers() if CROSS in k) == [f"{CROSS}.{t}" for t in ("bias", "qweight",
                                                                                              "wscale")]


def _turbo(*sibling):
    """The turbo-int8 recipe's passes (bf16 CPU), its fuse_sibling_gemms replaced by ``sibling`` (0 or 1 entries)."""
    passes = [p for p in load_recipe("turbo-int8").to_dict()["passes"]
              if (p if isinstance(p, str) else p["name"]) != "fuse_sibling_gemms"]
    return _recipe(*passes, *sibling)


def test_turbo_chain_fuses_the_cross_kv_of_all_blocks_into_one_gemm():
    """turbo-int8 (W8A8 INT8, fused norms, GEMM epilogues, SageSLA): with the default options the 2·LAYERS
    cross-attention k, v GEMMs become ONE; every output bit equal to the graph without the pass and to the
    one fusing only q, k, v (the old default)."""
    ref_res, ref_out = _run(_turbo())
    qkv_res, qkv_out = _run(_turbo(_sib(include=OLD_INCLUDE)))
    res, out = _run(_turbo("fuse_sibling_gemms"))
    assert _stats(qkv_res) == {"groups": LAYERS, "fused_linears": 3 * LAYERS, "unfusable": 0, "small_m": 0}
    assert _stats(res) == {"groups": LAYERS + 1, "fused_linears": 5 * LAYERS, "unfusable": 0, "small_m": 0}
    gm = res.graph_module
    assert [len(x) for x in _cross_gemms(ref_res.graph_module)] == [0, 2 * LAYERS]
    assert [len(x) for x in _cross_gemms(qkv_res.graph_module)] == [0, 2 * LAYERS]
    (fused,), alone = _cross_gemms(gm)
    assert alone == []
    assert fused.meta["tc_fused_members"] == [f"blocks.{i}.cross_attn.{p}" for i in range(LAYERS) for p in "kv"]
    assert tuple(fused.meta["val"].shape) == (1, TEXT_ROWS, 2 * LAYERS * TINY.dim)
    # all W8A8 GEMMs: 2 fewer per block (q, k, v) and 2·LAYERS - 1 fewer for the cross k, v
    gemms = lambda g: sum(1 for n in g.graph.nodes if n.op == "call_function" and "w8a8" in str(n.target))  # noqa: E731
    assert gemms(gm) == gemms(ref_res.graph_module) - 2 * LAYERS - (2 * LAYERS - 1)
    # bake_rcm_sampler's bookkeeping sees through the fused node
    assert count_cross_kv(gm.graph) == count_cross_kv(ref_res.graph_module.graph) == 2 * LAYERS
    assert count_cross_kv_gemms(gm.graph) == 1
    assert torch.equal(out, ref_out) and torch.equal(out, qkv_out)


def test_leaves_alone_what_it_must():
    # it fuses W8A8 GEMMs only: without w8a8_linear the pipeline says so
    with pytest.raises(turbocompile.errors.PipelineError, match="requires 'w8a8'"):
        _run(_recipe("fuse_norms", "fuse_sibling_gemms"))
    # include matches no self-attention linear
    res, _ = _run(_recipe(_w8(), _sib(include=["blocks.*.ffn.*"])))
    assert _stats(res)["groups"] == 0
    # included, the cross-attention k and v of EVERY block read the same text embedding: one GEMM for all
    # of them; the cross-attention q (reads the video tokens) and o (the attention output) stay alone
    res, out = _run(_recipe(_w8(), _sib(include=["blocks.*.cross_attn.*"])))
    assert _stats(res) == {"groups": 1, "fused_linears": 2 * LAYERS, "unfusable": 0, "small_m": 0}
    _, ref_out = _run(_recipe(_w8()))
    assert torch.equal(out, ref_out)
    # groups smaller than min_members stay as they are: 3 (q, k, v) < 4 <= 2·LAYERS (cross k, v)
    res, _ = _run(_recipe(_w8(), _sib(min_members=4)))
    assert _stats(res) == {"groups": 1, "fused_linears": 2 * LAYERS, "unfusable": 0, "small_m": 0}
    res, _ = _run(_recipe(_w8(), _sib(min_members=2 * LAYERS + 1)))
    assert _stats(res)["groups"] == 0


def test_weights_too_big_for_l2_stay_apart_unless_m_is_small():
    """max_weight_mib with a tiny limit (0.1 MiB < each group's 0.2 MiB): the cross K/V (M = 24 text rows)
    still fuse, since M <= small_m_rows; the q, k, v (M = 192 video rows > small_m_rows 100) stay apart."""
    assert TEXT_ROWS < 100 < VIDEO_ROWS
    res, out = _run(_recipe(_w8(), _sib(max_weight_mib=0.1, small_m_rows=100)))
    rec = next(p for p in res.manifest["passes"] if p["name"] == "fuse_sibling_gemms")
    assert rec["stats"] == {"groups": 1, "fused_linears": 2 * LAYERS, "unfusable": LAYERS, "small_m": 1}
    assert any(f"M = {VIDEO_ROWS} rows > small_m_rows 100" in n for n in rec["notes"])
    assert any(f"but M = {TEXT_ROWS} rows <= small_m_rows 100" in n for n in rec["notes"])
    assert [len(x) for x in _cross_gemms(res.graph_module)] == [1, 0]
    _, ref_out = _run(_recipe(_w8()))
    assert torch.equal(out, ref_out)
    # the default small_m_rows (1024) covers both at wan-tiny's size
    res, _ = _run(_recipe(_w8(), _sib(max_weight_mib=0.1)))
    assert _stats(res) == {"groups": LAYERS + 1, "fused_linears": 5 * LAYERS, "unfusable": 0, "small_m": LAYERS + 1}


def test_small_m_rows_0_restores_the_weight_limit_for_all():
    """small_m_rows 0: a fused weight bigger than max_weight_mib (14B's q/k/v: 75 MiB) is never built; the note
    says why. With the old default include, exactly the old result."""
    res, out = _run(_recipe(_w8(), _sib(max_weight_mib=0.1, small_m_rows=0, include=OLD_INCLUDE)))
    rec = next(p for p in res.manifest["passes"] if p["name"] == "fuse_sibling_gemms")
    assert rec["stats"] == {"groups": 0, "fused_linears": 0, "unfusable": LAYERS, "small_m": 0}
    assert "0.2 MiB > max_weight_mib 0.1" in rec["notes"][0]
    _, ref_out = _run(_recipe(_w8()))
    assert torch.equal(out, ref_out)
    res, out = _run(_recipe(_w8(), _sib(max_weight_mib=0.1, small_m_rows=0)))
    assert _stats(res) == {"groups": 0, "fused_linears": 0, "unfusable": LAYERS + 1, "small_m": 0}
    assert torch.equal(out, ref_out)


def test_turbo_recipes_fuse_qkv_and_cross_kv_before_the_bake():
    for name in ("turbo-int8", "turbo-fp8", "turbo-int8-rcm"):
        assert "fuse_sibling_gemms" in [p.name for p in load_recipe(name).passes], name
    res = turbocompile.optimize("wan-tiny", "turbo-int8-rcm", seed=0)
    names = [p["name"] for p in res.manifest["passes"]]
    assert names.index("fuse_sibling_gemms") < names.index("bake_rcm_sampler")
    assert _stats(res)["groups"] == LAYERS + 1
    bake = next(p["stats"] for p in res.manifest["passes"] if p["name"] == "bake_rcm_sampler")
    assert (bake["cross_kv_gemms_before"], bake["cross_kv_gemms_after"]) == (4, 1)  # 4 steps -> once per call
    assert (bake["cross_kv_before"], bake["cross_kv_after"]) == (4 * 2 * LAYERS, 2 * LAYERS)
