"""w8a8_linear pass: which linears, weight storage, SQNR, TurboDiffusion -quant checkpoints."""

import json

import pytest
import torch

import turbocompile
from turbocompile.capture import example_inputs
from turbocompile.checkpoints import save_turbodiffusion
from turbocompile.errors import PassError
from turbocompile.metrics import sqnr_db
from turbocompile.model.config import get_preset
from turbocompile.model.wan import WanModel, init_random_

CFG = get_preset("wan-tiny")


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.fixture(scope="module")
def float_ref():
    return turbocompile.optimize("wan-tiny", "baseline", dtype="float32").graph_module


@pytest.mark.parametrize("recipe,floor", [("w8a8-int8-td", 30.0), ("w8a8-int8", 30.0), ("w8a8-fp8", 25.0)])
def test_replaces_block_linears_and_meets_sqnr(recipe, floor, float_ref, tmp_path):
    """bf16 graph (as deployed) vs the float32 model, worst of 3 inputs (the README's table)."""
    res = turbocompile.optimize("wan-tiny", recipe, tmp_path / "a", dtype="bfloat16")
    stats = res.records[0].stats
    # 10 linears per block (self q/k/v/o, cross q/k/v/o, ffn.0, ffn.2) x 2 blocks
    assert stats["quantized"] == 20
    assert _targets(res.graph_module).count("turbocompile.w8a8_linear.default") == 20
    # embeddings, time MLP, projection and head stay float
    assert stats["skipped"] == 3  # patch_embedding + 2 text_embedding (time/head use upcast weights)
    assert stats["size_reduction"] >= 1.9
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    qdt = "int8" if "int8" in recipe else "float8_e4m3fn"
    assert manifest["tensors"]["by_dtype"][qdt]["count"] == 20
    model = turbocompile.load(tmp_path / "a")
    for seed in (0, 1, 2):
        inp = example_inputs(CFG, CFG.video_shape(), seed=seed)
        assert sqnr_db(model(*inp.values()), float_ref(*inp.values())) >= floor


@pytest.mark.parametrize("recipe", ["turbo-int8", "turbo-fp8"])
def test_full_turbo_stacks_sqnr(recipe, float_ref):
    """The whole stack (W8A8 + fused norms + SageSLA top-k 0.1 + GEMM epilogues), bf16 vs float32."""
    gm = turbocompile.optimize("wan-tiny", recipe, dtype="bfloat16").graph_module
    for seed in (0, 1, 2):
        inp = example_inputs(CFG, CFG.video_shape(), seed=seed)
        assert sqnr_db(gm(*inp.values()), float_ref(*inp.values())) >= 27.0


def test_include_skip_globs(tmp_path):
    recipe = {"version": 1, "passes": [{"name": "w8a8_linear", "options": {
        "include": ["blocks.*.ffn.*"], "skip": ["blocks.1.*"]}}]}
    res = turbocompile.optimize("wan-tiny", recipe, dtype="float32")
    assert res.records[0].stats["quantized"] == 2


def test_turbodiffusion_quant_checkpoint_is_used_bit_exactly(tmp_path):
    model = init_random_(WanModel(CFG), seed=3).to(torch.bfloat16)
    ckpt = save_turbodiffusion(model, tmp_path / "tiny-quant.pth", quantize_int8=True)
    raw = torch.load(ckpt, weights_only=True)
    res = turbocompile.optimize(str(ckpt), "w8a8-int8-td", tmp_path / "art")
    assert res.records[0].stats["from_checkpoint"] == 20
    loaded = turbocompile.load(tmp_path / "art", device="cpu")
    gm = loaded.graph_module
    for i in range(CFG.num_layers):
        for name in ("self_attn.q", "cross_attn.v", "ffn.2"):
            path = f"blocks.{i}.{name}"
            assert torch.equal(gm.get_buffer(f"{path}.qweight"), raw[f"{path}.int8_weight"])
            assert torch.equal(gm.get_buffer(f"{path}.wscale"), raw[f"{path}.scale"].float())
    # without the w8a8 pass the quantized checkpoint is refused with a clear message
    with pytest.raises(turbocompile.TurboCompileError, match="w8a8_linear"):
        turbocompile.optimize(str(ckpt), "baseline")
    # and with incompatible options too
    with pytest.raises(PassError, match="format int8 and weight_granularity block128"):
        turbocompile.optimize(str(ckpt), "w8a8-fp8")
