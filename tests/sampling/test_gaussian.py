"""Samplers on Gaussian data, whose velocity is known in closed form (see ``_gaussian.py``).

Facts used (all samplers are affine in the noise when the velocity is affine in x):
* the PF-ODE from t = 1 maps N(0, 1) exactly onto N(μ, s²); Euler converges at first order;
* with the exact *MMSE* velocity, any step that lands on t = 0 returns E[x0 | x_t], whose std
  is s²(1−t)/√V(t)·(std of x_t)/√V(t) < s: the 4-step rCM schedule (last step from t = 0.609)
  collapses the spread. That is the known bias of few-step sampling with a mean predictor;
  rCM nets are consistency models, whose x̂0 is the ODE flow map f(x, t) instead;
* with the consistency velocity, the rCM SDE output is f(x_{t_{N−1}}), which is exactly
  N(μ, s²) when x_{t_{N−1}} has the right marginal; it does except for the start x = t0·ε
  (var t0² instead of V(t0)), a relative error ≤ (1−t0)·s/√V(t0) ≈ 1.3 % of μ for σ_max = 80.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.sampling._gaussian import Gaussian, channel_stats
from turbocompile.sampling import euler_sample, rcm_sample, rcm_schedule, rcm_timesteps_bf16, unipc_sample

GAUSS = Gaussian([0.5, -1.0, 0.0, 2.0], [0.5, 1.0, 1.5, 0.3])
SHAPE = (8, 4, 1, 32, 32)                # 8192 samples per channel
N_PER_CHANNEL = 8 * 32 * 32


def standardized_noise(seed: int) -> torch.Tensor:
    """Noise with per-channel sample mean 0 and std 1: for affine (deterministic) samplers the output
    mean/std are then exactly the sampler's analytic mean and |slope|, free of sampling error."""
    n = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    m, s = channel_stats(n)
    return ((n - m.view(1, -1, 1, 1, 1)) / s.view(1, -1, 1, 1, 1)).float()


def rcm_affine(kind: str, mode: str, steps: int, sigma_max: float):
    """Per channel, the rCM output as A + Σ_k B_k·ε_k (ε_0 the initial noise, ε_k step noises),
    derived from the update rules with v = c·x + d evaluated at the bf16 net time."""
    ts = rcm_schedule(steps, sigma_max)
    t_net = [t / 1000.0 for t in rcm_timesteps_bf16(ts[:-1])]
    coeffs = GAUSS.mmse_coeffs if kind == "mmse" else GAUSS.consistency_coeffs
    zero = torch.zeros(4, dtype=torch.float64)
    A, B = zero.clone(), [torch.full((4,), ts[0], dtype=torch.float64)]
    for i in range(steps):
        c, d = coeffs(t_net[i])
        t, tn = ts[i], ts[i + 1]
        if mode == "sde":       # x' = (1−t')·((1 − t c)·x − t d) + t'·ε
            A = (1 - tn) * ((1 - t * c) * A - t * d)
            B = [(1 - tn) * (1 - t * c) * b for b in B] + [torch.full((4,), tn, dtype=torch.float64)]
        else:                   # x' = (1 − (t−t') c)·x − (t−t') d
            A = (1 - (t - tn) * c) * A - (t - tn) * d
            B = [(1 - (t - tn) * c) * b for b in B]
    return A, B


@pytest.mark.parametrize("kind", ["mmse", "consistency"])
@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize("steps, sigma_max", [(4, 80.0), (2, 200.0)])
def test_rcm_equals_analytic_affine_map(kind, mode, steps, sigma_max):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 4, 1, 3, 5, generator=g)
    eps = [torch.randn(noise.shape, generator=g) for _ in range(steps)]
    out = rcm_sample(GAUSS.denoiser(kind), noise, None, steps=steps, sigma_max=sigma_max, mode=mode,
                     step_noise=eps if mode == "sde" else None, net_dtype=torch.float64)
    A, B = rcm_affine(kind, mode, steps, sigma_max)
    view = lambda a: a.view(1, -1, 1, 1, 1)
    ref = view(A) + view(B[0]) * noise.double()
    for b, e in zip(B[1:], eps):
        ref = ref + view(b) * e.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma_max", [80.0, 200.0])
