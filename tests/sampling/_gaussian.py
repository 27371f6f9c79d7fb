"""Closed-form velocities for Gaussian data, used as exact stand-in denoisers.

Data x0 ~ N(μ, s²) per channel, noise ε ~ N(0, 1), RF path x_t = (1−t)·x0 + t·ε. Then
x_t ~ N((1−t)μ, V(t)) with V(t) = (1−t)²s² + t², and, x_t being jointly Gaussian with x0 and ε,

    E[x0 | x_t] = μ + (1−t)s²/V · (x_t − (1−t)μ),     E[ε | x_t] = t/V · (x_t − (1−t)μ),

so the flow-matching (MMSE) velocity is v(x, t) = E[ε − x0 | x_t] = k(t)·(x − (1−t)μ) − μ with
k(t) = (t − (1−t)s²)/V(t). Both velocities below are affine in x: v = c(t)·x + d(t).

The probability-flow ODE keeps each sample at a fixed standard score z = (x_t − (1−t)μ)/√V(t),
so its flow map to t = 0 is f(x, t) = μ + s·z. A perfect consistency model predicts f; as a
velocity (x̂0 = x − t·v) that is v_cm(x, t) = (x − f(x, t))/t.
"""

from __future__ import annotations

import math

import torch


class Gaussian:
    def __init__(self, mu, s):
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.s = torch.as_tensor(s, dtype=torch.float64)

    def var(self, t: float):
        return (1 - t) ** 2 * self.s ** 2 + t ** 2

    # per-channel affine coefficients (c, d) of v = c·x + d at RF time t
    def mmse_coeffs(self, t: float):
        k = (t - (1 - t) * self.s ** 2) / self.var(t)
        return k, -k * (1 - t) * self.mu - self.mu

    def consistency_coeffs(self, t: float):
        g = self.s / torch.sqrt(self.var(t))          # f = μ + g·(x − (1−t)μ)
        # v = (x − f)/t = ((1 − g)·x − μ + g(1−t)μ)/t
        return (1 - g) / t, (-self.mu + g * (1 - t) * self.mu) / t

    def denoiser(self, kind: str = "mmse", calls: list | None = None):
        """A denoiser with the Wan call contract; t is read from the timestep it is given."""
        coeffs = self.mmse_coeffs if kind == "mmse" else self.consistency_coeffs

        def net(x, timestep, context, **kw):
            t = timestep.double() / 1000.0
            assert torch.all(t == t[0])
            c, d = coeffs(float(t[0]))
            shape = (1, -1) + (1,) * (x.ndim - 2)
            if calls is not None:
                calls.append(float(t[0]))
            return (c.view(shape) * x.double() + d.view(shape)).float()

        return net


def channel_stats(x: torch.Tensor):
    """Per-channel mean and std over all other dims of [B, C, ...]."""
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(dim=1), flat.std(dim=1)


def std_err(n: int) -> float:
    return 1.0 / math.sqrt(n)
