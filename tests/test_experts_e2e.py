"""Wan2.2-style two-expert models: optimize bakes both experts into one sampler artifact."""

import torch

import turbocompile
from turbocompile.model.config import get_preset
from turbocompile.model.wan import WanModel, init_random_
from turbocompile.sampling import rcm_sample


def test_builtin_two_expert_model_bakes_high_high_low_low(tmp_path):
    name = "wan-tiny-i2v-a14b"
    cfg = get_preset(name)
    res = turbocompile.optimize(name, "rcm-4step", tmp_path / "moe", dtype="float32", seed=4)
    bake = res.records[-1].stats
    assert bake["expert_plan"] == "HHLL"  # sigma_max 200 (i2v): t = 0.995, 0.934, 0.853, 0.609
    assert res.manifest["model"]["source"]["experts"] == ["high", "low"]
    sampler = turbocompile.load(tmp_path / "moe")
    # reference: the plain Python loop over the two eager experts (seeds as optimize uses them)
    high = init_random_(WanModel(cfg), seed=4).eval()
    low = init_random_(WanModel(cfg), seed=5).eval()
    shape = cfg.video_shape()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shape.latent(16), generator=g)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    y = torch.randn(shape.latent(20), generator=g)
    steps = [torch.randn(shape.latent(16), generator=g) for _ in range(4)]
    with torch.no_grad():
        ref = rcm_sample(None, noise, ctx, y=y, steps=4, sigma_max=200.0, step_noise=steps,
                         experts=(high, low), net_dtype=torch.float32)
        out = sampler(noise, ctx, y=y, step_noise=steps)
    assert torch.equal(out, ref)


def test_expert_flag_conflicts_with_baking():
    try:
        turbocompile.optimize("wan-tiny-i2v-a14b", "rcm-4step", expert="low", dtype="float32")
    except turbocompile.TurboCompileError as exc:
        assert "both Wan2.2 experts" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected an error")
