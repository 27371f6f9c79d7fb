"""Pass fuse_text_attention on wan-tiny: every block's cross-attention (q RMSNorm, attention, the o projection's
FP8 quantizer) becomes value_bound + norm_attention_quant feeding w8a8_linear_prequant, with and without merged
padding keys, in the baked sampler too (the bound once per call); outputs match the unfused graph; INT8 and
block-128 sites are reported and left alone; artifacts round-trip."""

from __future__ import annotations

import pytest
import torch

import turbocompile
from tests.passes._wan_tiny import count_calls, inputs
from tests.passes._wan_tiny import recipe as _recipe
from turbocompile.errors import TurboCompileError
from turbocompile.model.config import get_preset

OPS = torch.ops.turbocompile
PASS = "fuse_text_attention"
CFG = get_preset("wan-tiny")


def _w8(fmt="fp8", act="per_token"):
    return {"name": "w8a8_linear", "options": {"format": fmt, "weight_granularity": "per_channel",
                                               "act_granularity": act}}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _stats(res, name=PASS):
    return next(p["stats"] for p in res.manifest["passes"] if p["name"] == name)


def _padded_inputs(real=7):
    args = inputs()
    ctx = args[2].clone()
    ctx[:, real:] = 0
    return args[:2] + [ctx] + args[3:]


@pytest.mark.parametrize("merge", [False, True])
def test_every_cross_attention_is_fused_and_matches(tmp_path, merge):
    fmt = "fp8"
    stack = [_w8(fmt), "fuse_norms", *(["merge_padding_keys"] if merge else [])]
    args = _padded_inputs()
    base = turbocompile.optimize("wan-tiny", _recipe(*stack))
    res = turbocompile.optimize("wan-tiny", _recipe(*stack, PASS), verify=True, out=tmp_path / "a")
    assert _stats(res) == {"fused": CFG.num_layers, "unmatched": 0}
    gm = res.graph_module
    assert count_calls(gm, OPS.norm_attention_quant.default) == CFG.num_layers
    # the q RMSNorm (no RoPE), the attention and the o projection's own quantizer are gone
    assert count_calls(gm, OPS.rmsnorm_rope.default) == count_calls(base.graph_module, OPS.rmsnorm_rope.default) \
        - CFG.num_layers
    assert count_calls(gm, OPS.tail_merged_attention.default) == 0
    for n in gm.graph.nodes:
        if n.target is OPS.norm_attention_quant.default:
            assert n.args[4].target is OPS.value_bound.default and n.args[4].args[0] is n.args[3]
            assert (n.args[5] is not None) == merge  # the tail start reaches the fused op
            (prequant,) = {u for g in n.users for u in g.users}
            assert prequant.target is OPS.w8a8_linear_prequant.default and prequant.args[5] == fmt
    with torch.no_grad():
        out, ref = gm(*args), base.graph_module(*args)
    assert _rel(out, ref) < 2e-2
    loaded = turbocompile.load(tmp_path / "a", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(*args), out)


def test_order_in_the_recipe_does_not_matter_for_the_merged_keys():
    """Listed before merge_padding_keys, the pass still runs after it (its ``after``), so the tail reaches it."""
    res = turbocompile.optimize("wan-tiny", _recipe(_w8(), "fuse_norms", PASS, "merge_padding_keys"))
    assert _stats(res)["fused"] == CFG.num_layers
    assert count_calls(res.graph_module, OPS.key_tail_start.default) == CFG.num_layers


def test_needs_w8a8_and_fused_norms():
    with pytest.raises(TurboCompileError, match="requires 'fused_norms'"):
        turbocompile.optimize("wan-tiny", _recipe(_w8(), PASS))


@pytest.mark.parametrize("fmt,act", [("int8", "per_token"), ("fp8", "block128")])
def test_int8_and_block128_o_projections_are_reported_and_left_alone(fmt, act):
    stack = [_w8(fmt, act), {"name": "fuse_norms", "options": {"quant_granularities": ["per_token", "block128"]}}]
    res = turbocompile.optimize("wan-tiny", _recipe(*stack, PASS))
    assert _stats(res) == {"fused": 0, "unmatched": CFG.num_layers}
    notes = next(p["notes"] for p in res.manifest["passes"] if p["name"] == PASS)
    assert any(f"is {fmt} {act}" in n and "FP8 codes with per-token scales only" in n for n in notes)
    with pytest.raises(TurboCompileError, match="FP8 codes with per-token scales only"):
        turbocompile.optimize("wan-tiny", _recipe(*stack, PASS), strict=True)


def test_i2v_cross_attention_with_image_keys_is_not_matched():
    res = turbocompile.optimize("wan-tiny-i2v", _recipe(_w8(), "fuse_norms", PASS))
    assert _stats(res) == {"fused": 0, "unmatched": 0}


def test_baked_sampler_fuses_every_step():
    stack = [_w8(), "fuse_norms", {"name": "sagesla_attention", "options": {"topk": 0.5}}, "fuse_sibling_gemms",
             "merge_padding_keys"]
    bake = {"name": "bake_rcm_sampler", "options": {"steps": 2, "mode": "ode"}}
    base = turbocompile.optimize("wan-tiny", _recipe(*stack, bake))
    res = turbocompile.optimize("wan-tiny", _recipe(*stack, PASS, bake))
    gm = res.graph_module
    assert count_calls(gm, OPS.norm_attention_quant.default) == 2 * CFG.num_layers
    # text-only work runs once per call: the tail starts and the value bounds
    assert count_calls(gm, OPS.key_tail_start.default) == CFG.num_layers
    assert count_calls(gm, OPS.value_bound.default) == CFG.num_layers
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(inputs()[0].shape, generator=g)
    ctx = torch.randn(1, CFG.text_len, CFG.text_dim, generator=g).to(torch.bfloat16)
    ctx[:, 7:] = 0
    with torch.no_grad():
        assert _rel(gm(noise, ctx), base.graph_module(noise, ctx)) < 3e-2
