"""Pass fuse_gemm_epilogues on wan-tiny: match counts, exactness of the torch path vs the unfused graph,
the Triton path (on the GPU where there is one, else in the interpreter) within bf16 rounding, and the variants
it must leave alone."""

from __future__ import annotations

import functools

import pytest
import torch

from tests._env import kernel_device, sm_at_least, triton_runs_here
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
    assert stats == {"gelu": 0, "gelu_quant": blocks, "bound_from_norm": 0, "prequant_consumers": blocks,
                     "unmatched": 0, "float_gelu": 1}
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
    dev = kernel_device()
    _, ref_out = _run(_recipe(W8, "fuse_norms", device=dev))
    res, out = _run(_recipe(W8, "fuse_norms", {"name": "fuse_gemm_epilogues", "options": {"backend": "triton"}},
                            device=dev))
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


# ------------------------------------------------------------------ quant_scale: pow2 (turbo-fp8)


def _turbo_fp8(device="cpu", **epi_options) -> dict:
    """The built-in turbo-fp8 recipe (bf16, on ``device``) with these fuse_gemm_epilogues options, or without the
    pass when called with ``drop=True``."""
    from turbocompile.recipe import load_recipe

    passes = []
    for p in load_recipe("turbo-fp8").to_dict()["passes"]:
        if p["name"] == "fuse_gemm_epilogues":
            if epi_options.get("drop"):
                continue
            p = {"name": p["name"], "options": {**p["options"], **epi_options}}
        passes.append(p)
    return _recipe(*passes, device=device)


@functools.lru_cache(maxsize=None)
def _torch_turbo_fp8(quant_scale: str, device: str = "cpu"):
    """(OptimizeResult, output) of turbo-fp8 with the torch backend, verified pass by pass (shared below)."""
    return _run(_turbo_fp8(device, backend="torch", quant_scale=quant_scale), verify=True)


def _fused_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == OPS.w8a8_linear_gelu_quant.default]


def test_turbo_fp8_recipe_uses_bound_and_int8_recipes_do_not():
    from turbocompile.recipe import load_recipe

    def epi(name):
        return next(p for p in load_recipe(name).passes if p.name == "fuse_gemm_epilogues").options

    assert epi("turbo-fp8").quant_scale == "bound"
    for name in ("turbo-int8", "turbo-int8-rcm"):
        assert epi(name).quant_scale == "amax"


def test_pow2_torch_path_equals_the_unfused_graph_with_pow2_quantization(monkeypatch):
    """turbo-fp8 (quant_scale: pow2, torch backend) vs the same recipe without the pass, whose ffn.2 quantizes
    its input with ref.quantize_pow2_ref instead of the amax quantizer: bit for bit."""
    from turbocompile.kernels.w8a8 import ref
    from turbocompile.ops import w8a8 as W

    ffn_dim = get_preset("wan-tiny").ffn_dim
    res, out = _torch_turbo_fp8("pow2")
    fused = _fused_nodes(res.graph_module)
    assert len(fused) == get_preset("wan-tiny").num_layers and all(n.args[-1] == "pow2" for n in fused)
    rec = next(p for p in res.manifest["passes"] if p["name"] == "fuse_gemm_epilogues")
    assert rec["options"]["quant_scale"] == "pow2"
    # --verify: a quantizing change (another FP8 grid for ffn.2's input), held to the pass's pow2 floor
    assert 25.0 <= rec["verify"]["sqnr_db"] < 60.0, rec["verify"]
    _, amax_out = _torch_turbo_fp8("amax")
    orig = W._quantize_impl

    def pow2_for_ffn2(x, fmt, granularity, impl):  # ffn.2 is the only W8A8 linear reading ffn_dim channels
        if x.shape[-1] == ffn_dim:
            assert (fmt, granularity) == ("fp8", "per_token")
            return ref.quantize_pow2_ref(x)
        return orig(x, fmt, granularity, impl)

    monkeypatch.setattr(W, "_quantize_impl", pow2_for_ffn2)
    _, unfused = _run(_turbo_fp8(drop=True))
    assert torch.equal(out, unfused)
    assert not torch.equal(out, amax_out)  # a different (FP8-rounding-level) quantization, not a no-op
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), amax_out.float().flatten(), dim=0).item()
    assert cos > 0.999, cos


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
@pytest.mark.skipif(kernel_device() == "cuda" and not sm_at_least(9), reason="the TMA kernels need sm90+")
@pytest.mark.parametrize("route", ["default", "tma"])
def test_pow2_triton_path_close_to_the_amax_variant(route, monkeypatch):
    """Triton backend, pow2 vs amax scales: cos >= 0.999. "default" takes the kernels' own route (in the
    interpreter the pointer kernel + pow2 quantization of h, on sm90 the TMA kernel); "tma" forces the TMA
    kernel, i.e. the FP8 epilogue + requant."""
    from turbocompile.kernels.w8a8 import triton_gemm_epilogue as te
    from turbocompile.kernels.w8a8 import triton_pow2

    requants = []  # calls of the in-place requantization: the FP8-epilogue route ran
    real = triton_pow2.requant_pow2_triton
    monkeypatch.setattr(triton_pow2, "requant_pow2_triton", lambda *a, **k: requants.append(1) or real(*a, **k))
    if route == "tma":
        monkeypatch.setattr(te, "w8a8_gemm_gelu_quant_triton",
                            functools.partial(te.w8a8_gemm_gelu_quant_triton, use_tma=True))
    dev = kernel_device()
    _, amax_out = _run(_turbo_fp8(dev, backend="triton", quant_scale="amax"))
    res, out = _run(_turbo_fp8(dev, backend="triton", quant_scale="pow2"))
    assert all(n.args[-1] == "pow2" for n in _fused_nodes(res.graph_module))
    expect_epilogue = route == "tma" or dev == "cuda"  # the interpreter's default is the pointer kernel (bf16 h)
    assert len(requants) == (get_preset("wan-tiny").num_layers if expect_epilogue else 0)
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), amax_out.float().flatten(), dim=0).item()
    assert cos >= 0.999, cos
    _, torch_out = _torch_turbo_fp8("pow2", dev)  # and the Triton pow2 path close to its torch backend
    rel = ((out.float() - torch_out.float()).norm() / torch_out.float().norm()).item()
    assert rel < 1e-2, rel


