"""fuse_norms pass: matches per site, numerics vs the unfused graph, quant epilogue after W8A8."""

from collections import Counter

import pytest

import turbocompile
from tests._env import kernel_device
from turbocompile.capture import example_inputs
from turbocompile.metrics import rel_err
from turbocompile.model.config import get_preset


def _ops(gm):
    return Counter(str(n.target).split(".")[1] for n in gm.graph.nodes
                   if str(n.target).startswith("turbocompile."))


@pytest.mark.parametrize("name", ["wan-tiny", "wan-tiny-i2v"])
def test_matches_per_block(name):
    cfg = get_preset(name)
    n = cfg.num_layers
    res = turbocompile.optimize(name, {"version": 1, "passes": ["fuse_norms"]}, dtype="bfloat16")
    st = res.records[0].stats
    # per block: LN1+mod, norm3 (affine), LN2+mod; plus the head
    # (Wan2.1 I2V's image embedding adds two affine LayerNorms)
    assert st["ln_modulate"] == 2 * n and st["head"] == 1
    assert st["ln_affine"] == n + (2 if cfg.has_image_input else 0)
    # every LN except block 0's LN1 follows a residual add
    assert st["residual"] == 3 * n + 1 - 1
    # self-attn q/k: RMSNorm+RoPE; cross-attn q/k (+k_img): RMSNorm only
    assert st["rmsnorm_rope"] == 2 * n
    assert st["rmsnorm"] == (3 if cfg.has_image_input else 2) * n
    ops = _ops(res.graph_module)
    assert ops["rmsnorm_rope"] == st["rmsnorm_rope"] + st["rmsnorm"]
    assert not any("layer_norm" in str(node.target) for node in res.graph_module.graph.nodes)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_numerics_within_bf16_rounding_and_exact_in_float32(backend):
    """The fused graph vs the unfused one: ≤ 2e-3 in bf16 (the issue's bound), ~exact in float32.

    backend "triton" runs the Triton kernels (on the GPU where there is one, else in the CPU interpreter: one
    input seed there, to keep the suite short).
    """
    cfg = get_preset("wan-tiny")
    dev = kernel_device() if backend == "triton" else "cpu"
    recipe = {"version": 1, "passes": [{"name": "fuse_norms", "options": {"backend": backend}}]}
    fused32 = turbocompile.optimize("wan-tiny", recipe, dtype="float32", device=dev)
    base32 = turbocompile.optimize("wan-tiny", "baseline", dtype="float32", device=dev)
    fused = turbocompile.optimize("wan-tiny", recipe, dtype="bfloat16", device=dev)
    base = turbocompile.optimize("wan-tiny", "baseline", dtype="bfloat16", device=dev)
    for seed in (0,) if backend == "triton" and dev == "cpu" else (0, 1):
        inp = example_inputs(cfg, cfg.video_shape(), seed=seed, device=dev)
        assert rel_err(fused32.graph_module(*inp.values()), base32.graph_module(*inp.values())) < 1e-5
        assert rel_err(fused.graph_module(*inp.values()), base.graph_module(*inp.values())) <= 2e-3


def test_quant_epilogue_after_w8a8():
    res = turbocompile.optimize("wan-tiny", {"version": 1, "passes": ["fuse_norms", "w8a8_linear"]},
                                dtype="bfloat16")
    assert [r.name for r in res.records] == ["w8a8_linear", "fuse_norms"]
    ops = _ops(res.graph_module)
    n = get_preset("wan-tiny").num_layers
    assert res.records[1].stats["quant_epilogue"] == 3 * n
    assert ops["w8a8_linear_prequant"] == 5 * n  # q, k, v, cross q, ffn.0
    assert ops["w8a8_linear"] == 5 * n  # o, cross o/k/v, ffn.2 take unnormalised inputs
    unfused = turbocompile.optimize("wan-tiny", "w8a8-int8", dtype="bfloat16").graph_module
    cfg = get_preset("wan-tiny")
    inp = example_inputs(cfg, cfg.video_shape())
    assert rel_err(res.graph_module(*inp.values()), unfused(*inp.values())) < 2e-2


def test_block128_quant_stays_standalone_unless_asked():
    """TurboDiffusion's block128 activations: the quantizer is not fused by default (a 128-row
    scale block needs the whole band's statistics; the fused kernel measured slower than LN +
    the standalone quantizer on the H200); `quant_granularities` opts in, with the same output."""
    w8 = {"name": "w8a8_linear", "options": {"weight_granularity": "block128", "act_granularity": "block128"}}
    n = get_preset("wan-tiny").num_layers
    default = turbocompile.optimize("wan-tiny", {"version": 1, "passes": [w8, "fuse_norms"]}, dtype="bfloat16")
    assert default.records[1].stats["quant_epilogue"] == 0
    assert _ops(default.graph_module)["w8a8_linear_prequant"] == 0
    opt = {"name": "fuse_norms", "options": {"quant_granularities": ["per_token", "block128"]}}
    fused = turbocompile.optimize("wan-tiny", {"version": 1, "passes": [w8, opt]}, dtype="bfloat16")
    assert fused.records[1].stats["quant_epilogue"] == 3 * n
    cfg = get_preset("wan-tiny")
    inp = example_inputs(cfg, cfg.video_shape())
    assert rel_err(fused.graph_module(*inp.values()), default.graph_module(*inp.values())) < 2e-2
