"""rCM reference loop: literal §5.2 semantics, determinism, expert switch, argument checks."""

from __future__ import annotations

import pytest
import torch

from turbocompile.sampling import SamplingError, rcm_sample, rcm_schedule

SHAPE = (2, 4, 3, 4, 6)


class Recorder:
    """Small nonlinear stand-in denoiser recording what it is called with."""

    def __init__(self, name: str = "net", log: list | None = None):
        self.name, self.calls = name, []
        self.log = log if log is not None else []

    def __call__(self, x, timestep, context, **kw):
        self.calls.append(dict(x_dtype=x.dtype, t=timestep.clone(), kw=sorted(kw)))
        self.log.append(self.name)
        xf = x.float()
        t = (timestep.float() / 1000.0).view(-1, 1, 1, 1, 1)
        c = context.float().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        out = torch.tanh(xf) * (1.0 + t) - 0.5 * xf * t + c
        if "y" in kw:
            out = out + kw["y"].float()
        return out                                   # float32, like the Wan model


def hand_loop(net, noise, context, ts, mode, gen, net_dtype=torch.bfloat16):
    """§5.2 written out independently of the library."""
    x = ts[0] * noise.double()
    for i in range(len(ts) - 1):
        tt = torch.tensor([1000.0 * ts[i]] * noise.shape[0], dtype=torch.float64).to(torch.bfloat16).float()
        v = net(x.to(net_dtype), tt, context).double()
        if mode == "sde":
            eps = torch.randn(noise.shape, generator=gen, dtype=torch.float32).double()
            x = (1 - ts[i + 1]) * (x - ts[i] * v) + ts[i + 1] * eps
        else:
            x = x - (ts[i] - ts[i + 1]) * v
    return x.float()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(SHAPE, generator=g)
    context = torch.randn(SHAPE[0], 5, 8, generator=g)
    return noise, context


@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize("steps, sigma_max", [(4, 80.0), (3, 200.0), (1, 1600.0)])
def test_matches_hand_written_loop(inputs, mode, steps, sigma_max):
    noise, context = inputs
    net = Recorder()
    out = rcm_sample(net, noise, context, steps=steps, sigma_max=sigma_max, mode=mode,
                     generator=torch.Generator().manual_seed(7))
    ref = hand_loop(Recorder(), noise, context, rcm_schedule(steps, sigma_max), mode,
                    torch.Generator().manual_seed(7))
    assert out.dtype == torch.float32 and out.shape == noise.shape
    assert torch.equal(out, ref)
    assert len(net.calls) == steps
    assert all(c["x_dtype"] == torch.bfloat16 and c["kw"] == [] for c in net.calls)


def test_net_sees_bf16_timesteps(inputs):
    noise, context = inputs
    net = Recorder()
    rcm_sample(net, noise, context, generator=torch.Generator().manual_seed(0))
    for call, want in zip(net.calls, [988.0, 932.0, 852.0, 608.0]):
        assert call["t"].dtype == torch.float32 and call["t"].shape == (SHAPE[0],)
        assert call["t"].tolist() == [want] * SHAPE[0]


def test_same_seed_same_result(inputs):
    noise, context = inputs
    run = lambda seed: rcm_sample(Recorder(), noise, context, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))            # the SDE really draws fresh noise
    ode = lambda seed: rcm_sample(Recorder(), noise, context, mode="ode", generator=torch.Generator().manual_seed(seed))
    assert torch.equal(ode(5), ode(6))                   # the ODE draws none


def test_sde_draws_noise_at_every_step_including_last(inputs):
    """The generator advances N times (TD draws the last, zero-weighted noise too)."""
    noise, context = inputs
    g = torch.Generator().manual_seed(3)
    rcm_sample(Recorder(), noise, context, steps=3, generator=g)
    g_ref = torch.Generator().manual_seed(3)
    for _ in range(3):
        torch.randn(noise.shape, generator=g_ref)
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=g_ref))


