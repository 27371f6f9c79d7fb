"""Pass fuse_residual_epilogues on wan-tiny, in the turbo recipes' full pass order: match counts, the torch path
bit-identical to the recipe without the pass (denoiser and baked rCM sampler), the Triton path close, the sites
it must leave alone, and its place in the pass order."""

from __future__ import annotations

import functools
import operator
from types import SimpleNamespace

import pytest
import torch

import turbocompile
from tests._env import kernel_device, triton_runs_here
from tests.passes._wan_tiny import count_calls as _count
from tests.passes._wan_tiny import recipe as _recipe
from tests.passes._wan_tiny import run as _run
from turbocompile.errors import TurboCompileError
from turbocompile.model.config import get_preset
from turbocompile.pipeline import clone_graph_module

OPS = torch.ops.turbocompile
BLOCKS = get_preset("wan-tiny").num_layers
PASS = "fuse_residual_epilogues"


def _w8(fmt):
    return {"name": "w8a8_linear", "options": {"format": fmt, "weight_granularity": "per_channel",
                                               "act_granularity": "per_token"}}


def _turbo(fmt, fused, pass_options=None, device="cpu"):
    """turbo-int8 / turbo-fp8's passes, with this pass after fuse_gemm_epilogues when ``fused``."""
    mine = [{"name": PASS, "options": pass_options or {}}] if fused else []
    return _recipe(_w8(fmt), "fuse_norms", "fuse_gemm_epilogues",
                   {"name": "sagesla_attention", "options": {"topk": 0.1, "quant": "int8-fp8"}},
                   "fuse_attention_pooling", *mine, "fuse_sibling_gemms", device=device)


@functools.lru_cache(maxsize=None)
def _reference(fmt, device="cpu"):
    return _run(_turbo(fmt, False, device=device))


def _stats(res, name):
    return next(p for p in res.manifest["passes"] if p["name"] == name)["stats"]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_turbo_recipe_counts_and_bit_exact_on_torch(fmt):
    ref_res, ref_out = _reference(fmt)
    res, out = _run(_turbo(fmt, True), verify=fmt == "int8")
    # per block: self-attn o (gated), cross-attn o (no gate), ffn.2 (gated); the last ffn.2 feeds the head's
    # float32 LayerNorm (not quantized)
    assert _stats(res, PASS) == {"fused": 3 * BLOCKS, "gated": 2 * BLOCKS, "quantized": 3 * BLOCKS - 1,
                                 "float_residual": 0, "unmatched": 0}
    gm, ref_gm = res.graph_module, ref_res.graph_module
    assert _count(gm, OPS.w8a8_linear_residual.default) == 3 * BLOCKS
    assert _count(gm, OPS.residual_ln_modulate_quant.default) == _count(gm, OPS.residual_ln_modulate.default) == 0
    assert _count(gm, OPS.ln_modulate_quant.default) == _count(ref_gm, OPS.ln_modulate_quant.default) + 3 * BLOCKS - 1
    # the o-projections' dynamic quantization became explicit; ffn.2 was already pre-quantized
    assert _count(ref_gm, OPS.w8a8_linear.default) - _count(gm, OPS.w8a8_linear.default) == 2 * BLOCKS
    assert _count(ref_gm, OPS.w8a8_linear_prequant.default) - _count(gm, OPS.w8a8_linear_prequant.default) == BLOCKS
    # fuse_sibling_gemms runs after it and still fuses exactly q/k/v and the cross K/V, never a residual GEMM
    assert _stats(res, "fuse_sibling_gemms") == _stats(ref_res, "fuse_sibling_gemms")
    assert not any("tc_fused_members" in n.meta for n in gm.graph.nodes
                   if n.target is OPS.w8a8_linear_residual.default)
    assert torch.equal(out, ref_out)


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_triton_fused_gemms_close_end_to_end():
    """The Triton residual GEMMs (on the GPU where there is one, else in the interpreter) against the recipe
    without the pass on the same device."""
    _, ref_out = _reference("fp8", kernel_device())
    res, out = _run(_turbo("fp8", True, {"backend": "triton"}, device=kernel_device()))
    assert _stats(res, PASS)["fused"] == 3 * BLOCKS
    rel = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    assert rel < 1e-2, rel  # fp32 (Triton) vs float64 (reference) GEMM sums: bf16-ulp differences of y at most


