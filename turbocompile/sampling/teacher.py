"""Teacher (original Wan) flow-matching sampling: schedule setup, CFG, Euler (§5.4).

The state is float64 here (WAN keeps float32 latents; float64 makes the sampler the exact
oracle and costs nothing next to a DiT forward). The net gets ``x`` cast to ``net_dtype``
(float32 by default: the Wan model casts to its own activation dtype) and a float32 ``[B]``
timestep 1000·σ (``int_timesteps=True`` truncates like WAN/diffusers' int64 timesteps).
UniPC lives in :mod:`turbocompile.sampling.unipc`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from turbocompile.sampling._common import (call_denoiser, check_noise, net_timestep, resolve_experts,
                                           step_iter)
from turbocompile.sampling.schedules import SamplingError, flow_expert_plan, flow_schedule, flow_timesteps

__all__ = ["euler_sample", "cfg_velocity", "TeacherPlan", "teacher_plan"]


def cfg_velocity(net, x: torch.Tensor, timestep: torch.Tensor, context, negative_context, guidance: float,
                 *, y=None, clip_fea=None, batch_cfg: bool = True) -> torch.Tensor:
    """Classifier-free-guided velocity in float64: v = v_u + g·(v_c − v_u).

    ``negative_context=None`` means no guidance: one forward, ``v_c`` (``guidance`` must be 1).
    With ``batch_cfg`` and a negative context of the same shape as ``context`` the two passes run
    as one forward of batch 2B (x, timestep, y and clip_fea repeated; cond first); otherwise as
    two forwards.
    """
    if negative_context is None:
        if guidance != 1.0:
            raise SamplingError(f"guidance={guidance} needs negative_context (the encoded negative "
                                "prompt); pass guidance=1 to sample without CFG")
        return call_denoiser(net, x, timestep, context, y, clip_fea).double()
    batchable = (batch_cfg and isinstance(context, torch.Tensor) and isinstance(negative_context, torch.Tensor)
                 and context.shape == negative_context.shape)
    if batchable:
        def twice(a):
            return None if a is None else torch.cat([a, a], dim=0)

        v = call_denoiser(net, twice(x), twice(timestep), torch.cat([context, negative_context], dim=0),
                          twice(y), twice(clip_fea))
        v_c, v_u = v.double().chunk(2, dim=0)
    else:
        v_c = call_denoiser(net, x, timestep, context, y, clip_fea).double()
        v_u = call_denoiser(net, x, timestep, negative_context, y, clip_fea).double()
    return v_u + guidance * (v_c - v_u)


@dataclass(frozen=True)
class TeacherPlan:
    """What a teacher sampler does at each of its N steps (pure data)."""

    sigmas: list[float]        # N+1 RF times, decreasing to 0
    timesteps: list[float]     # N net timesteps (1000·σ, maybe truncated)
    experts: list[int]         # 0 = (high-noise) expert, 1 = low-noise expert
    guidance: list[float]      # CFG scale per step


def teacher_plan(steps: int, shift: float, sigma_max: float, guidance, *, n_experts: int = 1,
                 boundary: float | None = None, int_timesteps: bool = False) -> TeacherPlan:
    """Schedule, expert and guidance per step.

    ``guidance`` is a float, or with two experts a ``(low_noise, high_noise)`` pair (WAN22 order).
    Two experts need ``boundary``: the high-noise expert runs while timestep ≥ 1000·boundary.
    """
    sigmas = flow_schedule(steps, shift, sigma_max)
    timesteps = flow_timesteps(sigmas, integer=int_timesteps)
    if n_experts == 2:
        if boundary is None or not 0.0 < float(boundary) <= 1.0:
            raise SamplingError(f"experts=(high, low) needs boundary in (0, 1] (0.9 I2V-A14B, 0.875 "
                                f"T2V-A14B), got {boundary!r}")
        experts = flow_expert_plan(timesteps, float(boundary))
    else:
        experts = [0] * steps
    if isinstance(guidance, (tuple, list)):
        if n_experts != 2 or len(guidance) != 2:
            raise SamplingError(f"a guidance pair (low_noise, high_noise) needs experts=(high, low), got "
                                f"guidance={guidance!r}")
        g_low, g_high = (float(g) for g in guidance)
        per_step = [g_high if e == 0 else g_low for e in experts]
    else:
        per_step = [float(guidance)] * steps
    if not all(math.isfinite(g) for g in per_step):
        raise SamplingError(f"guidance must be a finite number, got {guidance!r}")
    return TeacherPlan(sigmas, timesteps, experts, per_step)


def euler_sample(denoiser, noise: torch.Tensor, context, *, steps: int = 50, shift: float = 5.0,
                 sigma_max: float = 0.999, guidance=5.0, negative_context=None, y=None, clip_fea=None,
                 experts=None, boundary: float | None = None, net_dtype: torch.dtype = torch.float32,
                 int_timesteps: bool = False, batch_cfg: bool = True, progress: bool = False) -> torch.Tensor:
    """Euler flow-matching sampler of the Wan teacher; returns float32 latents.

    x_N = noise (not scaled: σ_max ≈ 1), then x ← x + (σ_{i+1} − σ_i)·v with the CFG velocity
    v = v_u + g·(v_c − v_u) (:func:`cfg_velocity`). ``experts=(high, low)`` with ``boundary`` and
    an optional ``(low, high)`` guidance pair reproduce Wan2.2's two-expert teacher.
    ``negative_context=None`` requires guidance 1 (single forward per step).
    """
    check_noise(noise)
    nets = resolve_experts(denoiser, experts)
    plan = teacher_plan(steps, shift, sigma_max, guidance, n_experts=len(nets), boundary=boundary,
                        int_timesteps=int_timesteps)
    batch, device = noise.shape[0], noise.device
    sig = plan.sigmas
    with torch.no_grad():
        x = noise.double()
        for i in step_iter(steps, progress, "euler"):
            timestep = net_timestep(plan.timesteps[i], batch, device)
            v = cfg_velocity(nets[plan.experts[i]], x.to(net_dtype), timestep, context, negative_context,
                             plan.guidance[i], y=y, clip_fea=clip_fea, batch_cfg=batch_cfg)
            x = x + (sig[i + 1] - sig[i]) * v
    return x.float()