def test_step_noise_equals_generator_draws(inputs):
    noise, context = inputs
    g = torch.Generator().manual_seed(11)
    eps = [torch.randn(noise.shape, generator=g) for _ in range(4)]
    a = rcm_sample(Recorder(), noise, context, step_noise=eps)
    b = rcm_sample(Recorder(), noise, context, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    # the last noise is weighted by t_N = 0: changing it changes nothing
    eps2 = eps[:3] + [torch.full_like(eps[3], 1e3)]
    assert torch.equal(rcm_sample(Recorder(), noise, context, step_noise=eps2), a)


def test_wan22_expert_switch(inputs):
    noise, context = inputs
    for steps, want in [(4, "HHLL"), (3, "HHL"), (2, "HH"), (1, "H")]:
        log = []
        hi, lo = Recorder("H", log), Recorder("L", log)
        out = rcm_sample(None, noise, context, steps=steps, sigma_max=200, experts=(hi, lo),
                         generator=torch.Generator().manual_seed(0))
        assert "".join(log) == want
        if steps == 4:   # the experts really are used for the velocity: same nets → same as one net
            same = rcm_sample(Recorder(), noise, context, steps=4, sigma_max=200,
                              generator=torch.Generator().manual_seed(0))
            assert torch.equal(out, same)
    log = []
    rcm_sample(None, noise, context, sigma_max=200, experts=(Recorder("H", log), Recorder("L", log)),
               boundary=0.95, generator=torch.Generator().manual_seed(0))
    assert "".join(log) == "HLLL"


def test_conditioning_forwarded_only_when_given(inputs):
    noise, context = inputs
    y = torch.randn(SHAPE)
    net = Recorder()
    rcm_sample(net, noise, context, mode="ode", y=y)
    assert all(c["kw"] == ["y"] for c in net.calls)
    assert not torch.equal(rcm_sample(Recorder(), noise, context, mode="ode", y=y),
                           rcm_sample(Recorder(), noise, context, mode="ode"))


def test_progress_bar(inputs, capsys):
    noise, context = inputs
    a = rcm_sample(Recorder(), noise, context, mode="ode", progress=True)
    assert "rCM" in capsys.readouterr().err
    assert torch.equal(a, rcm_sample(Recorder(), noise, context, mode="ode"))


def test_argument_errors(inputs):
    noise, context = inputs
    net = Recorder()
    with pytest.raises(SamplingError, match="1, 2, 3, 4"):
        rcm_sample(net, noise, context, steps=8)
    with pytest.raises(SamplingError, match="'sde', 'ode'"):
        rcm_sample(net, noise, context, mode="heun")
    with pytest.raises(SamplingError, match="step_noise"):
        rcm_sample(net, noise, context, step_noise=[noise] * 3)
    with pytest.raises(SamplingError, match="step_noise"):
        rcm_sample(net, noise, context, step_noise=[noise[:1]] * 4)
    with pytest.raises(SamplingError, match="not both"):
        rcm_sample(net, noise, context, experts=(net, net))
    with pytest.raises(SamplingError, match="pair"):
        rcm_sample(None, noise, context, experts=(net,))
    with pytest.raises(SamplingError, match="noise"):
        rcm_sample(net, noise.long(), context)
    assert net.calls == []


def test_runs_the_wan_model():
    """Smoke test on the canonical model (bf16 weights): call contract, shapes, determinism."""
    from turbocompile.model.config import get_preset
    from turbocompile.model.wan import WanModel, init_random_

    model = init_random_(WanModel(get_preset("wan-tiny"))).to(torch.bfloat16).eval()
    noise = torch.randn(1, 16, 1, 4, 4)
    ctx = torch.randn(1, 6, 64)
    out = rcm_sample(model, noise, ctx, steps=2, generator=torch.Generator().manual_seed(0))
    again = rcm_sample(model, noise, ctx, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.equal(out, again)
    assert not torch.equal(out, noise)
