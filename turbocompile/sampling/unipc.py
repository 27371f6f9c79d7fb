"""UniPC (bh2, order 2, data prediction, corrector, lower-order final) for the Wan teacher.

Written from the UniPC definition (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector
Framework for Fast Sampling of Diffusion Models") for the rectified-flow parameterisation
x_σ = α·x0 + σ·ε with α = 1 − σ.

The solver works with the data prediction m = x̂0 = x − σ·v and the half log-SNR
λ(σ) = log(α/σ), which increases as σ falls. The exact solution of the probability-flow ODE
from s to t is

    x_t = (σ_t/σ_s)·x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x̂0(λ) dλ.

With h = λ_t − λ_s and φ = e^{−h} − 1 (< 0), a constant x̂0 = m_s gives the first-order
update x_t = (σ_t/σ_s)·x_s − α_t·φ·m_s. Higher-order terms use divided differences
D_k = (m_k − m_s)/r_k at earlier (or later) points with r_k = (λ_k − λ_s)/h, weighted by
coefficients ρ scaled with B(h); the "bh2" variant takes B(h) = e^{−h} − 1 = φ:

    x_t = (σ_t/σ_s)·x_s − α_t·φ·m_s − α_t·B(h)·Σ_k ρ_k·D_k.

* Predictor UniP-2 uses the previous step's m (r < 0) with ρ = 1/2.
* Corrector UniC re-solves the step s → t once m_t is known (it costs no extra net call: m_t
  is the next step's net output anyway), adding D_t = m_t − m_s (r = 1). Its weights solve
  the Vandermonde system Σ_k ρ_k·r_k^{j−1} = b_j (j = 1..p) with
  b_j = j!·ψ_{j+1}(h)/B(h), ψ_1 = φ/(−h) − 1, ψ_{j+1} = ψ_j/(−h) − 1/(j+1)!; for p = 1, ρ = 1/2.
* Order schedule: warm-up (order 1 at the first step), order 2 after, order 1 for the last
  step ("lower_order_final"), whose target σ = 0 has λ = ∞: there the first-order update
  reduces exactly to x_0 = m_s, and a second-order term would diverge.
* The corrector of step i uses the order of the predictor that produced x_i.
"""

from __future__ import annotations

import math

import torch

from turbocompile.sampling._common import check_noise, net_timestep, resolve_experts, step_iter
from turbocompile.sampling.schedules import SamplingError
from turbocompile.sampling.teacher import cfg_velocity, teacher_plan

__all__ = ["unipc_sample", "unipc_orders"]

_ORDER = 2


def _lam(sigma: float) -> float:
    """Half log-SNR of the RF path: log((1 − σ)/σ)."""
    return math.log1p(-sigma) - math.log(sigma)


def unipc_orders(steps: int) -> list[int]:
    """Predictor order per step: min(2, i + 1, steps − i) (warm-up and lower-order final)."""
    return [min(_ORDER, i + 1, steps - i) for i in range(steps)]


def _b_coefficients(h: float, order: int) -> list[float]:
    """b_j = j!·ψ_{j+1}(h)/B(h) for j = 1..order (bh2: B(h) = expm1(−h))."""
    hh = -h
    phi = math.expm1(hh)
    psi, fact, out = phi / hh - 1.0, 1.0, []
    for j in range(1, order + 1):
        out.append(psi * fact / phi)
        fact *= j + 1
        psi = psi / hh - 1.0 / fact
    return out


def _first_order(x_s: torch.Tensor, m_s: torch.Tensor, sigma_s: float, sigma_t: float) -> torch.Tensor:
    alpha_t = 1.0 - sigma_t
    phi = math.expm1(-(_lam(sigma_t) - _lam(sigma_s)))
    return (sigma_t / sigma_s) * x_s - (alpha_t * phi) * m_s