def test_rcm_sde_with_consistency_denoiser_hits_target(sigma_max):
    out = rcm_sample(GAUSS.denoiser("consistency"), standardized_noise(0), None, sigma_max=sigma_max,
                     generator=torch.Generator().manual_seed(1), net_dtype=torch.float64)
    mean, std = channel_stats(out)
    t0 = rcm_schedule(4, sigma_max)[0]
    start_bias = (1 - t0) * GAUSS.s / torch.sqrt(GAUSS.var(t0))      # relative, from x = t0·ε
    # The last step's x̂0 depends on fresh noise, so allow 4 standard errors of sampling.
    se = 4 / math.sqrt(N_PER_CHANNEL)
    assert torch.all((mean - GAUSS.mu).abs() <= start_bias * GAUSS.mu.abs() + se * GAUSS.s), mean
    assert torch.all((std / GAUSS.s - 1).abs() <= start_bias + se), std


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_rcm_with_mmse_denoiser_has_right_mean_and_collapsed_std(mode):
    out = rcm_sample(GAUSS.denoiser("mmse"), standardized_noise(2), None, mode=mode,
                     generator=torch.Generator().manual_seed(3), net_dtype=torch.float64)
    mean, std = channel_stats(out)
    A, B = rcm_affine("mmse", mode, 4, 80.0)
    ana_std = torch.sqrt(sum(b * b for b in B)) if mode == "sde" else B[0].abs()
    se = 4 / math.sqrt(N_PER_CHANNEL)
    # the mean follows (1−t)μ from the start (up to the t0·ε start): within 1.5 % of |μ| + sampling
    assert torch.all((mean - GAUSS.mu).abs() <= 0.015 * GAUSS.mu.abs() + se * GAUSS.s), mean
    assert torch.all((std / ana_std - 1).abs() <= se), (std, ana_std)
    assert torch.all(ana_std < 0.6 * GAUSS.s)          # the known collapse (see module docstring)


def test_euler_converges_to_target_at_first_order():
    noise = standardized_noise(4)
    errs = {}
    for steps in (100, 400):
        out = euler_sample(GAUSS.denoiser(), noise, None, steps=steps, shift=5.0, sigma_max=1.0, guidance=1.0)
        mean, std = channel_stats(out)
        # started exactly on the t = 1 marginal, the mean path (1−σ)μ is linear: Euler is exact on it
        torch.testing.assert_close(mean, GAUSS.mu, rtol=0, atol=1e-6)
        errs[steps] = (std / GAUSS.s - 1).abs().max().item()
    assert errs[400] < 0.02
    assert 3.0 < errs[100] / errs[400] < 5.0             # O(1/N): 4× the steps, ~4× less error


def test_euler_shift_one_many_steps():
    out = euler_sample(GAUSS.denoiser(), standardized_noise(5), None, steps=400, shift=1.0, sigma_max=1.0,
                       guidance=1.0)
    mean, std = channel_stats(out)
    torch.testing.assert_close(mean, GAUSS.mu, rtol=0, atol=1e-6)
    torch.testing.assert_close(std, GAUSS.s, rtol=0.006, atol=0)


def test_unipc_converges_to_target_at_high_order():
    noise = standardized_noise(6)
    errs = {}
    for steps in (50, 100):
        out = unipc_sample(GAUSS.denoiser(), noise, None, steps=steps, shift=5.0, guidance=1.0)
        mean, std = channel_stats(out)
        # σ_max = 0.999 (x starts as pure noise), so the mean is off by ~(1 − 0.999)·|μ|
        torch.testing.assert_close(mean, GAUSS.mu, rtol=0, atol=1e-3)
        errs[steps] = (std / GAUSS.s - 1).abs().max().item()
    assert errs[100] < 0.01
    assert errs[50] / errs[100] > 4.0                   # at least second order
