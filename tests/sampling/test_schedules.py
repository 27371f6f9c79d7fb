"""Schedule arithmetic: rCM times, bf16 net timesteps, expert plans, teacher flow sigmas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from turbocompile.errors import TurboCompileError
from turbocompile.sampling import (SamplingError, bf16_round, flow_expert_plan, flow_schedule, flow_timesteps,
                                   rcm_expert_plan, rcm_schedule, rcm_timesteps_bf16, rcm_update_coefficients)


def test_rcm_schedule_t2v_default():
    ts = rcm_schedule(4)
    assert len(ts) == 5 and ts[-1] == 0.0 and all(isinstance(t, float) for t in ts)
    assert ts[:-1] == pytest.approx([0.987654, 0.933781, 0.852895, 0.608979], abs=1e-6)
    assert ts[0] == pytest.approx(80 / 81, abs=1e-15)           # t = σ/(1+σ) for θ = atan σ
    assert rcm_timesteps_bf16(ts[:-1]) == [988.0, 932.0, 852.0, 608.0]
    assert rcm_timesteps_bf16(ts)[-1] == 0.0


@pytest.mark.parametrize("sigma_max, t0", [(200, 0.995025), (1600, 0.999375)])
def test_rcm_schedule_sigma_max(sigma_max, t0):
    ts = rcm_schedule(4, sigma_max)
    assert ts[0] == pytest.approx(t0, abs=1e-6)
    assert ts[1:] == rcm_schedule(4, 80)[1:]                     # only θ0 depends on σ_max


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_rcm_schedule_prefix(steps):
    ts = rcm_schedule(steps)
    assert len(ts) == steps + 1 and ts[-1] == 0.0
    assert ts[:-1] == rcm_schedule(4)[:steps]
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_rcm_schedule_custom_mid_times():
    ts = rcm_schedule(3, 80, mid_times=(1.2, 0.5))
    th = 1.2
    assert ts[1] == pytest.approx(math.sin(th) / (math.sin(th) + math.cos(th)), abs=1e-15)


@pytest.mark.parametrize("bad", [0, 5, -1, 2.0, True, "4"])
def test_rcm_schedule_bad_steps(bad):
    with pytest.raises(SamplingError, match="1, 2, 3, 4|must be an int") as e:
        rcm_schedule(bad)
    assert isinstance(e.value, ValueError) and isinstance(e.value, TurboCompileError)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [0.0, -3.0, float("nan"), float("inf")])
def test_rcm_schedule_bad_sigma(bad):
    with pytest.raises(SamplingError, match="sigma_max"):
        rcm_schedule(4, bad)


def test_rcm_schedule_bad_mid_times():
    with pytest.raises(SamplingError, match="mid_times"):
        rcm_schedule(4, 80, mid_times=(1.5,))
    with pytest.raises(SamplingError, match="decrease"):
        rcm_schedule(3, 80, mid_times=(1.0, 1.4))               # not decreasing
    with pytest.raises(SamplingError, match="decrease"):
        rcm_schedule(2, 0.5, mid_times=(1.5,))                  # atan(0.5) < 1.5


def test_bf16_round_ties_and_exact():
    assert bf16_round(608.0) == 608.0
    assert bf16_round(610.0) == 608.0                            # tie between 608 and 612 → even mantissa
    assert bf16_round(611.0) == 612.0
    assert bf16_round(0.0) == 0.0


def test_rcm_expert_plan():
    assert rcm_expert_plan(rcm_schedule(4, 200)) == [0, 0, 1, 1]          # H, H, L, L
    assert rcm_expert_plan(rcm_schedule(3, 200)) == [0, 0, 1]
    assert rcm_expert_plan(rcm_schedule(2, 200)) == [0, 0]                # N ≤ 2: high only
    assert rcm_expert_plan(rcm_schedule(1, 200)) == [0]
    # the switch is sticky: once low, stays low even if a later t were above the boundary
    assert rcm_expert_plan([0.95, 0.5, 0.92, 0.0], boundary=0.9) == [0, 1, 1]


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_rcm_update_coefficients_match_formula(mode):
    ts = rcm_schedule(4)
    x, v, e = 0.3, -1.7, 0.9
    for i, (a, b, c) in enumerate(rcm_update_coefficients(ts, mode)):
        t, tn = ts[i], ts[i + 1]
        ref = (1 - tn) * (x - t * v) + tn * e if mode == "sde" else x - (t - tn) * v
        assert a * x + b * v + c * e == pytest.approx(ref, rel=1e-14)
    with pytest.raises(SamplingError, match="sde"):
        rcm_update_coefficients(ts, "euler")


def test_flow_schedule_formula():
    sig = flow_schedule(50, 5.0)
    assert len(sig) == 51 and sig[-1] == 0.0
    raw = np.linspace(0.999, 0, 51)[:-1]
    np.testing.assert_allclose(sig[:-1], 5 * raw / (1 + 4 * raw), rtol=1e-13)
    assert all(a > b for a, b in zip(sig, sig[1:]))
    # shift 1 is the plain linspace
    np.testing.assert_allclose(flow_schedule(10, 1.0)[:-1], np.linspace(0.999, 0, 11)[:-1], rtol=1e-13)
    assert flow_timesteps(sig)[0] == pytest.approx(1000 * sig[0])
    assert len(flow_timesteps(sig)) == 50
    assert flow_timesteps([0.9995, 0.4567, 0.0], integer=True) == [999.0, 456.0]


def test_flow_schedule_matches_diffusers():
    UniPCMultistepScheduler = pytest.importorskip("diffusers").UniPCMultistepScheduler

    for steps, shift in [(50, 5.0), (40, 12.0), (7, 3.0)]:
        sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
        sch.set_timesteps(sigmas=np.linspace(0.999, 0, steps + 1)[:-1])
        np.testing.assert_allclose(flow_schedule(steps, shift), sch.sigmas.double().numpy(), rtol=1e-6)
        assert flow_timesteps(flow_schedule(steps, shift), integer=True) == sch.timesteps.double().tolist()


def test_flow_schedule_errors():
    with pytest.raises(SamplingError, match="steps"):
        flow_schedule(0)
    with pytest.raises(SamplingError, match="shift"):
        flow_schedule(10, shift=-1.0)
    with pytest.raises(SamplingError, match="sigma_max"):
        flow_schedule(10, sigma_max=1.5)


def test_flow_expert_plan():
    ts = flow_timesteps(flow_schedule(40, 5.0))
    plan = flow_expert_plan(ts, 0.9)
    k = plan.index(1)
    assert plan == [0] * k + [1] * (40 - k)                      # monotone: high, then low
    assert ts[k - 1] >= 900 > ts[k]
