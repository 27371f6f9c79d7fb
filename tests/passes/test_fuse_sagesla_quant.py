"""Pass fuse_sagesla_quant on wan-tiny: every self-attention's ``sagesla -> flatten -> w8a8_linear`` (FP8, per
token) becomes ``sagesla_quant -> w8a8_linear_prequant``, with fuse_attention_pooling's statistics carried over,
with SageSLA's linear branch (TurboDiffusion proj_l), in the built-in turbo-fp8 recipe and in a baked sampler;
outputs stay close to the unfused graph; INT8, block-128 and float32 sites are reported and left alone;
artifacts round-trip."""

from __future__ import annotations

import operator

import pytest
import torch
import yaml

import turbocompile
from tests.passes._wan_tiny import count_calls, inputs, pass_stats, td_checkpoint_with_proj_l
from tests.passes._wan_tiny import rel_err as _rel
from tests.passes._wan_tiny import w8a8 as _w8
from tests.passes._wan_tiny import recipe as _recipe
from turbocompile.errors import TurboCompileError
from turbocompile.model.config import get_preset
from turbocompile.recipe import builtin_recipes

OPS = torch.ops.turbocompile
PASS = "fuse_sagesla_quant"
CFG = get_preset("wan-tiny")
SLA = {"name": "sagesla_attention", "options": {"topk": 0.5}}


def _stats(res, name=PASS):
    return pass_stats(res, name)


def _notes(res, name=PASS):
    return next(p["notes"] for p in res.manifest["passes"] if p["name"] == name)


