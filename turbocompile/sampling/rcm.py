"""The rCM few-step sampler of TurboDiffusion (``wan-architecture.md`` §5.2, §5.3).

Reference loop, kept deliberately literal so that it is the oracle for the baked sampler
(``passes/bake_rcm_sampler.py``): float64 state, the net called on bf16(x) with bf16-rounded
timesteps, one net call per step, no CFG.
"""

from __future__ import annotations

from typing import Sequence

import torch

from turbocompile.sampling._common import (call_denoiser, check_noise, net_timestep, resolve_experts,
                                           step_iter)
from turbocompile.sampling.schedules import (RCM_MID_TIMES, SamplingError, rcm_expert_plan, rcm_schedule,
                                             rcm_timesteps_bf16)

__all__ = ["rcm_sample"]


def rcm_sample(denoiser, noise: torch.Tensor, context, *, steps: int = 4, sigma_max: float = 80.0,
               mid_times: Sequence[float] = RCM_MID_TIMES, mode: str = "sde",
               generator: torch.Generator | None = None, step_noise: Sequence[torch.Tensor] | None = None,
               y=None, clip_fea=None, experts=None, boundary: float = 0.9,
               net_dtype: torch.dtype = torch.bfloat16, progress: bool = False) -> torch.Tensor:
    """Sample latents with the rCM few-step loop; returns float32 latents shaped like ``noise``.

    Args:
        denoiser: ``denoiser(x, timestep, context[, y=..., clip_fea=...]) -> velocity`` (a
            ``WanModel`` or a captured graph); ``None`` when ``experts`` is given.
        noise: ε0 ``[B, C, T, H, W]`` (drawn by the caller, fp32 in TD); x0 = t0·ε0 in float64.
        context: text embedding passed through unchanged (also y / clip_fea when not None).
        steps, sigma_max, mid_times: the schedule (:func:`rcm_schedule`); σ_max 80 T2V, 200 I2V.
        mode: ``"sde"`` (TD default) x_{i+1} = (1−t_{i+1})(x_i − t_i·v) + t_{i+1}·ε_{i+1};
            ``"ode"`` x_{i+1} = x_i − (t_i − t_{i+1})·v.
        generator: SDE noise source: fp32 ``torch.randn`` on noise's device at every step,
            the last included (it is multiplied by t_N = 0), as TD draws it.
        step_noise: N tensors used instead of ``generator`` draws (SDE only).
        experts: Wan2.2 ``(high, low)``: high first, low from the first step with t_i < boundary.
        net_dtype: dtype of x given to the net (the timestep is a float32 ``[B]`` tensor holding
            bf16(1000·t_i), exact in float32).
        progress: show a tqdm bar.
    """
    check_noise(noise)
    if mode not in ("sde", "ode"):
        raise SamplingError(f"rCM mode must be one of 'sde', 'ode', got {mode!r}")
    nets = resolve_experts(denoiser, experts)
    ts = rcm_schedule(steps, sigma_max, mid_times)
    net_ts = rcm_timesteps_bf16(ts[:-1])
    plan = rcm_expert_plan(ts, boundary) if len(nets) == 2 else [0] * steps
    if step_noise is not None:
        if mode != "sde":
            raise SamplingError("step_noise is only used by mode='sde'")
        step_noise = list(step_noise)
        if len(step_noise) != steps or any(tuple(e.shape) != tuple(noise.shape) for e in step_noise):
            raise SamplingError(f"step_noise must be {steps} tensors of shape {tuple(noise.shape)}, got "
                                f"{[tuple(e.shape) for e in step_noise]}")

    batch, device = noise.shape[0], noise.device
    with torch.no_grad():
        x = ts[0] * noise.double()
        for i in step_iter(steps, progress, "rCM"):
            t, t_next = ts[i], ts[i + 1]
            timestep = net_timestep(net_ts[i], batch, device)
            v = call_denoiser(nets[plan[i]], x.to(net_dtype), timestep, context, y, clip_fea).double()
            if mode == "sde":
                if step_noise is not None:
                    eps = step_noise[i]
                else:
                    eps = torch.randn(noise.shape, generator=generator, dtype=torch.float32, device=device)
                x = (1.0 - t_next) * (x - t * v) + t_next * eps.double()
            else:
                x = x - (t - t_next) * v
    return x.float()
