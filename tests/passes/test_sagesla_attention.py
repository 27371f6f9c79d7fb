"""sagesla_attention pass: self-attention only, proj_l from TurboDiffusion checkpoints, dense layers."""

import pytest
import torch

import turbocompile
from tests.passes._wan_tiny import td_checkpoint_with_proj_l
from turbocompile.capture import example_inputs
from turbocompile.metrics import cosine
from turbocompile.model.config import get_preset
from turbocompile.model.wan import WanModel, init_random_

CFG = get_preset("wan-tiny")


def _count(gm, name):
    return sum(1 for n in gm.graph.nodes if name in str(n.target))


def test_replaces_self_attention_only():
    res = turbocompile.optimize("wan-tiny", "sagesla", dtype="bfloat16")
    gm = res.graph_module
    assert res.records[0].stats["replaced"] == CFG.num_layers
    assert _count(gm, "turbocompile.sagesla") == CFG.num_layers
    assert _count(gm, "scaled_dot_product_attention") == CFG.num_layers  # cross-attention untouched
    assert not any(n.target == "transpose" for n in gm.graph.nodes if n.op == "call_method"
                   and any("sagesla" in str(u.target) for u in n.users))


def test_dense_topk_one_matches_sdpa_closely():
    base = turbocompile.optimize("wan-tiny", "baseline", dtype="bfloat16").graph_module
    dense = turbocompile.optimize("wan-tiny", "sage-dense", dtype="bfloat16").graph_module
    inp = example_inputs(CFG, CFG.video_shape(), seed=2)
    assert cosine(dense(*inp.values()), base(*inp.values())) > 0.999


def test_dense_layers_option_and_range_error():
    recipe = {"version": 1, "passes": [{"name": "sagesla_attention", "options": {"dense_layers": [1]}}]}
    res = turbocompile.optimize("wan-tiny", recipe, dtype="bfloat16")
    assert res.records[0].stats == {"replaced": 1, "dense_kept": 1, "with_proj_l": 0, "unmatched": 0}
    bad = {"version": 1, "passes": [{"name": "sagesla_attention", "options": {"dense_layers": [7]}}]}
    with pytest.raises(turbocompile.TurboCompileError, match=r"out of range: the model has 2 layers \(valid indices 0\.\.1\)"):
        turbocompile.optimize("wan-tiny", bad, dtype="bfloat16")


def test_dense_layers_range_is_checked_before_the_slow_work(monkeypatch):
    """A built-in model's config is known up front: no model is built; a module's is checked before capture."""
    from turbocompile import api

    bad = {"version": 1, "passes": [{"name": "sagesla_attention", "options": {"dense_layers": [0, 2]}}]}

    def never(*args, **kwargs):
        raise AssertionError("reached the slow work before checking the options")

    model = init_random_(WanModel(CFG), seed=1)
    monkeypatch.setattr(api, "capture", never)
    with pytest.raises(turbocompile.TurboCompileError, match=r"dense_layers \[2\] out of range"):
        turbocompile.optimize(model, bad, dtype="float32")
    monkeypatch.setattr(api, "resolve_model", never)
    with pytest.raises(turbocompile.TurboCompileError, match=r"dense_layers \[2\] out of range"):
        turbocompile.optimize("wan-tiny", bad, dtype="float32")


def test_proj_l_from_turbodiffusion_checkpoint(tmp_path):
    ckpt, proj = td_checkpoint_with_proj_l(tmp_path / "tiny.pth")
    res = turbocompile.optimize(str(ckpt), "sagesla", tmp_path / "art")
    assert res.records[0].stats["with_proj_l"] == CFG.num_layers
    loaded = turbocompile.load(tmp_path / "art", device="cpu").graph_module
    for i, (w, b) in proj.items():
        assert torch.equal(loaded.get_buffer(f"blocks.{i}.self_attn.proj_l.weight"), w.float())
        assert torch.equal(loaded.get_buffer(f"blocks.{i}.self_attn.proj_l.bias"), b.float())
    # the linear branch really contributes: zeroing proj_l changes the output
    inp = example_inputs(CFG, CFG.video_shape(), seed=0)
    inp = {k: (v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v) for k, v in inp.items()}
    out = loaded(*inp.values())
    for i in proj:
        loaded.get_buffer(f"blocks.{i}.self_attn.proj_l.weight").zero_()
        loaded.get_buffer(f"blocks.{i}.self_attn.proj_l.bias").zero_()
    assert not torch.equal(out, loaded(*inp.values()))
