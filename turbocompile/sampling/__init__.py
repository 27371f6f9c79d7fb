"""Samplers: the rCM few-step loop (TurboDiffusion) and the Wan teacher's flow-matching samplers.

* :mod:`~turbocompile.sampling.schedules` — pure float64 schedule arithmetic (what a graph pass bakes).
* :func:`rcm_sample` — the reference rCM loop (SDE/ODE, Wan2.2 expert switch).
* :func:`euler_sample`, :func:`unipc_sample` — teacher samplers with classifier-free guidance.

All samplers call ``denoiser(x, timestep[B], context[, y=..., clip_fea=...]) -> velocity``.
"""

from turbocompile.sampling.rcm import rcm_sample
from turbocompile.sampling.schedules import (RCM_MID_TIMES, RCM_STEP_CHOICES, SamplingError, bf16_round,
                                             flow_expert_plan, flow_schedule, flow_timesteps, rcm_expert_plan,
                                             rcm_schedule, rcm_timesteps_bf16, rcm_update_coefficients)
from turbocompile.sampling.teacher import TeacherPlan, cfg_velocity, euler_sample, teacher_plan
from turbocompile.sampling.unipc import unipc_orders, unipc_sample

__all__ = [
    "SamplingError",
    "RCM_STEP_CHOICES",
    "RCM_MID_TIMES",
    "bf16_round",
    "rcm_schedule",
    "rcm_timesteps_bf16",
    "rcm_expert_plan",
    "rcm_update_coefficients",
    "rcm_sample",
    "flow_schedule",
    "flow_timesteps",
    "flow_expert_plan",
    "TeacherPlan",
    "teacher_plan",
    "cfg_velocity",
    "euler_sample",
    "unipc_sample",
    "unipc_orders",
]
