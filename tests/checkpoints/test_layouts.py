"""Original / TurboDiffusion writers and readers round-trip to identical weights and outputs;
config inference; int8 dequantization; Wan2.2 A14B expert directories."""

from __future__ import annotations

import json

import pytest
import torch

from tests.checkpoints._util import assert_same_state, inputs, rel_err, run, tiny_model
from turbocompile.checkpoints import (
    detect_layout, infer_config, load_model, load_state_dict, save_original, save_turbodiffusion, to_canonical,
)
from turbocompile.checkpoints.int8 import dequantize_int8_block128, quantize_int8_block128
from turbocompile.errors import CheckpointError
from turbocompile.model.config import PRESETS, WanConfig
from turbocompile.model.wan import WanModel


@pytest.fixture(scope="module", params=["wan-tiny", "wan-tiny-i2v"])
def base(request):
    model = tiny_model(request.param, seed=7)
    args = inputs(model, batch=2)
    return model, args, run(model, args)


def _proj_l(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {i: (torch.randn(128, 128, generator=g), torch.randn(128, generator=g)) for i in range(n)}


WRITERS = {
    "original-single": (lambda m, d: save_original(m, d / "model.safetensors"), "original"),
    "original-sharded": (lambda m, d: save_original(m, d / "sharded", max_shard_bytes=2_000_000), "original"),
    "td": (lambda m, d: save_turbodiffusion(m, d / "td.pth"), "canonical"),
    "td-net-projl": (lambda m, d: save_turbodiffusion(m, d / "td.pth", _proj_l(2), net_prefix=True),
                     "turbodiffusion"),
    "td-projl": (lambda m, d: save_turbodiffusion(m, d / "td.pt", _proj_l(2)), "turbodiffusion"),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_round_trip_identical(base, writer, tmp_path):
    model, args, ref = base
    write, raw_layout = WRITERS[writer]
    written = write(model, tmp_path)
    if writer == "original-sharded":
        index = json.loads(written.read_text())
        assert len(set(index["weight_map"].values())) >= 2  # really sharded
        sources = [written, written.parent]  # the index file and its directory
    else:
        sources = [written]
    for source in sources:
        raw = load_state_dict(source)
        assert detect_layout(raw) == raw_layout
        if raw_layout == "original":
            assert raw["patch_embedding.weight"].shape == (256, model.config.in_dim, 1, 2, 2)
        loaded, info = load_model(source)
        assert info.config == model.config and info.dtype == torch.float32
        assert_same_state(loaded.state_dict(), model.state_dict())
        assert torch.equal(run(loaded, args), ref)
        if "projl" in writer:
            assert sorted(info.extras["proj_l"]) == [0, 1]
            for i, (w, b) in _proj_l(2).items():
                assert torch.equal(info.extras["proj_l"][i][0], w) and torch.equal(info.extras["proj_l"][i][1], b)
        else:
            assert info.extras == {"proj_l": {}, "int8": {}}


def test_td_fp32_norms_unified_to_one_dtype(tmp_path):
    model = tiny_model(dtype=torch.bfloat16)
    path = save_turbodiffusion(model, tmp_path / "td.pth", _proj_l(2))
    raw = load_state_dict(path)
    assert raw["blocks.0.self_attn.norm_q.weight"].dtype == torch.float32
    assert raw["blocks.1.norm3.bias"].dtype == torch.float32
    assert raw["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16
    loaded, info = load_model(path)  # default: the block linears' dtype
    assert info.dtype == torch.bfloat16 and loaded.activation_dtype == torch.bfloat16
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert_same_state(loaded.state_dict(), model.state_dict())  # bf16 → fp32 → bf16 is exact
    args = inputs(model)
    assert torch.equal(run(loaded, args), run(model, args))
    as_f32, info32 = load_model(path, dtype="float32")
    assert {p.dtype for p in as_f32.parameters()} == {torch.float32}
    assert info32.extras["proj_l"][0][0].dtype == torch.float32  # extras keep their stored dtype


def test_td_prefixes_and_checkpoint_wrapper_are_stripped():
    model = tiny_model()
    sd = model.state_dict()
    wrapped = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            k = f"blocks.{i}._checkpoint_wrapped_module.{rest}"
        wrapped["net." + k] = v
    assert detect_layout(wrapped) == "turbodiffusion"
    canon, extras = to_canonical(wrapped)
    assert_same_state(canon, sd)
    assert extras == {"proj_l": {}, "int8": {}}


def test_original_conv_weight_is_flattened_c_kt_kh_kw():
    model = tiny_model()
    w = model.patch_embedding.weight.detach()
    conv = w.reshape(256, 16, 1, 2, 2)
    canon, _ = to_canonical({**model.state_dict(), "patch_embedding.weight": conv}, "original")
    assert torch.equal(canon["patch_embedding.weight"], w)
    # Conv3d with the 5-D weight = our Linear on (c, kt, kh, kw)-ordered patches.
    x = torch.randn(1, 16, 1, 2, 2)
    conv_out = torch.nn.functional.conv3d(x, conv, stride=(1, 2, 2)).flatten()
    lin_out = x.reshape(1, -1) @ w.T
    torch.testing.assert_close(conv_out, lin_out.flatten(), rtol=1e-5, atol=1e-5)


def test_int8_dequantized_when_allowed(tmp_path):
    model = tiny_model()
    path = save_turbodiffusion(model, tmp_path / "quant.pth", _proj_l(2), quantize_int8=True)
    raw = load_state_dict(path)
    assert raw["blocks.0.ffn.0.int8_weight"].dtype == torch.int8
    assert raw["blocks.0.ffn.0.scale"].shape == (5, 2)  # [ceil(640/128), ceil(256/128)]
    assert "blocks.0.ffn.0.weight" not in raw and "text_embedding.0.weight" in raw
    with pytest.raises(CheckpointError, match=r"TurboDiffusion int8 weights \(20 linears\)"):
        load_model(path)
    loaded, info = load_model(path, allow_quantized=True)
    assert len(info.extras["int8"]) == 20 and len(info.extras["proj_l"]) == 2
    q, s = info.extras["int8"]["blocks.1.cross_attn.o"]
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (2, 2)
    w = loaded.blocks[1].cross_attn.o.weight.detach()
    assert torch.equal(w, dequantize_int8_block128(q, s))
    orig = model.blocks[1].cross_attn.o.weight.detach()
    assert (w - orig).abs().max() <= s.max() + 1e-7  # one step at most (+amax saturates to 127)
    args = inputs(model)
    err = rel_err(run(loaded, args), run(model, args))
    assert 0 < err < 3e-2


def test_int8_quantizer_blocks_and_saturation():
    w = torch.randn(200, 130)
    w[5, 7] = 50.0  # outlier: its block's amax, mapped to 128 → saturates to 127
    q, s = quantize_int8_block128(w)
    assert q.shape == (200, 130) and s.shape == (2, 2)
    assert q[5, 7] == 127 and s[0, 0] == pytest.approx(50.0 / 128)
    assert s[1, 1] == pytest.approx(w[128:, 128:].abs().max().item() / 128)
    err = (dequantize_int8_block128(q, s) - w).abs()
    step = s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130]
    saturated = q == 127
    assert (err[~saturated] <= step[~saturated] / 2 + 1e-6).all()  # round to nearest elsewhere
    assert (err[saturated] <= step[saturated] + 1e-6).all()


def test_a14b_expert_directories(tmp_path):
    high, low = tiny_model(seed=1), tiny_model(seed=2)
    save_original(high, tmp_path / "high_noise_model" / "diffusion_pytorch_model.safetensors")
    save_original(low, tmp_path / "low_noise_model", max_shard_bytes=500_000)
    for expert, ref in (("high", high), ("low", low)):
        loaded, info = load_model(tmp_path, expert=expert)
        assert info.expert == expert and info.source.endswith(f"{expert}_noise_model")
        assert_same_state(loaded.state_dict(), ref.state_dict())


def test_in_memory_wan_model_is_canonical():
    model = tiny_model("wan-tiny-i2v")
    loaded, info = load_model(model, dtype=torch.bfloat16)
    assert info.layout == "canonical" and info.config is model.config
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert model.text_embedding[0].weight.dtype == torch.float32  # the source is untouched


SMALL_CUSTOM = [
    WanConfig(dim=384, ffn_dim=512, num_heads=3, num_layers=3, in_dim=20, out_dim=12, text_dim=32, freq_dim=64,
              model_type="i2v"),
    WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=1, in_dim=48, out_dim=48, text_dim=16,
              has_image_input=True, image_dim=64, model_type="t2v"),
]
SHAPE_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim",
                "has_image_input", "patch_size", "eps")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_infer_config_round_trips_presets(name):
    preset = PRESETS[name]
    with torch.device("meta"):  # shapes only: a 14B model costs nothing here
        sd = WanModel(preset).state_dict()
    cfg = infer_config(sd)
    for f in SHAPE_FIELDS:
        assert getattr(cfg, f) == getattr(preset, f), f
    if preset.has_image_input:
        assert cfg.image_dim == preset.image_dim
    twins = [n for n, p in PRESETS.items() if n != name and all(getattr(p, f) == getattr(preset, f)
                                                                for f in SHAPE_FIELDS)]
    if not twins:
        assert cfg == preset
    else:  # Wan2.1-T2V-14B and one Wan2.2-T2V-A14B expert have identical shapes
        assert cfg.name in [name, *twins]
        assert infer_config(sd, prefer_experts=True).num_experts == 2


@pytest.mark.parametrize("cfg", SMALL_CUSTOM, ids=["custom-i2v", "custom-img"])
def test_infer_config_custom_shapes(cfg):
    with torch.device("meta"):
        sd = WanModel(cfg).state_dict()
    got = infer_config(sd)
    assert got.name == "custom"
    for f in SHAPE_FIELDS + ("model_type",):
        assert getattr(got, f) == getattr(cfg, f), f
    assert got.has_image_input == cfg.has_image_input and got.image_dim == cfg.image_dim


def test_infer_config_from_int8_checkpoint_uses_biases(tmp_path):
    model = tiny_model()
    path = save_turbodiffusion(model, tmp_path / "q.pth", quantize_int8=True)
    canon, extras = to_canonical(load_state_dict(path))
    assert "blocks.0.ffn.0.weight" not in canon
    assert infer_config(canon) == model.config
