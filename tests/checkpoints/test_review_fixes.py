"""Checkpoint problems a review found passing silently: a two-expert bake that used one expert, separate
checkpoints merged as shards, proj_l that does not fit or is dropped, legacy .pth files, TD -quant
checkpoints and the turbo recipe, doubled error prefixes."""

from __future__ import annotations

import pytest
import torch

import turbocompile
from tests.checkpoints._util import tiny_model
from turbocompile.checkpoints import load_model, load_state_dict, save_original, save_turbodiffusion
from turbocompile.errors import CheckpointError, PassError
from turbocompile.sampling import rcm_sample


def test_two_expert_bake_uses_both_experts_of_a_non_preset_checkpoint(tmp_path):
    """A wan-tiny-shaped A14B directory matches no two-expert preset: the bake must still switch experts."""
    hi, lo = tiny_model(seed=1), tiny_model(seed=2)
    save_original(hi, tmp_path / "a14b" / "high_noise_model" / "m.safetensors")
    save_original(lo, tmp_path / "a14b" / "low_noise_model" / "m.safetensors")
    res = turbocompile.optimize(tmp_path / "a14b", "rcm-4step", dtype="float32")
    bake = next(r for r in res.records if r.name == "bake_rcm_sampler")
    assert bake.stats["expert_plan"] == "HHLL"
    sampler_attrs = {n.target.split(".")[0] for n in res.graph_module.graph.nodes if n.op == "get_attr"}
    assert {"high", "low"} <= sampler_attrs


def test_turbodiffusion_release_pair_is_a_two_expert_checkpoint(tmp_path):
    """TD ships A14B as two .pth files side by side, named alike but for high / low."""
    d = tmp_path / "td"
    save_turbodiffusion(tiny_model(seed=1), d / "TurboWan2.2-I2V-A14B-high-720P.pth")
    save_turbodiffusion(tiny_model(seed=2), d / "TurboWan2.2-I2V-A14B-low-720P.pth")
    hi, _ = load_model(d, expert="high")
    lo, _ = load_model(d, expert="low")
    assert torch.equal(hi.state_dict()["head.head.weight"], tiny_model(seed=1).state_dict()["head.head.weight"])
    assert torch.equal(lo.state_dict()["head.head.weight"], tiny_model(seed=2).state_dict()["head.head.weight"])
    res = turbocompile.optimize(d, "rcm-4step", dtype="float32")
    assert next(r for r in res.records if r.name == "bake_rcm_sampler").stats["expert_plan"] == "HHLL"


def test_separate_checkpoints_in_one_directory_are_not_merged(tmp_path):
    save_original(tiny_model(seed=1), tmp_path / "d" / "wan2.2_t2v_high_noise_14B_fp16.safetensors")
    save_original(tiny_model(seed=2), tmp_path / "d" / "wan2.2_t2v_low_noise_14B_fp16.safetensors")
    with pytest.raises(CheckpointError, match="both hold .* of the same keys .*not shards") as info:
        load_model(tmp_path / "d")
    assert "\n" not in str(info.value)
    # real shards (disjoint keys) still merge
    save_original(tiny_model(), tmp_path / "s", max_shard_bytes=1 << 16)
    assert len(list((tmp_path / "s").glob("*.safetensors"))) > 1
    load_model(tmp_path / "s")


def test_legacy_pth_is_read(tmp_path):
    sd = tiny_model().state_dict()
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    got = load_state_dict(tmp_path / "legacy.pth")
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_proj_l_shapes_are_checked_at_load(tmp_path):
    model = tiny_model()
    hd = model.config.dim // model.config.num_heads
    bad = {0: (torch.randn(64, 64), torch.randn(64))}
    save_turbodiffusion(model, tmp_path / "bad.pth", proj_l=bad)
    with pytest.raises(CheckpointError, match=r"proj_l': weight \(64, 64\) .* expected \(%d, %d\)" % (hd, hd)):
        load_model(tmp_path / "bad.pth")
    save_turbodiffusion(model, tmp_path / "far.pth", proj_l={7: (torch.randn(hd, hd), torch.randn(hd))})
    with pytest.raises(CheckpointError, match="blocks.7.*block 7 does not exist"):
        load_model(tmp_path / "far.pth")