def _sites(gm):
    """(sagesla_quant node, the w8a8_linear_prequant reading its codes and scales) of every fused site."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is OPS.sagesla_quant.default:
            items = {u.args[1]: u for u in n.users if u.target is operator.getitem}
            (gemm,) = {u for g in items.values() for u in g.users}
            assert gemm.args[0] is items[0] and gemm.args[1] is items[1]
            out.append((n, gemm))
    return out


@pytest.mark.parametrize("pool", [False, True])
def test_every_self_attention_is_fused_and_matches(tmp_path, pool):
    stack = [_w8(), "fuse_norms", SLA, *(["fuse_attention_pooling"] if pool else [])]
    base = turbocompile.optimize("wan-tiny", _recipe(*stack))
    res = turbocompile.optimize("wan-tiny", _recipe(*stack, PASS), verify=True, out=tmp_path / "a")
    assert _stats(res) == {"fused": CFG.num_layers, "with_proj_l": 0, "unmatched": 0}
    gm = res.graph_module
    assert count_calls(gm, OPS.sagesla.default) == 0
    assert count_calls(gm, OPS.sagesla_quant.default) == CFG.num_layers
    # the o projections' own quantizer is gone: they all read SageSLA's codes
    assert count_calls(gm, OPS.w8a8_linear.default) == count_calls(base.graph_module, OPS.w8a8_linear.default) \
        - CFG.num_layers
    sites = _sites(gm)
    assert len(sites) == CFG.num_layers
    for fused, gemm in sites:
        assert tuple(gemm.args[5:9]) == ("fp8", "per_token", "per_channel", torch.bfloat16)
        assert "self_attn" in list(gemm.meta["nn_module_stack"])[-1]
        # the op keeps sagesla's arguments, the pooled statistics included (fuse_attention_pooling ran first)
        assert len(fused.args) == (13 if pool else 10)
        if pool:
            assert all(a is not None for a in fused.args[10:13])
    args = inputs()
    with torch.no_grad():
        out, ref = gm(*args), base.graph_module(*args)
    assert _rel(out, ref) < 2e-2
    assert next(p for p in res.manifest["passes"] if p["name"] == PASS)["verify"]["sqnr_db"] >= 25
    loaded = turbocompile.load(tmp_path / "a", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(*args), out)


def test_runs_after_the_pooling_whatever_the_recipe_order():
    """Listed before fuse_attention_pooling, the pass still runs after it (its ``after``): the statistics reach
    the fused op."""
    res = turbocompile.optimize("wan-tiny", _recipe(_w8(), "fuse_norms", SLA, PASS, "fuse_attention_pooling"))
    names = [p["name"] for p in res.manifest["passes"]]
    assert names.index("fuse_attention_pooling") < names.index(PASS)
    assert _stats(res, "fuse_attention_pooling")["fused"] == CFG.num_layers
    assert all(len(n.args) == 13 and n.args[11] is not None for n, _ in _sites(res.graph_module))


def test_needs_w8a8_and_sparse_attention():
    with pytest.raises(TurboCompileError, match="requires 'sparse_attention'"):
        turbocompile.optimize("wan-tiny", _recipe(_w8(), PASS))
    with pytest.raises(TurboCompileError, match="requires 'w8a8'"):
        turbocompile.optimize("wan-tiny", _recipe(SLA, PASS))


@pytest.mark.parametrize("fmt,act", [("int8", "per_token"), ("fp8", "block128"), ("int8", "block128")])
def test_int8_and_block128_o_projections_are_reported_and_left_alone(fmt, act):
    stack = [_w8(fmt, act), SLA]
    base = turbocompile.optimize("wan-tiny", _recipe(*stack))
    res = turbocompile.optimize("wan-tiny", _recipe(*stack, PASS))
    assert _stats(res) == {"fused": 0, "with_proj_l": 0, "unmatched": CFG.num_layers}
    assert count_calls(res.graph_module, OPS.sagesla.default) == CFG.num_layers
    assert count_calls(res.graph_module, OPS.sagesla_quant.default) == 0
    assert any(f"o projection is {fmt} {act}" in n and "FP8 codes with per-token scales only" in n
               for n in _notes(res))
    assert res.graph_module.code == base.graph_module.code
    with pytest.raises(TurboCompileError, match="FP8 codes with per-token scales only"):
        turbocompile.optimize("wan-tiny", _recipe(*stack, PASS), strict=True)


def test_float32_graph_is_reported_and_left_alone():
    rec = {**_recipe(_w8(), SLA, PASS), "model": {"dtype": "float32", "device": "cpu"}}
    res = turbocompile.optimize("wan-tiny", rec)
    assert _stats(res) == {"fused": 0, "with_proj_l": 0, "unmatched": CFG.num_layers}
    assert any("cast to torch.float32 before the o projection" in n for n in _notes(res))


def test_linear_branch_from_a_turbodiffusion_checkpoint(tmp_path):
    """proj_l (SageSLA's linear branch) in the bound: every site fused, output close to the unfused graph."""
    ckpt, _ = td_checkpoint_with_proj_l(tmp_path / "tiny.pth")
    stack = [_w8(), "fuse_norms", SLA]
    base = turbocompile.optimize(str(ckpt), _recipe(*stack))
    res = turbocompile.optimize(str(ckpt), _recipe(*stack, PASS))
    assert _stats(res) == {"fused": CFG.num_layers, "with_proj_l": CFG.num_layers, "unmatched": 0}
    assert all(n.args[4] is not None and n.args[5] is not None for n, _ in _sites(res.graph_module))
    args = inputs()
    with torch.no_grad():
        assert _rel(res.graph_module(*args), base.graph_module(*args)) < 2e-2


def _turbo_fp8(without=()) -> dict:
    """The built-in turbo-fp8 recipe (bf16, CPU), less the passes in ``without``."""
    data = yaml.safe_load(builtin_recipes()["turbo-fp8"].read_text())
    data["model"] = {"dtype": "bfloat16", "device": "cpu"}
    data["passes"] = [p for p in data["passes"] if (p if isinstance(p, str) else p["name"]) not in without]
    return data


def test_turbo_fp8_runs_it_last_with_the_pooled_statistics():
    from turbocompile.pipeline import order_passes
    from turbocompile.recipe import load_recipe

    order = [p.name for p in order_passes(load_recipe("turbo-fp8").instantiate_passes())]
    assert order.index("fuse_attention_pooling") < order.index(PASS)
    res = turbocompile.optimize("wan-tiny", _turbo_fp8())
    assert _stats(res) == {"fused": CFG.num_layers, "with_proj_l": 0, "unmatched": 0}
    assert _stats(res, "fuse_text_attention")["fused"] == CFG.num_layers  # cross-attention as before
    assert all(len(n.args) == 13 and n.args[11] is not None for n, _ in _sites(res.graph_module))
    unfused = turbocompile.optimize("wan-tiny", _turbo_fp8(without=(PASS,)))
    args = inputs()
    with torch.no_grad():
        assert _rel(res.graph_module(*args), unfused.graph_module(*args)) < 2e-2


def test_baked_sampler_fuses_every_step():
    stack = [_w8(), "fuse_norms", SLA, "fuse_attention_pooling"]
    bake = {"name": "bake_rcm_sampler", "options": {"steps": 2, "mode": "ode"}}
    base = turbocompile.optimize("wan-tiny", _recipe(*stack, bake))
    res = turbocompile.optimize("wan-tiny", _recipe(*stack, PASS, bake))
    gm = res.graph_module
    assert count_calls(gm, OPS.sagesla_quant.default) == 2 * CFG.num_layers
    assert count_calls(gm, OPS.sagesla.default) == 0
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(inputs()[0].shape, generator=g)
    ctx = torch.randn(1, CFG.text_len, CFG.text_dim, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        assert _rel(gm(noise, ctx), base.graph_module(noise, ctx)) < 3e-2
