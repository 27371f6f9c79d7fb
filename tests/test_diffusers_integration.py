"""diffusers drop-in: our artifact as WanPipeline's transformer, rCM as its scheduler (CPU, tiny random parts)."""

from __future__ import annotations

import pytest
import torch

import turbocompile
from turbocompile.api import CompiledWan
from turbocompile.errors import InputError
from turbocompile.sampling import rcm_sample

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel  # noqa: E402

from turbocompile.integrations.diffusers import RCMScheduler, TurboWanTransformer, to_diffusers_pipeline  # noqa: E402

LAT = (1, 16, 2, 8, 8)           # 5 frames, 64x64 pixels


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    dif = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                                out_channels=16, text_dim=64, freq_dim=256, ffn_dim=512, num_layers=2,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in dif.named_parameters():
            v = 0.02 * torch.randn(p.shape, generator=g)
            if "norm" in n and n.endswith("weight"):
                v = v + 1.0
            elif p.ndim >= 2 and "table" not in n:
                v = v * 2.0
            p.copy_(v)
    res = turbocompile.optimize(dif, {"version": 1, "model": {"frames": 5, "size": "64x64", "text_len": 24},
                                      "passes": []}, dtype="float32", device="cpu")
    return dif, CompiledWan(res.graph_module, res.manifest).eval()


def _pipe(transformer, scheduler):
    pytest.importorskip("transformers")       # diffusers' WanPipeline module imports transformers
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs():
    g = torch.Generator().manual_seed(9)
    return torch.randn(1, 24, 64, generator=g), torch.randn(LAT, generator=g), [torch.randn(LAT, generator=g)
                                                                             for _ in range(4)]


def _call(pipe, ctx, lat, steps):
    return pipe(prompt_embeds=ctx, height=64, width=64, num_frames=5, num_inference_steps=steps, guidance_scale=1.0,
                latents=lat, output_type="latent").frames


def test_pipeline_with_our_transformer_matches_diffusers(models):
    dif, ours = models
    ctx, lat, _ = _inputs()
    ref = _call(_pipe(dif, FlowMatchEulerDiscreteScheduler(shift=5.0)), ctx, lat, 3)
    pipe = to_diffusers_pipeline(ours, _pipe(dif, FlowMatchEulerDiscreteScheduler(shift=5.0)), scheduler=False)
    assert isinstance(pipe.transformer, TurboWanTransformer)
    out = _call(pipe, ctx, lat, 3)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel


def test_rcm_scheduler_in_pipeline_reproduces_rcm_sample(models):
    _, ours = models
    ctx, lat, eps = _inputs()
    pipe = to_diffusers_pipeline(ours, _pipe(models[0], FlowMatchEulerDiscreteScheduler()))
    assert isinstance(pipe.scheduler, RCMScheduler)
    pipe.scheduler.set_noise(step_noise=eps)
    out = _call(pipe, ctx, lat, 4)
    ref = rcm_sample(ours, lat, ctx, steps=4, net_dtype=torch.float32, step_noise=eps)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    pipe.scheduler.set_noise(generator=torch.Generator().manual_seed(4))
    out_g = _call(pipe, ctx, lat, 2)
    ref_g = rcm_sample(ours, lat, ctx, steps=2, net_dtype=torch.float32, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out_g, ref_g)


def test_scheduler_and_adapter_without_pipeline(models):
    """The pipeline's loop written out (no transformers needed): ODE mode, timesteps, errors."""
    _, ours = models
    ctx, lat, _ = _inputs()
    sch = RCMScheduler(mode="ode")
    net = TurboWanTransformer(ours, ours.config, torch.float32)
    net.scheduler_link = sch
    sch.set_timesteps(4)
    assert sch.timesteps.tolist() == [988.0, 932.0, 852.0, 608.0] and len(sch.sigmas) == 5
    x = lat
    for t in sch.timesteps:
        with net.cache_context("cond"):
            v = net(hidden_states=x.float(), timestep=t.expand(1), encoder_hidden_states=ctx, return_dict=False)[0]
        x = sch.step(v, t, x, return_dict=False)[0]
    ref = rcm_sample(ours, lat, ctx, steps=4, mode="ode", net_dtype=torch.float32)
    assert torch.equal(x, ref)
    assert net.dtype == torch.float32 and tuple(net.config.patch_size) == (1, 2, 2) and net.config.in_channels == 16
    with pytest.raises(InputError, match="valid choices"):
        sch.set_timesteps(6)
    with pytest.raises(InputError, match="attention_kwargs"):
        net(lat, torch.tensor([988.0]), ctx, attention_kwargs={"scale": 1.0})