@pytest.mark.parametrize("scale", ["pow2", "bound"])
def test_pow2_and_bound_options_leave_int8_consumers_on_amax(scale):
    res, out = _run(_recipe(W8, "fuse_norms", {"name": "fuse_gemm_epilogues", "options": {"quant_scale": scale}}))
    _, ref_out = _run(_recipe(W8, "fuse_norms"))
    rec = res.manifest["passes"][-1]
    assert rec["stats"]["gelu_quant"] == get_preset("wan-tiny").num_layers
    assert all(len(n.args) == 11 for n in _fused_nodes(res.graph_module))  # the default 11-argument call
    assert any(f"quant_scale={scale} applies to FP8 consumers" in note for note in rec["notes"])
    assert torch.equal(out, ref_out)


# ------------------------------------------------------------------ quant_scale: bound


def test_bound_folds_the_weight_constants_and_stays_close_to_amax():
    """quant_scale: bound (torch backend): every fused op reads a ``<ffn.0>.gelu_bound`` buffer holding
    ref.gelu_bound_constants_ref of that layer's weights, computed at optimize time; the output stays at
    FP8-rounding distance from the amax variant, and --verify holds the quantizing floor."""
    from turbocompile.kernels.w8a8 import ref
    from turbocompile.passes._graph import get_attr_value, module_path

    res, out = _torch_turbo_fp8("bound")
    gm = res.graph_module
    # the default (bound_in_norm): the GEMM takes its row scales from the FFN norm, which reads the constants
    fused = [n for n in gm.graph.nodes if n.target == OPS.w8a8_linear_gelu_quant_rowscale.default]
    assert len(fused) == get_preset("wan-tiny").num_layers and not _fused_nodes(gm)
    for n in fused:
        row_scale = n.args[9]
        norm = row_scale.args[0]
        assert norm.target == OPS.residual_ln_modulate_quant_bound.default and row_scale.args[1] == 3
        wb = norm.args[-2]
        assert wb.op == "get_attr" and wb.target.endswith(".gelu_bound")
        qw, sw, bias = (get_attr_value(gm, a.target) for a in n.args[2:5])
        assert module_path(n.args[2].target) == module_path(wb.target)
        assert torch.equal(get_attr_value(gm, wb.target), ref.gelu_bound_constants_ref(qw, sw, bias, "per_channel"))
    rec = next(p for p in res.manifest["passes"] if p["name"] == "fuse_gemm_epilogues")
    assert 25.0 <= rec["verify"]["sqnr_db"] < 60.0, rec["verify"]
    _, amax_out = _torch_turbo_fp8("amax")
    assert not torch.equal(out, amax_out)
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), amax_out.float().flatten(), dim=0).item()
    assert cos > 0.999, cos


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
@pytest.mark.skipif(kernel_device() == "cuda" and not sm_at_least(9), reason="the TMA kernels need sm90+")
def test_bound_triton_path_through_the_rowscale_epilogue(monkeypatch):
    """Triton backend, TMA route forced: the GELU GEMM stores the codes at the bound scales (amax_mode
    "rowscale", no quantizer, no requantization), close to the torch backend of the same recipe."""
    from turbocompile.kernels.w8a8 import triton_gemm_epilogue as te
    from turbocompile.kernels.w8a8 import triton_gemm_tma

    modes = []
    real = triton_gemm_tma.w8a8_gemm_tma
    monkeypatch.setattr(triton_gemm_tma, "w8a8_gemm_tma", lambda *a, **k: modes.append(k.get("amax_mode")) or
                        real(*a, **k))
    monkeypatch.setattr(te, "w8a8_gemm_gelu_quant_triton", functools.partial(te.w8a8_gemm_gelu_quant_triton,
                                                                             use_tma=True))
    from turbocompile.kernels.w8a8 import triton_bound as tb  # the GEMM of w8a8_linear_gelu_quant_rowscale

    monkeypatch.setattr(tb, "gelu_quant_bound", functools.partial(tb.gelu_quant_bound, use_tma=True))
    dev = kernel_device()
    _, out = _run(_turbo_fp8(dev, backend="triton", quant_scale="bound"))
    assert modes.count("rowscale") == get_preset("wan-tiny").num_layers
    _, torch_out = _torch_turbo_fp8("bound", dev)
    rel = ((out.float() - torch_out.float()).norm() / torch_out.float().norm()).item()
    assert rel < 1e-2, rel
