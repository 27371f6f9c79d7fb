"""UniPC against diffusers' UniPCMultistepScheduler stepping the same velocity field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from turbocompile.sampling import flow_schedule, unipc_orders, unipc_sample
from turbocompile.sampling.unipc import unic_step, unip_step

diffusers = pytest.importorskip("diffusers")


def velocity(x, timestep, context, **kw):
    """Nonlinear in x and t, so every multistep/corrector term matters."""
    t = (timestep.double() / 1000.0).view(-1, 1, 1, 1, 1)
    c = context.view(-1, 1, 1, 1, 1)
    xd = x.double()
    return (torch.tanh(1.3 * xd) * (1 + t) - 0.7 * xd * t * t + 0.2 * c).float()


def diffusers_run(noise, context, steps, shift, *, float64_sigmas, **sched_kw):
    kw = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
              solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
              final_sigmas_type="zero")
    kw.update(sched_kw)
    sch = diffusers.UniPCMultistepScheduler(**kw)
    sch.set_timesteps(sigmas=np.linspace(0.999, 0.0, steps + 1)[:-1])   # diffusers applies the shift
    sch.set_begin_index(0)
    sig = flow_schedule(steps, shift)
    if float64_sigmas:
        sch.sigmas = torch.tensor(sig, dtype=torch.float64)
    x = noise.double()
    for i in range(steps):
        # our sampler hands the net x in float32 and the float timestep 1000·σ
        ts = torch.full((noise.shape[0],), 1000.0 * sig[i], dtype=torch.float32)
        v = velocity(x.float(), ts, context).double()
        x = sch.step(v, sch.timesteps[i], x).prev_sample
    return x.float()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(9)
    return torch.randn(2, 3, 1, 4, 5, generator=g), torch.tensor([0.5, -1.0])


@pytest.mark.parametrize("steps, shift", [(1, 5.0), (2, 5.0), (3, 3.0), (7, 12.0), (30, 5.0)])
def test_matches_diffusers(inputs, steps, shift):
    noise, ctx = inputs
    ours = unipc_sample(velocity, noise, ctx, steps=steps, shift=shift, guidance=1.0)
    # diffusers as configured (float32 sigmas): equal up to its float32 coefficient arithmetic
    assert rel(ours, diffusers_run(noise, ctx, steps, shift, float64_sigmas=False)) < 1e-5
    # with the identical float64 sigmas the two agree to the float32 rounding of the output
    assert rel(ours, diffusers_run(noise, ctx, steps, shift, float64_sigmas=True)) < 1e-7


def test_comparison_is_sensitive_to_the_corrector_and_order(inputs):
    """The diffusers oracle does distinguish variants: without the corrector, or at order 1, it differs."""
    noise, ctx = inputs
    ours = unipc_sample(velocity, noise, ctx, steps=7, shift=5.0, guidance=1.0)
    no_corr = diffusers_run(noise, ctx, 7, 5.0, float64_sigmas=True, disable_corrector=list(range(7)))
    order1 = diffusers_run(noise, ctx, 7, 5.0, float64_sigmas=True, solver_order=1)
    assert rel(ours, no_corr) > 1e-3 and rel(ours, order1) > 1e-3


def test_orders():
    assert unipc_orders(1) == [1]
    assert unipc_orders(2) == [1, 1]
    assert unipc_orders(5) == [1, 2, 2, 2, 1]


def test_step_formulas_on_exact_data():
    """If x̂0 is constant along the path (data = one point), every step is exact: x_t = (1−σ_t)·x0 + σ_t·ε."""
    x0, eps = torch.tensor([0.7, -1.2], dtype=torch.float64), torch.tensor([0.3, 2.0], dtype=torch.float64)
    at = lambda s: (1 - s) * x0 + s * eps
    sp, ss, st = 0.9, 0.7, 0.4
    torch.testing.assert_close(unip_step(at(ss), x0, ss, st), at(st), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(unip_step(at(ss), x0, ss, st, m_prev=x0, sigma_prev=sp), at(st), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(unic_step(at(ss), x0, x0, ss, st), at(st), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(unic_step(at(ss), x0, x0, ss, st, m_prev=x0, sigma_prev=sp), at(st),
                               rtol=1e-13, atol=1e-13)
    assert torch.equal(unip_step(at(ss), x0, ss, 0.0), x0)   # the final step lands on x̂0
    assert math.isfinite(float(unip_step(at(ss), x0, ss, 1e-12).sum()))
