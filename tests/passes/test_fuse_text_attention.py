"""Pass fuse_text_attention on wan-tiny: every block's cross-attention (q RMSNorm, attention, the o projection's
FP8 quantizer) becomes value_bound + norm_attention_quant feeding w8a8_linear_prequant, with and without merged
padding keys, in the baked sampler too (the bound once per call); the q GEMM becomes w8a8_linear_prequant_sumsq
whose sums of squares reach the fused op (option sumsq_from_gemm, off by default: the graph as before);
outputs match the unfused graph; INT8 and block-128 sites are reported and left alone; artifacts round-trip."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import yaml

import turbocompile
from tests.passes._wan_tiny import count_calls, inputs, pass_stats
from tests.passes._wan_tiny import rel_err as _rel
from tests.passes._wan_tiny import w8a8 as _w8
from tests.passes._wan_tiny import recipe as _recipe
from turbocompile.errors import TurboCompileError
from turbocompile.model.config import get_preset
from turbocompile.recipe import builtin_recipes

OPS = torch.ops.turbocompile
PASS = "fuse_text_attention"
CFG = get_preset("wan-tiny")


def _stats(res, name=PASS):
    return pass_stats(res, name)


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
    assert _stats(res) == {"fused": CFG.num_layers, "sumsq_from_gemm": 0, "unmatched": 0}  # option off by default
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
    assert _stats(res) == {"fused": 0, "sumsq_from_gemm": 0, "unmatched": CFG.num_layers}
    assert count_calls(res.graph_module, OPS.w8a8_linear_prequant_sumsq.default) == 0
    notes = next(p["notes"] for p in res.manifest["passes"] if p["name"] == PASS)
    assert any(f"is {fmt} {act}" in n and "FP8 codes with per-token scales only" in n for n in notes)
    with pytest.raises(TurboCompileError, match="FP8 codes with per-token scales only"):
        turbocompile.optimize("wan-tiny", _recipe(*stack, PASS), strict=True)


def test_i2v_cross_attention_with_image_keys_is_not_matched():
    res = turbocompile.optimize("wan-tiny-i2v", _recipe(_w8(), "fuse_norms", PASS))
    assert _stats(res) == {"fused": 0, "sumsq_from_gemm": 0, "unmatched": 0}


def test_baked_sampler_fuses_every_step():
    stack = [_w8(), "fuse_norms", {"name": "sagesla_attention", "options": {"topk": 0.5}}, "fuse_sibling_gemms",
             "merge_padding_keys"]
    bake = {"name": "bake_rcm_sampler", "options": {"steps": 2, "mode": "ode"}}
    base = turbocompile.optimize("wan-tiny", _recipe(*stack, bake))
    # with the q GEMMs' sums of squares: the baked graph keeps them per step (bake_rcm_sampler knows the op)
    res = turbocompile.optimize("wan-tiny", _recipe(*stack, {"name": PASS, "options": {"sumsq_from_gemm": True}}, bake))
    gm = res.graph_module
    assert count_calls(gm, OPS.norm_attention_quant.default) == 2 * CFG.num_layers
    assert count_calls(gm, OPS.w8a8_linear_prequant_sumsq.default) == 2 * CFG.num_layers  # each step's q GEMM
    # text-only work runs once per call: the tail starts and the value bounds
    assert count_calls(gm, OPS.key_tail_start.default) == CFG.num_layers
    assert count_calls(gm, OPS.value_bound.default) == CFG.num_layers
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(inputs()[0].shape, generator=g)
    ctx = torch.randn(1, CFG.text_len, CFG.text_dim, generator=g).to(torch.bfloat16)
    ctx[:, 7:] = 0
    with torch.no_grad():
        assert _rel(gm(noise, ctx), base.graph_module(noise, ctx)) < 3e-2


# ----------------------------------------------------------------- q RMSNorm statistic from the q GEMM


def _sumsq_sites(gm):
    """(norm_attention_quant node, the w8a8_linear_prequant_sumsq node whose sums it reads) for each fused site."""
    sites = []
    for n in gm.graph.nodes:
        if n.target is OPS.norm_attention_quant.default:
            ss = n.args[9] if len(n.args) > 9 else None
            gemm = ss.args[0] if isinstance(ss, fx.Node) and ss.target is operator.getitem else None
            sites.append((n, gemm))
    return sites


def _turbo_fp8(**options) -> dict:
    """The built-in turbo-fp8 recipe (bf16, CPU) with ``options`` for this pass."""
    data = yaml.safe_load(builtin_recipes()["turbo-fp8"].read_text())
    data["model"] = {"dtype": "bfloat16", "device": "cpu"}
    names = [p if isinstance(p, str) else p["name"] for p in data["passes"]]
    data["passes"][names.index(PASS)] = {"name": PASS, "options": options}
    return data


def test_sumsq_from_gemm_takes_every_q_norm_statistic_from_the_q_gemm(tmp_path):
    """turbo-fp8 with the option on: every site's q GEMM writes z's sums of squares and the fused op reads them (the
    statistic of the very z it normalizes: getitem 0 of the same GEMM, reshaped); the output is that of the graph
    with the option off (same z, the statistic summed in another order) and close to the graph without the pass;
    the artifact round-trips."""
    args = _padded_inputs()
    res = turbocompile.optimize("wan-tiny", _turbo_fp8(sumsq_from_gemm=True), out=tmp_path / "a")
    assert next(p for p in res.manifest["passes"] if p["name"] == PASS)["options"]["sumsq_from_gemm"] is True
    assert _stats(res) == {"fused": CFG.num_layers, "sumsq_from_gemm": CFG.num_layers, "unmatched": 0}
    gm = res.graph_module
    assert count_calls(gm, OPS.w8a8_linear_prequant_sumsq.default) == CFG.num_layers
    sites = _sumsq_sites(gm)
    assert len(sites) == CFG.num_layers
    for naq, gemm in sites:
        assert gemm is not None and gemm.target is OPS.w8a8_linear_prequant_sumsq.default
        assert tuple(gemm.args[5:8]) == ("fp8", "per_token", "per_channel")
        z = naq.args[0]
        assert z.op == "call_method" and z.target == "reshape"
        assert z.args[0].target is operator.getitem and z.args[0].args == (gemm, 0)
    off = turbocompile.optimize("wan-tiny", _turbo_fp8(sumsq_from_gemm=False))
    unfused = turbocompile.optimize("wan-tiny", "turbo-fp8", dtype="bfloat16", device="cpu", disable=[PASS])
    with torch.no_grad():
        out, out_off, ref = gm(*args), off.graph_module(*args), unfused.graph_module(*args)
    assert _rel(out, out_off) < 2e-3  # q may round differently in rare elements; equal in practice on CPU
    assert _rel(out, ref) < 2e-2
    from turbocompile.artifact import load_graph_module, read_manifest

    saved = load_graph_module(tmp_path / "a", read_manifest(tmp_path / "a"))
    assert count_calls(saved, OPS.w8a8_linear_prequant_sumsq.default) == CFG.num_layers
    assert len(_sumsq_sites(saved)) == CFG.num_layers and all(gemm is not None for _, gemm in _sumsq_sites(saved))
    loaded = turbocompile.load(tmp_path / "a", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(*args), out)


def test_option_off_leaves_the_graph_as_before():
    """sumsq_from_gemm: false (the default) is the pass of before the option: plain q GEMMs, nine-argument fused
    calls whose z comes from a w8a8_linear_prequant, and the same call sequence as with the option on but for the
    q GEMMs."""
    on = turbocompile.optimize("wan-tiny", _turbo_fp8(sumsq_from_gemm=True))
    assert turbocompile.optimize("wan-tiny", "turbo-fp8", dtype="bfloat16", device="cpu").graph_module.code \
        .count("w8a8_linear_prequant_sumsq") == 0  # the shipped recipe leaves it off
    off = turbocompile.optimize("wan-tiny", _turbo_fp8(sumsq_from_gemm=False))
    assert _stats(off) == {"fused": CFG.num_layers, "sumsq_from_gemm": 0, "unmatched": 0}
    gm = off.graph_module
    assert count_calls(gm, OPS.w8a8_linear_prequant_sumsq.default) == 0
    for naq, gemm in _sumsq_sites(gm):
        assert len(naq.args) == 9 and gemm is None
        assert naq.args[0].args[0].target is OPS.w8a8_linear_prequant.default

    def calls(g):
        return [n.target for n in g.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]

    swapped = [OPS.w8a8_linear_prequant.default if t is OPS.w8a8_linear_prequant_sumsq.default else t
               for t in calls(on.graph_module)]
    assert swapped == calls(gm)


def test_only_a_q_gemm_read_by_the_norm_alone_is_switched():
    """The match (``_sumsq_gemm``) on hand-built graphs: a per-token x per-channel prequant whose output only the
    reshape to z reads, and z only by the norm; another reader of the GEMM output or of z, block-128 scales, or a
    reshape that changes the rows' width leave the GEMM as it is."""
    from turbocompile.passes.fuse_text_attention import _sumsq_gemm

    def graph(extra_user=None, act="per_token", zshape=(1, 4, 256)):
        g = fx.Graph()
        qx, sx, qw, sw = (g.placeholder(n) for n in ("qx", "sx", "qw", "sw"))
        gemm = g.call_function(OPS.w8a8_linear_prequant.default,
                               (qx, sx, qw, sw, None, "fp8", act, "per_channel", torch.bfloat16, "auto"))
        gemm.meta["val"] = torch.empty(4, 256)
        z = g.call_method("reshape", (gemm, *zshape))
        z.meta["val"] = torch.empty(zshape)
        norm = g.call_function(torch.neg, (z,))  # stands for the q norm
        outs = [norm]
        if extra_user == "gemm":
            outs.append(g.call_function(torch.abs, (gemm,)))
        if extra_user == "z":
            outs.append(g.call_function(torch.abs, (z,)))
        g.output(tuple(outs))
        return z, gemm

    z, gemm = graph()
    assert _sumsq_gemm(z) is gemm
    for kw in ({"extra_user": "gemm"}, {"extra_user": "z"}, {"act": "block128"}, {"zshape": (1, 8, 128)}):
        assert _sumsq_gemm(graph(**kw)[0]) is None, kw