def test_unused_proj_l_is_reported(tmp_path):
    model = tiny_model()
    hd = model.config.dim // model.config.num_heads
    path = save_turbodiffusion(model, tmp_path / "td.pth", proj_l={0: (torch.randn(hd, hd), torch.randn(hd))})
    with pytest.warns(UserWarning, match="proj_l weights .* are not used"):
        turbocompile.optimize(path, "baseline", dtype="float32")


def test_td_quant_checkpoint_with_the_turbo_td_recipe(tmp_path):
    model = tiny_model()
    hd = model.config.dim // model.config.num_heads
    proj_l = {i: (torch.randn(hd, hd) * 0.05, torch.randn(hd) * 0.05) for i in range(model.config.num_layers)}
    path = save_turbodiffusion(model, tmp_path / "q.pth", proj_l=proj_l, quantize_int8=True)
    with pytest.raises(PassError, match="use recipe turbo-int8-td") as info:
        turbocompile.optimize(path, "turbo-int8", dtype="bfloat16")
    assert str(info.value).count("pass 'w8a8_linear' failed") == 1  # not wrapped twice
    res = turbocompile.optimize(path, "turbo-int8-td", dtype="bfloat16")
    stats = {r.name: r.stats for r in res.records}
    assert stats["w8a8_linear"]["from_checkpoint"] > 0 and stats["sagesla_attention"]["with_proj_l"] == 2
    # the int8 weights as stored, against the dequantized float model: a working turbo graph
    with pytest.warns(UserWarning, match="proj_l"):  # the reference has no linear branch (proj_l is small)
        ref = turbocompile.optimize(path, "w8a8-int8-td", dtype="float32")
    x, t, ctx = (torch.randn(res.manifest["signature"]["inputs"][0]["shape"]), torch.tensor([500.0]),
                 torch.randn(res.manifest["signature"]["inputs"][2]["shape"]))
    with torch.no_grad():
        out, want = res.graph_module(x.bfloat16(), t, ctx.bfloat16()), ref.graph_module(x, t, ctx)
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), want.double().flatten(), dim=0).item()
    assert torch.isfinite(out).all() and cos > 0.99, cos  # 0.9967 observed (bf16, top-k 0.1, proj_l)


def test_rcm_sample_still_runs_on_the_td_artifact(tmp_path):
    """turbo-int8-td is a denoiser artifact: the rCM loop samples it (TD checkpoints are rCM students)."""
    model = tiny_model()
    path = save_turbodiffusion(model, tmp_path / "q.pth", quantize_int8=True)
    out = tmp_path / "art"
    turbocompile.optimize(path, "turbo-int8-td", out, dtype="bfloat16")
    den = turbocompile.load(out)
    noise = torch.randn(den.manifest["signature"]["inputs"][0]["shape"])
    ctx = torch.randn(den.manifest["signature"]["inputs"][2]["shape"])
    lat = rcm_sample(den, noise, ctx, steps=2, generator=torch.Generator().manual_seed(0))
    assert lat.shape == noise.shape and torch.isfinite(lat).all()


def test_diffusers_a14b_config_prefers_the_two_expert_preset(tmp_path):
    """One expert of diffusers' Wan2.2-T2V-A14B has Wan2.1-T2V-14B's shapes: loading it as an expert
    (expert given) names the two-expert preset, a plain directory the one-expert one."""
    import json

    from turbocompile.checkpoints.loader import _diffusers_config_json

    cfg = dict(_class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=40,
               attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
               ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
               image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert _diffusers_config_json(tmp_path, prefer_experts=True).name == "wan2.2-t2v-a14b"
    assert _diffusers_config_json(tmp_path).name == "wan2.1-t2v-14b"
