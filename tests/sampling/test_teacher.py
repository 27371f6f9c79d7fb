"""Teacher samplers: Euler loop, classifier-free guidance, Wan2.2 experts, argument checks."""

from __future__ import annotations

import pytest
import torch

from turbocompile.sampling import (SamplingError, cfg_velocity, euler_sample, flow_schedule, teacher_plan,
                                   unipc_sample)

SHAPE = (2, 3, 2, 4, 4)


class Net:
    """Nonlinear stand-in whose output depends on x, t and the context (per sample)."""

    def __init__(self, name="net", log=None):
        self.name, self.batches = name, []
        self.log = log if log is not None else []

    def __call__(self, x, timestep, context, **kw):
        self.batches.append(x.shape[0])
        self.log.append(self.name)
        t = (timestep.double() / 1000.0).view(-1, 1, 1, 1, 1)
        c = context.double().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return (torch.sin(x.double() * (1 + c)) * t - x.double() * 0.3 + c).float()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(SHAPE, generator=g), torch.randn(SHAPE[0], 7, 4, generator=g),
            torch.randn(SHAPE[0], 7, 4, generator=g))


def test_euler_matches_hand_loop(inputs):
    noise, ctx, neg = inputs
    steps, shift, g = 12, 5.0, 4.5
    out = euler_sample(Net(), noise, ctx, steps=steps, shift=shift, guidance=g, negative_context=neg)
    sig = flow_schedule(steps, shift)
    net, x = Net(), noise.double()
    for i in range(steps):
        ts = torch.full((SHAPE[0],), 1000 * sig[i], dtype=torch.float32)
        vc = net(x.float(), ts, ctx).double()
        vu = net(x.float(), ts, neg).double()
        x = x + (sig[i + 1] - sig[i]) * (vu + g * (vc - vu))
    torch.testing.assert_close(out, x.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", [euler_sample, unipc_sample])
def test_cfg_guidance_one_equals_conditional(inputs, sampler):
    noise, ctx, neg = inputs
    cond = sampler(Net(), noise, ctx, steps=8, guidance=1.0)
    with_neg = sampler(Net(), noise, ctx, steps=8, guidance=1.0, negative_context=neg)
    torch.testing.assert_close(with_neg, cond, rtol=1e-6, atol=1e-6)
    guided = sampler(Net(), noise, ctx, steps=8, guidance=3.0, negative_context=neg)
    assert (guided - cond).abs().max() > 1e-2          # guidance > 1 does change the result


@pytest.mark.parametrize("sampler", [euler_sample, unipc_sample])
def test_cfg_batched_equals_two_forwards(inputs, sampler):
    noise, ctx, neg = inputs
    nb, n2 = Net(), Net()
    a = sampler(nb, noise, ctx, steps=6, guidance=5.0, negative_context=neg)
    b = sampler(n2, noise, ctx, steps=6, guidance=5.0, negative_context=neg, batch_cfg=False)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert nb.batches == [2 * SHAPE[0]] * 6            # one forward of 2B per step
    assert n2.batches == [SHAPE[0]] * 12               # two forwards of B per step


def test_cfg_unbatchable_context_lengths(inputs):
    noise, ctx, _ = inputs
    neg = torch.randn(SHAPE[0], 3, 4)                   # different length: cannot be concatenated
    net = Net()
    x, ts = noise.double(), torch.full((SHAPE[0],), 500.0)
    v = cfg_velocity(net, x.float(), ts, ctx, neg, 2.0)
    vc, vu = Net()(x.float(), ts, ctx).double(), Net()(x.float(), ts, neg).double()
    torch.testing.assert_close(v, vu + 2.0 * (vc - vu))
    assert net.batches == [SHAPE[0], SHAPE[0]]


def test_cfg_batch_repeats_conditioning():
    seen = {}

    def net(x, t, c, *, y=None, clip_fea=None):
        seen.update(x=x.shape, t=t.shape, c=c.shape, y=y.shape, clip=clip_fea.shape)
        return x.float() + y.float()

    x = torch.randn(2, 3, 1, 2, 2)
    cfg_velocity(net, x, torch.ones(2), torch.zeros(2, 4, 8), torch.ones(2, 4, 8), 5.0,
                 y=torch.randn(2, 3, 1, 2, 2), clip_fea=torch.randn(2, 5, 6))
    assert seen == dict(x=(4, 3, 1, 2, 2), t=(4,), c=(4, 4, 8), y=(4, 3, 1, 2, 2), clip=(4, 5, 6))


def test_guidance_without_negative_context_raises(inputs):
    noise, ctx, _ = inputs
    with pytest.raises(SamplingError, match="negative_context"):
        euler_sample(Net(), noise, ctx, steps=4)        # default guidance 5.0


def test_wan22_teacher_experts(inputs):
    noise, ctx, neg = inputs
    log = []
    plan = teacher_plan(40, 12.0, 0.999, (3.0, 4.0), n_experts=2, boundary=0.875)
    k = plan.experts.index(1)
    assert plan.experts == [0] * k + [1] * (40 - k) and 0 < k < 40
    assert plan.guidance == [4.0] * k + [3.0] * (40 - k)          # (low, high) pair, WAN22 order
    euler_sample(None, noise, ctx, steps=40, shift=12.0, guidance=(3.0, 4.0), negative_context=neg,
                 experts=(Net("H", log), Net("L", log)), boundary=0.875)
    assert log == ["H"] * k + ["L"] * (40 - k)
    with pytest.raises(SamplingError, match="boundary"):
        euler_sample(None, noise, ctx, steps=4, guidance=1.0, experts=(Net(), Net()))
    with pytest.raises(SamplingError, match="guidance pair"):
        euler_sample(Net(), noise, ctx, steps=4, guidance=(1.0, 2.0), negative_context=neg)


def test_int_timesteps(inputs):
    noise, ctx, _ = inputs
    seen = []

    def net(x, t, c):
        seen.append(t[0].item())
        return torch.zeros_like(x, dtype=torch.float32)

    euler_sample(net, noise, ctx, steps=5, guidance=1.0, int_timesteps=True)
    assert all(t == int(t) for t in seen) and seen[0] == 999.0
