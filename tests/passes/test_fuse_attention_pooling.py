"""Pass fuse_attention_pooling on wan-tiny: SageSLA's q/k/v block statistics come from the q/k RMSNorm+RoPE
kernels (one site per block), no pooling kernel runs, outputs equal the graph without the pass (torch and Triton
paths, also over fused q/k/v GEMM slices), dense sites pool k only, artifacts round-trip, and what it leaves
alone."""

from __future__ import annotations

import pytest
import torch

import turbocompile
from tests._env import kernel_device, triton_runs_here
from tests.passes._wan_tiny import count_calls as _count
from tests.passes._wan_tiny import inputs
from tests.passes._wan_tiny import recipe as _recipe
from tests.passes._wan_tiny import rel_err as _rel
from tests.passes._wan_tiny import run as _run
from turbocompile.model.config import get_preset

OPS = torch.ops.turbocompile
LAYERS = get_preset("wan-tiny").num_layers
PASS = "fuse_attention_pooling"


def _w8(backend="auto"):
    return {"name": "w8a8_linear", "options": {"format": "int8", "weight_granularity": "per_channel",
                                               "act_granularity": "per_token", "backend": backend}}


def _base(topk=0.5, backend="auto"):
    return [_w8(backend), {"name": "fuse_norms", "options": {"backend": backend}},
            {"name": "sagesla_attention", "options": {"topk": topk, "backend": backend}}]


def _stats(res):
    return next(p["stats"] for p in res.manifest["passes"] if p["name"] == PASS)


def _sagesla_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OPS.sagesla.default]


def test_fuses_one_site_per_block_and_matches(tmp_path):
    _, ref_out = _run(_recipe(*_base()))
    res, out = _run(_recipe(*_base(), PASS), verify=True, out=tmp_path / "a")
    assert _stats(res) == {"fused": LAYERS, "dense": 0, "unmatched": 0}
    gm = res.graph_module
    assert _count(gm, OPS.rmsnorm_rope_pool.default) == 2 * LAYERS  # self-attention q and k
    assert _count(gm, OPS.rmsnorm_rope.default) == 2 * LAYERS  # cross-attention q and k stay plain
    for node in _sagesla_nodes(gm):
        q_pool, k_sum, v_max = node.args[10:13]
        assert all(a is not None for a in (q_pool, k_sum, v_max))  # nothing left for SageSLA's pass A
        pools = [a.args[0] for a in (q_pool, k_sum)]
        assert [p.args[6:9] for p in pools] == [(64, True, None), (128, False, pools[1].args[8])]
        assert pools[1].args[8] is node.args[2].args[0]  # k's kernel reads the [B, L, D] that v views
    assert torch.equal(out, ref_out)  # torch backend: the reference recomputes the statistics
    model = turbocompile.load(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(model(*inputs()), out)


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_triton_path_runs_no_pooling_kernel(monkeypatch):
    """Triton kernels everywhere, q/k/v as one GEMM (the pooling kernel reads the strided slices): the same
    output as without the pass, and SageSLA's own pooling kernel is never launched (on the GPU where there is
    one, else in the interpreter)."""
    from turbocompile.kernels.sagesla import triton_prep

    passes = [*_base(backend="triton"), "fuse_sibling_gemms"]
    dev = kernel_device()
    _, ref_out = _run(_recipe(*passes, device=dev))

    class _NoPassA:
        def __getitem__(self, grid):
            raise AssertionError("SageSLA's pooling kernel (pass A) was launched")

    monkeypatch.setattr(triton_prep, "_pool_kernel", _NoPassA())
    res, out = _run(_recipe(*passes[:3], PASS, passes[3], device=dev))
    assert _stats(res)["fused"] == LAYERS
    names = [p["name"] for p in res.manifest["passes"]]
    assert names.index(PASS) < names.index("fuse_sibling_gemms")
    narrows = {n for n in res.graph_module.graph.nodes if n.op == "call_method" and n.target == "narrow"}
    pools = [n for n in res.graph_module.graph.nodes if n.target is OPS.rmsnorm_rope_pool.default]
    assert all(p.args[0].args[0] in narrows for p in pools)  # z is a strided q/k slice of the fused GEMM
    assert all(p.args[8].args[0] in narrows for p in pools if p.args[8] is not None)  # v too
    assert torch.equal(out, ref_out) or _rel(out, ref_out) <= 1e-3, _rel(out, ref_out)


def test_dense_sites_pool_k_only():
    _, ref_out = _run(_recipe(*_base(topk=1.0)))
    res, out = _run(_recipe(*_base(topk=1.0), PASS))
    assert _stats(res) == {"fused": LAYERS, "dense": LAYERS, "unmatched": 0}
    gm = res.graph_module
    assert _count(gm, OPS.rmsnorm_rope_pool.default) == LAYERS
    for node in _sagesla_nodes(gm):
        assert node.args[10] is None and node.args[11] is not None and node.args[12] is not None
        assert node.args[0].args[0].target is OPS.rmsnorm_rope.default  # q keeps its plain norm (via a view)
    assert torch.equal(out, ref_out)


def test_leaves_alone_what_it_must():
    # float32 graph: q, k, v reach the op through bf16 casts, not views of the norms
    rec = {**_recipe(*_base(), PASS), "model": {"dtype": "float32", "device": "cpu"}}
    res = turbocompile.optimize("wan-tiny", rec, seed=0)
    rec_pass = next(p for p in res.manifest["passes"] if p["name"] == PASS)
    assert rec_pass["stats"] == {"fused": 0, "dense": 0, "unmatched": LAYERS}
    assert "q is not a view of a rmsnorm_rope output" in rec_pass["notes"][0] or "k is not" in rec_pass["notes"][0]
    assert _count(res.graph_module, OPS.rmsnorm_rope_pool.default) == 0
    with pytest.raises(turbocompile.TurboCompileError, match="left to SageSLA's own pooling kernel"):
        turbocompile.optimize("wan-tiny", rec, seed=0, strict=True)
    # no sagesla at all: nothing to do
    res, _ = _run(_recipe(_w8(), "fuse_norms", PASS))
    assert _stats(res) == {"fused": 0, "dense": 0, "unmatched": 0}


def test_turbo_recipes_run_it_before_the_sibling_gemms_and_the_bake():
    from turbocompile.pipeline import order_passes
    from turbocompile.recipe import load_recipe

    for name in ("turbo-int8", "turbo-fp8", "turbo-int8-rcm"):
        order = [p.name for p in order_passes(load_recipe(name).instantiate_passes())]
        assert PASS in order, name
        i = order.index(PASS)
        assert order.index("fuse_norms") < i and order.index("sagesla_attention") < i, (name, order)
        assert i < order.index("fuse_sibling_gemms"), (name, order)
        if "bake_rcm_sampler" in order:
            assert i < order.index("bake_rcm_sampler"), (name, order)
