"""Pass fuse_gemm_epilogues on wan-tiny: match counts, exactness of the torch path vs the unfused graph,
the Triton path (interpreter on CPU) within bf16 rounding, and the variants it must leave alone."""

from __future__ import annotations

import pytest
import torch

from tests._env import triton_runs_here
from tests.passes._wan_tiny import count_calls as _count
from tests.passes._wan_tiny import recipe as _recipe
from tests.passes._wan_tiny import run as _run
from turbocompile.model.config import get_preset

W8 = {"name": "w8a8_linear", "options": {"format": "int8", "weight_granularity": "per_channel",
                                          "act_granularity": "per_token"}}
OPS = torch.ops.turbocompile


@pytest.mark.parametrize("norms", [True, False], ids=["after_fuse_norms", "w8a8_only"])
def test_fused_graph_equals_unfused_bit_for_bit_on_torch_path(norms):
    base = [W8, "fuse_norms"] if norms else [W8]
    ref_res, ref_out = _run(_recipe(*base))
    res, out = _run(_recipe(*base, "fuse_gemm_epilogues"), verify=True)
    stats = res.manifest["passes"][-1]["stats"]
    blocks = get_preset("wan-tiny").num_layers
    assert stats == {"gelu": 0, "gelu_quant": blocks, "prequant_consumers": blocks, "unmatched": 0,
                     "float_gelu": 1}
    gm = res.graph_module
    assert _count(gm, OPS.w8a8_linear_gelu_quant.default) == blocks
    assert sum(1 for n in gm.graph.nodes if "gelu" == getattr(n.target, "__name__", "")) == 1  # text embedding
    # ffn.2 no longer quantizes dynamically: fewer dynamic w8a8_linear nodes than before
    # (without fuse_norms ffn.0 was a dynamic w8a8_linear too: it became quantize_activation + fused op)
    removed = blocks if norms else 2 * blocks
    assert _count(gm, OPS.w8a8_linear.default) == _count(ref_res.graph_module, OPS.w8a8_linear.default) - removed
    assert torch.equal(out, ref_out)


def test_quant_epilogue_off_and_block128_consumers_fuse_gelu_only():
    res, out = _run(_recipe(W8, "fuse_norms", {"name": "fuse_gemm_epilogues", "options": {"quant_epilogue": False}}))
    _, ref_out = _run(_recipe(W8, "fuse_norms"))
    blocks = get_preset("wan-tiny").num_layers
    assert res.manifest["passes"][-1]["stats"]["gelu"] == blocks
    assert torch.equal(out, ref_out)
    w8_block = {"name": "w8a8_linear", "options": {"format": "int8", "act_granularity": "block128",
                                                   "weight_granularity": "block128"}}  # no per-token consumer
    res2, out2 = _run(_recipe(w8_block, "fuse_gemm_epilogues"))
    _, ref2 = _run(_recipe(w8_block))
    assert res2.manifest["passes"][-1]["stats"]["gelu"] == blocks
    assert res2.manifest["passes"][-1]["stats"]["gelu_quant"] == 0
    assert torch.equal(out2, ref2)


def test_without_w8a8_nothing_matches():
    res, _ = _run(_recipe("fuse_gemm_epilogues"))
    rec = res.manifest["passes"][-1]
    assert rec["modified"] is False and rec["stats"]["float_gelu"] == get_preset("wan-tiny").num_layers + 1


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_triton_fused_ops_within_bf16_rounding_end_to_end():
    _, ref_out = _run(_recipe(W8, "fuse_norms"))
    res, out = _run(_recipe(W8, "fuse_norms", {"name": "fuse_gemm_epilogues", "options": {"backend": "triton"}}))
    assert res.manifest["passes"][-1]["stats"]["gelu_quant"] == get_preset("wan-tiny").num_layers
    rel = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    assert 0 < rel < 1e-2, rel  # differs (GELU on the fp32 accumulator) but only at bf16/int8-code level


def test_turbo_recipes_include_the_pass_before_the_bake():
    from turbocompile.recipe import load_recipe

    for name in ("turbo-int8", "turbo-fp8", "turbo-int8-rcm"):
        names = [p.name for p in load_recipe(name).passes]
        assert "fuse_gemm_epilogues" in names, name
    names = [p.name for p in load_recipe("turbo-int8-rcm").passes]
    assert names.index("fuse_gemm_epilogues") < names.index("bake_rcm_sampler")