def unip_step(x_s, m_s, sigma_s: float, sigma_t: float, m_prev=None, sigma_prev: float | None = None):
    """Predictor s → t; second order when the previous data prediction ``m_prev`` is given."""
    if sigma_t == 0.0:
        if m_prev is not None:
            raise SamplingError("UniPC: a second-order step onto sigma = 0 is undefined (lower_order_final)")
        return m_s.clone()
    x_t = _first_order(x_s, m_s, sigma_s, sigma_t)
    if m_prev is None:
        return x_t
    lam_s = _lam(sigma_s)
    h = _lam(sigma_t) - lam_s
    r = (_lam(sigma_prev) - lam_s) / h
    d = (m_prev - m_s) / r
    return x_t - ((1.0 - sigma_t) * math.expm1(-h) * 0.5) * d


def unic_step(x_s, m_s, m_t, sigma_s: float, sigma_t: float, m_prev=None, sigma_prev: float | None = None):
    """Corrector: redo s → t with the data prediction ``m_t`` at the predicted x_t.

    ``order`` is 2 when ``m_prev`` (the step before s) is given, else 1.
    """
    x_t = _first_order(x_s, m_s, sigma_s, sigma_t)
    lam_s = _lam(sigma_s)
    h = _lam(sigma_t) - lam_s
    scale = (1.0 - sigma_t) * math.expm1(-h)   # α_t·B(h)
    d_t = m_t - m_s
    if m_prev is None:
        return x_t - (scale * 0.5) * d_t
    r = (_lam(sigma_prev) - lam_s) / h
    b1, b2 = _b_coefficients(h, 2)
    # Solve [[1, 1], [r, 1]]·(ρ_prev, ρ_t) = (b1, b2).
    rho_prev = (b1 - b2) / (1.0 - r)
    rho_t = b1 - rho_prev
    d = (m_prev - m_s) / r
    return x_t - scale * (rho_prev * d + rho_t * d_t)


def unipc_sample(denoiser, noise: torch.Tensor, context, *, steps: int = 50, shift: float = 5.0,
                 sigma_max: float = 0.999, guidance=5.0, negative_context=None, y=None, clip_fea=None,
                 experts=None, boundary: float | None = None, net_dtype: torch.dtype = torch.float32,
                 int_timesteps: bool = False, batch_cfg: bool = True, progress: bool = False) -> torch.Tensor:
    """UniPC-bh2 (order 2, x̂0 = x − σ·v, corrector, lower-order final) teacher sampler.

    Same arguments and conventions as :func:`~turbocompile.sampling.teacher.euler_sample`: x
    starts at ``noise``, one CFG velocity per step, float64 state, float32 result. Matches
    diffusers' ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
    solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True)`` stepping
    with the same sigmas (checked in tests).
    """
    check_noise(noise)
    nets = resolve_experts(denoiser, experts)
    plan = teacher_plan(steps, shift, sigma_max, guidance, n_experts=len(nets), boundary=boundary,
                        int_timesteps=int_timesteps)
    sig = plan.sigmas
    if not sig[0] < 1.0:
        raise SamplingError(f"UniPC needs sigma_max < 1 (log-SNR is infinite at 1), got {sigma_max}")
    orders = unipc_orders(steps)
    batch, device = noise.shape[0], noise.device
    ms: list[torch.Tensor] = []          # data predictions of the steps so far
    x_last = None                        # x_{i−1}, the start of the previous predictor step
    with torch.no_grad():
        x = noise.double()
        for i in step_iter(steps, progress, "unipc"):
            timestep = net_timestep(plan.timesteps[i], batch, device)
            v = cfg_velocity(nets[plan.experts[i]], x.to(net_dtype), timestep, context, negative_context,
                             plan.guidance[i], y=y, clip_fea=clip_fea, batch_cfg=batch_cfg)
            m = x - sig[i] * v
            if i > 0:
                second = orders[i - 1] == 2
                x = unic_step(x_last, ms[-1], m, sig[i - 1], sig[i],
                              m_prev=ms[-2] if second else None, sigma_prev=sig[i - 2] if second else None)
            x_last = x
            second = orders[i] == 2
            x_next = unip_step(x, m, sig[i], sig[i + 1],
                               m_prev=ms[-1] if second else None, sigma_prev=sig[i - 1] if second else None)
            ms = (ms + [m])[-_ORDER:]
            x = x_next
    return x.float()