def test_baked_rcm_sampler_bit_exact_and_unrolled():
    """turbo-int8-rcm's order (the pass before the bake): every step runs the residual GEMMs, and the baked
    sampler computes exactly what it computes without the pass."""
    small = {"dtype": "bfloat16", "device": "cpu", "frames": 5, "size": "64x64"}
    bake = {"name": "bake_rcm_sampler", "options": {"steps": 2, "sigma_max": None, "mode": "sde"}}
    passes = [_w8("int8"), {"name": "sagesla_attention", "options": {"topk": 0.5, "block_q": 16, "block_k": 16}},
              "fuse_norms", "fuse_attention_pooling", "fuse_gemm_epilogues"]
    outs = []
    for mine in ([], [PASS]):
        rec = {"version": 1, "name": "t", "model": small, "passes": passes + mine + ["fuse_sibling_gemms", bake]}
        res = turbocompile.optimize("wan-tiny", rec, seed=0)
        shape = res.manifest["signature"]["inputs"][0]["shape"]
        g = torch.Generator().manual_seed(3)
        args = [torch.randn(shape, generator=g).to(torch.bfloat16), torch.randn(1, 24, 64, generator=g),
                *(torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(2))]
        with torch.no_grad():
            outs.append(res.graph_module(*args))
    assert _count(res.graph_module, OPS.w8a8_linear_residual.default) == 2 * 3 * BLOCKS
    assert _stats(res, "bake_rcm_sampler")["cross_kv_after"] == 2 * BLOCKS
    assert torch.equal(outs[0], outs[1])


def test_gemm_output_with_other_users_is_unmatched_and_strict_raises():
    from turbocompile.passes.fuse_residual_epilogues import FuseResidualEpilogues

    ref_res, _ = _reference("int8")
    gm = clone_graph_module(ref_res.graph_module)
    site = next(n for n in gm.graph.nodes if n.target is OPS.residual_ln_modulate_quant.default)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):  # a second (live) reader of the first site's y
        extra = gm.graph.call_function(operator.mul, (site.args[1], 0))
        keep = gm.graph.call_function(torch.Tensor.sum, (extra,))
        out.args = ((out.args[0], keep),) if not isinstance(out.args[0], tuple) else (out.args[0] + (keep,),)
    result = FuseResidualEpilogues().run(clone_graph_module(gm), SimpleNamespace(strict=False))
    assert result.stats["unmatched"] == 1 and result.stats["fused"] == 3 * BLOCKS - 1
    assert "other users" in result.notes[0]
    with pytest.raises(TurboCompileError, match="1 residual site\\(s\\) left unfused under --strict"):
        FuseResidualEpilogues().run(gm, SimpleNamespace(strict=True))


def test_without_w8a8_nothing_matches_and_order_follows_the_fusions():
    res, _ = _run(_recipe("fuse_norms", PASS))
    rec = res.manifest["passes"][-1]
    assert rec["modified"] is False
    assert rec["stats"] == {"fused": 0, "gated": 0, "quantized": 0, "float_residual": 3 * BLOCKS, "unmatched": 0}
    from turbocompile.passbase import get_pass
    from turbocompile.pipeline import order_passes

    names = [PASS, "fuse_sibling_gemms", "fuse_gemm_epilogues", "fuse_norms", "w8a8_linear"]
    order = [p.name for p in order_passes([get_pass(n)() for n in names])]
    assert order.index(PASS) > max(order.index(n) for n in ("w8a8_linear", "fuse_norms", "fuse_gemm_epilogues"))
