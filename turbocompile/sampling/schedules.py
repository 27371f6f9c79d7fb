"""Pure schedule arithmetic for the samplers (no tensors kept, no state, no randomness).

Everything here is float64 Python math, so a graph pass can bake the values as constants.
Math: ``wan-architecture.md`` §5.1–§5.4.

* rCM few-step (TurboDiffusion): TrigFlow angles θ = [atan(σ_max), *mid_times][:N] + [0],
  RF times t = sin θ / (sin θ + cos θ); the net sees bf16(1000·t).
* Teacher flow matching (Wan): σ = linspace(σ_max, 0, N+1)[:-1], shifted
  σ' = s·σ / (1 + (s−1)·σ), then a final 0; the net sees 1000·σ'.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from turbocompile.errors import TurboCompileError

__all__ = [
    "SamplingError",
    "RCM_STEP_CHOICES",
    "RCM_MID_TIMES",
    "bf16_round",
    "rcm_schedule",
    "rcm_timesteps_bf16",
    "rcm_expert_plan",
    "rcm_update_coefficients",
    "flow_schedule",
    "flow_timesteps",
    "flow_expert_plan",
]

RCM_STEP_CHOICES = (1, 2, 3, 4)
#: TrigFlow angles of the intermediate rCM steps (TD ``backward_timesteps``).
RCM_MID_TIMES = (1.5, 1.4, 1.0)


class SamplingError(TurboCompileError, ValueError):
    """Invalid sampler arguments (one line; lists the valid choices). Also a ValueError."""


def _check_finite_positive(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SamplingError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise SamplingError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _check_steps(steps, valid: Sequence[int] | None, what: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise SamplingError(f"{what} steps must be an int, got {steps!r}")
    if valid is not None and steps not in valid:
        raise SamplingError(f"{what} steps={steps} is not supported; valid choices: "
                            f"{', '.join(map(str, valid))}")
    if steps < 1:
        raise SamplingError(f"{what} steps must be >= 1, got {steps}")
    return steps


def bf16_round(value: float) -> float:
    """Round a float64 value to the nearest bfloat16 (ties to even), returned as a Python float."""
    return torch.tensor(float(value), dtype=torch.float64).to(torch.bfloat16).item()


# -- rCM ---------------------------------------------------------------------------------

def rcm_schedule(steps: int, sigma_max: float = 80.0,
                 mid_times: Sequence[float] = RCM_MID_TIMES) -> list[float]:
    """RF times of the rCM few-step sampler: ``steps + 1`` float64 values, decreasing to 0.

    θ = [atan(σ_max), *mid_times][:steps] followed by 0, and t = sin θ / (sin θ + cos θ)
    (TrigFlow → RF, σ = tan θ, t = σ/(1+σ)). σ_max is 80 for T2V, 200 for I2V.
    Example: ``rcm_schedule(4)`` = [0.987654, 0.933781, 0.852895, 0.608979, 0.0] (rounded).

    Raises :class:`SamplingError` for steps outside 1..4, σ_max ≤ 0, too few mid_times, or
    angles that do not decrease strictly inside (0, π/2).
    """
    steps = _check_steps(steps, RCM_STEP_CHOICES, "rCM")
    sigma_max = _check_finite_positive("sigma_max", sigma_max)
    mids = [float(m) for m in mid_times]
    if len(mids) < steps - 1:
        raise SamplingError(f"rCM steps={steps} needs {steps - 1} mid_times, got {len(mids)}: {mids}")
    thetas = ([math.atan(sigma_max)] + mids)[:steps] + [0.0]
    for a, b in zip(thetas, thetas[1:]):
        if not (math.pi / 2 > a > b >= 0):
            raise SamplingError(f"rCM angles must decrease strictly inside (0, pi/2): {thetas} "
                                f"(theta_0 = atan(sigma_max={sigma_max}))")
    return [math.sin(th) / (math.sin(th) + math.cos(th)) for th in thetas]


def rcm_timesteps_bf16(ts: Sequence[float]) -> list[float]:
    """The timesteps the net sees for RF times ``ts``: bf16(1000·t) as Python floats.

    Pass the N step times (``rcm_schedule(...)[:-1]``) or the whole schedule; the final 0
    maps to 0. For σ_max=80, 4 steps: [988, 932, 852, 608].
    """
    return [bf16_round(1000.0 * float(t)) for t in ts]


def rcm_expert_plan(ts: Sequence[float], boundary: float = 0.9) -> list[int]:
    """Wan2.2 expert per rCM step: 0 = high-noise expert, 1 = low-noise expert.

    ``ts`` is the full schedule (N+1 values; the final 0 is not a step). Starts with the
    high-noise expert and switches, for good, the first time t_i < boundary (TD rule on RF t).
    σ_max=200, 4 steps → [0, 0, 1, 1]; with N ≤ 2 steps only the high-noise expert runs.
    """
    plan, low = [], False
    for t in list(ts)[:-1]:
        if not low and t < boundary:
            low = True
        plan.append(1 if low else 0)
    return plan


def rcm_update_coefficients(ts: Sequence[float], mode: str = "sde") -> list[tuple[float, float, float]]:
    """Per-step (a, b, c) with x_{i+1} = a·x_i + b·v_i + c·ε_{i+1}, algebraically equal to §5.2.

    SDE: a = 1 − t_{i+1}, b = −(1 − t_{i+1})·t_i, c = t_{i+1}; ODE: a = 1, b = −(t_i − t_{i+1}),
    c = 0. For baking into a graph; :func:`~turbocompile.sampling.rcm.rcm_sample` evaluates the
    factored form, which differs only in float64 rounding.
    """
    if mode not in ("sde", "ode"):
        raise SamplingError(f"rCM mode must be one of 'sde', 'ode', got {mode!r}")
    ts = [float(t) for t in ts]
    out = []
    for t, tn in zip(ts, ts[1:]):
        out.append((1.0 - tn, -(1.0 - tn) * t, tn) if mode == "sde" else (1.0, -(t - tn), 0.0))
    return out


# -- teacher flow matching -----------------------------------------------------------------

def flow_schedule(steps: int = 50, shift: float = 5.0, sigma_max: float = 0.999) -> list[float]:
    """Shifted flow-matching sigmas of the Wan teacher: ``steps + 1`` float64 values ending in 0.

    σ_i = linspace(σ_max, 0, N+1)[:-1], σ'_i = s·σ_i / (1 + (s−1)·σ_i), then 0 appended.
    σ is the RF time (x_σ = (1−σ)·x0 + σ·ε); the net timestep is 1000·σ' (:func:`flow_timesteps`).
    """
    steps = _check_steps(steps, None, "flow-matching")
    shift = _check_finite_positive("shift", shift)
    sigma_max = _check_finite_positive("sigma_max", sigma_max)
    if sigma_max > 1.0:
        raise SamplingError(f"flow-matching sigma_max must be in (0, 1], got {sigma_max}")
    sig = torch.linspace(sigma_max, 0.0, steps + 1, dtype=torch.float64)[:-1].tolist()
    return [shift * s / (1.0 + (shift - 1.0) * s) for s in sig] + [0.0]


def flow_timesteps(sigmas: Sequence[float], *, integer: bool = False) -> list[float]:
    """Net timesteps 1000·σ for the N step sigmas (the trailing 0 of a schedule is dropped).

    ``integer=True`` truncates toward zero like WAN's and diffusers' schedulers, which store
    their timesteps as int64.
    """
    sig = [float(s) for s in sigmas]
    if sig and sig[-1] == 0.0:
        sig = sig[:-1]
    ts = [1000.0 * s for s in sig]
    return [float(math.trunc(t)) for t in ts] if integer else ts


def flow_expert_plan(timesteps: Sequence[float], boundary: float) -> list[int]:
    """Wan2.2 teacher expert per step: 0 (high noise) while timestep ≥ 1000·boundary, else 1.

    WAN22 rule (boundary 0.9 for I2V-A14B, 0.875 for T2V-A14B); ``timesteps`` are net timesteps.
    """
    return [0 if t >= 1000.0 * boundary else 1 for t in timesteps]
