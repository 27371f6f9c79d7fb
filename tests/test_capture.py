"""Capture: the traced graph reproduces the eager model exactly; shapes propagate on meta."""

import pytest
import torch

from turbocompile.capture import capture, example_inputs, input_specs, propagate_shapes
from turbocompile.model.config import get_preset
from turbocompile.model.wan import WanModel, init_random_


def _eager(model, inp):
    return model(inp["x"], inp["timestep"], inp["context"], y=inp.get("y"), clip_fea=inp.get("clip_fea"))


@pytest.mark.parametrize("name", ["wan-tiny", "wan-tiny-i2v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_matches_eager_bitwise(name, dtype):
    cfg = get_preset(name)
    model = init_random_(WanModel(cfg), seed=1).to(dtype)
    shape = cfg.video_shape()
    gm = capture(model, shape)
    for seed in (0, 1):
        inp = example_inputs(cfg, shape, seed=seed)
        out = gm(*inp.values())
        assert out.dtype == torch.float32
        assert out.shape == (1, cfg.out_dim, 3, 16, 16)
        assert torch.equal(out, _eager(model, inp))


def test_graph_is_flat_and_named_like_checkpoints():
    cfg = get_preset("wan-tiny")
    gm = capture(init_random_(WanModel(cfg)), cfg.video_shape())
    ops = {n.op for n in gm.graph.nodes}
    assert ops <= {"placeholder", "get_attr", "call_function", "call_method", "output"}
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert "blocks.0.self_attn.q.weight" in attrs and "rope_cos" in attrs
    assert not any(a.startswith("_tensor_constant") for a in attrs)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "timestep", "context"]


def test_other_batch_and_grid_specific_rope():
    cfg = get_preset("wan-tiny")
    model = init_random_(WanModel(cfg))
    shape = cfg.video_shape(frames=5, size=(96, 64))
    gm = capture(model, shape)
    inp = example_inputs(cfg, cfg.video_shape(frames=5, size=(96, 64), batch=2))
    assert torch.equal(gm(*inp.values()), _eager(model, inp))


def test_meta_capture_and_shape_propagation_14b_720p():
    cfg = get_preset("wan2.1-t2v-14b")
    with torch.device("meta"):
        model = WanModel(cfg).to(torch.bfloat16)
    shape = cfg.video_shape()
    assert shape.seq_len == 75600
    gm = capture(model, shape)
    propagate_shapes(gm, input_specs(cfg, shape, torch.bfloat16))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["val"].shape) == (1, 16, 21, 90, 160)
    q = next(n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target))
    assert tuple(q.meta["val"].shape) == (1, 40, 75600, 128)
