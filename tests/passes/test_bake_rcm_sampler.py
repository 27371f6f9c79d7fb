"""bake_rcm_sampler: the unrolled, constant-folded, CSE'd sampler graph equals the Python rCM loop.

float32 wan-tiny on CPU, where every op is deterministic: the baked graph runs the same ops on
the same values as ``rcm_sample`` over the unbaked denoiser (folding evaluates the graph's
own ops once; CSE merges only identical pure nodes; the float64 update is emitted in
rcm_sample's operation order), so results are compared bit for bit (``torch.equal``).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import turbocompile
from turbocompile.api import CompiledWan
from turbocompile.capture import capture, input_specs
from turbocompile.errors import InputError, PassError, RecipeError
from turbocompile.model.config import WanConfig
from turbocompile.model.wan import WanModel, init_random_
from turbocompile.passbase import PassContext
from turbocompile.passes.bake_rcm_sampler import BakeRCMSampler, count_cross_kv, count_cross_kv_gemms
from turbocompile.pipeline import clone_graph_module, run_pipeline
from turbocompile.recipe import load_recipe
from turbocompile.sampling import rcm_sample, rcm_schedule
from turbocompile.sampling.compiled import CompiledSampler

F32 = torch.float32
SMALL = {"frames": 5, "size": "64x64"}          # latent [16, 2, 8, 8]: 32 tokens, fast on a CPU
TORCH_TURBO = {"version": 1, "name": "turbo-torch", "model": SMALL, "passes": [
    {"name": "w8a8_linear", "options": {"format": "int8", "weight_granularity": "per_channel",
                                        "act_granularity": "per_token", "backend": "torch"}},
    {"name": "sagesla_attention", "options": {"topk": 0.5, "block_q": 16, "block_k": 16, "backend": "torch"}},
    {"name": "fuse_norms", "options": {"backend": "torch"}},
]}


def _bake(res, **options) -> tuple[fx.GraphModule, PassContext, dict]:
    """Run the pass on a structural copy of an optimized denoiser (skips re-capture and shape propagation)."""
    gm = clone_graph_module(res.graph_module)
    cfg = WanConfig.from_dict(res.manifest["model"]["config"])
    vs = res.manifest["model"]["video_shape"]
    shape = cfg.video_shape(frames=vs["frames"], size=(vs["width"], vs["height"]))
    specs = {i["name"]: (tuple(i["shape"]), getattr(torch, i["dtype"])) for i in res.manifest["signature"]["inputs"]}
    ctx = PassContext(model_config=cfg, video_shape=shape, dtype=F32, device=torch.device("cpu"),
                      input_specs=specs)
    stats = BakeRCMSampler(BakeRCMSampler.Options(**options)).run(gm, ctx).stats
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, ctx, stats


@pytest.fixture(scope="module")
def base():
    return turbocompile.optimize("wan-tiny", {"version": 1, "model": SMALL, "passes": []}, dtype="float32",
                                 device="cpu", seed=1)


@pytest.fixture(scope="module")
def inputs(base):
    shape = base.manifest["signature"]["inputs"][0]["shape"]
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(shape, generator=g)
    ctx = torch.randn(1, 24, 64, generator=g)
    eps = [torch.randn(shape, generator=g) for _ in range(4)]
    return noise, ctx, eps


def _run(gm, noise, ctx, eps, mode):
    with torch.no_grad():
        return gm(noise, ctx, *(eps if mode == "sde" else []))


@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_baked_equals_rcm_loop(base, inputs, steps, mode):
    noise, ctx, eps = inputs
    gm, pctx, stats = _bake(base, steps=steps, mode=mode)
    out = _run(gm, noise, ctx, eps[:steps], mode)
    ref = rcm_sample(base.graph_module, noise, ctx, steps=steps, mode=mode, net_dtype=F32,
                     step_noise=eps[:steps] if mode == "sde" else None)
    assert out.dtype == F32 and out.shape == noise.shape
    assert torch.equal(out, ref), (out - ref).abs().max()
    names = list(pctx.input_specs)
    assert names == ["noise", "context"] + ([f"step_noise_{i}" for i in range(steps)] if mode == "sde" else [])
    assert pctx.artifact_kind == "sampler" and pctx.dynamic_batch is False
    assert stats["cross_kv_after"] == 2 * 2 and stats["cross_kv_before"] == 2 * 2 * steps


def _hand_td_loop(net, noise, context, sigma_max, steps, mode, eps_list, net_dtype=F32):
    """TurboDiffusion's loop written from wan-architecture.md §5.2 (not calling the library)."""
    import math

    thetas = ([math.atan(sigma_max), 1.5, 1.4, 1.0])[:steps] + [0.0]
    ts = [math.sin(a) / (math.sin(a) + math.cos(a)) for a in thetas]
    x = ts[0] * noise.double()
    states = [x]
    for i in range(steps):
        tb = torch.tensor([1000.0 * ts[i]] * noise.shape[0], dtype=torch.float64).to(torch.bfloat16).float()
        v = net(x.to(net_dtype), tb, context).double()
        if mode == "sde":
            x = (1 - ts[i + 1]) * (x - ts[i] * v) + ts[i + 1] * eps_list[i].double()
        else:
            x = x - (ts[i] - ts[i + 1]) * v
        states.append(x)
    return x.float(), states


def test_step_for_step_states(base, inputs):
    """Every intermediate float64 state x_1..x_N of the baked graph equals the hand loop's."""
    noise, ctx, eps = inputs
    gm, _, _ = _bake(base, steps=4, mode="sde")
    state_nodes = {n.meta["tc_rcm_state"]: n for n in gm.graph.nodes if "tc_rcm_state" in n.meta}
    assert sorted(state_nodes) == [0, 1, 2, 3, 4]
    seen = {}

    class Spy(fx.Interpreter):
        def run_node(self, n):
            val = super().run_node(n)
            if n in state_nodes.values():
                seen[n.meta["tc_rcm_state"]] = val
            return val

    with torch.no_grad():
        out = Spy(gm).run(noise, ctx, *eps)
    ref, states = _hand_td_loop(base.graph_module, noise, ctx, 80.0, 4, "sde", eps)
    for i, s in enumerate(states):
        assert seen[i].dtype == torch.float64 and torch.equal(seen[i], s), f"state {i}"
    assert torch.equal(out, ref)


def test_folding_and_cse_hoist_step_invariant_work(base):
    gm, _, stats = _bake(base, steps=4, mode="sde")
    g = gm.graph
    # no time-embedding work left: no SiLU anywhere (Wan uses SiLU only on the timestep path),
    # no timestep buffer, no sinusoid (cos/sin of the timestep) and no float64 timestep cast
    assert not [n for n in g.nodes if n.op == "call_function" and n.target in (F.silu, torch.cos, torch.sin)]
    assert not [n for n in g.nodes if n.op == "get_attr" and n.target.endswith("timestep")]
    assert not [n for n in g.nodes if n.op == "get_attr" and "time_embedding" in n.target]
    assert stats["time_embedding_evals_left"] == 0 and stats["timestep_buffers_left"] == 0
    # per step: modulation chunks of 2 blocks (shift/scale/gate ...) + head modulation were folded
    assert stats["folded_constants"] >= 4 * 2 * 4
    folded = [n.target for n in g.nodes if n.op == "get_attr" and re.match(r"step\d\.", n.target)]
    assert {t.split(".")[0] for t in folded} == {"step0", "step1", "step2", "step3"}
    assert not hasattr(gm, "time_freqs")
    # CSE: one text embedding and one K and one V projection per layer for all 4 steps
    assert stats["cross_kv_before"] == 16 and stats["cross_kv_after"] == count_cross_kv(g) == 4
    assert stats["cross_kv_gemms_before"] == 16 and stats["cross_kv_gemms_after"] == count_cross_kv_gemms(g) == 4
    assert stats["text_embedding_before"] == 4 and stats["text_embedding_after"] == 1
    for layer in range(2):
        for proj in ("k", "v"):
            users = [n for n in g.nodes if n.op == "call_function" and n.target in (F.linear, torch._C._nn.linear)
                     and any(a.op == "get_attr" and a.target == f"blocks.{layer}.cross_attn.{proj}.weight"
                             for a in n.all_input_nodes)]
            assert len(users) == 1, (layer, proj, len(users))
    # the query side still runs per step (depends on x): 4 per layer
    q = [n for n in g.nodes if n.op == "get_attr" and n.target == "blocks.0.cross_attn.q.weight"]
    assert len(q) == 1 and len([u for u in q[0].users]) == 4
    assert stats["cse_removed"] > 0 and stats["final_nodes"] < stats["unrolled_nodes"]


def test_turbo_recipe_baked_equals_loop(inputs):
    """W8A8 int8 + SageSLA + fused norms (torch backends): the quantized ops are the same functions
    in both graphs, so the baked sampler still matches the loop (bound: rel 1e-6)."""
    noise, ctx, eps = inputs
    den = turbocompile.optimize("wan-tiny", TORCH_TURBO, dtype="float32", device="cpu", seed=1)
    gm, _, stats = _bake(den, steps=2, mode="sde")
    out = _run(gm, noise, ctx, eps[:2], "sde")
    ref = rcm_sample(den.graph_module, noise, ctx, steps=2, net_dtype=F32, step_noise=eps[:2])
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= 1e-6, rel
    assert stats["cross_kv_after"] == 4 and stats["time_embedding_evals_left"] == 0
    assert any(n.op == "call_function" and "w8a8" in str(n.target) for n in gm.graph.nodes)


def test_fused_cross_kv_is_hoisted_once_per_call(inputs):
    """fuse_sibling_gemms before the bake: the cross K/V of both blocks are one GEMM in the denoiser. It reads
    only the text embedding, so CSE keeps ONE for all steps (not one per step), and the sampler still matches
    the loop over the unfused denoiser (same bound as above)."""
    noise, ctx, eps = inputs
    fused_recipe = dict(TORCH_TURBO, passes=TORCH_TURBO["passes"] + ["fuse_sibling_gemms"])
    den = turbocompile.optimize("wan-tiny", fused_recipe, dtype="float32", device="cpu", seed=1)
    plain = turbocompile.optimize("wan-tiny", TORCH_TURBO, dtype="float32", device="cpu", seed=1)
    assert count_cross_kv_gemms(den.graph_module.graph) == 1 and count_cross_kv(den.graph_module.graph) == 4
    gm, _, stats = _bake(den, steps=3, mode="sde")
    # honest counts: 2 blocks x k, v projections per step, computed by one GEMM per step before CSE
    assert (stats["cross_kv_before"], stats["cross_kv_after"]) == (3 * 4, 4)
    assert (stats["cross_kv_gemms_before"], stats["cross_kv_gemms_after"]) == (3, 1)
    (kv,) = [n for n in gm.graph.nodes if any(".cross_attn." in p for p in n.meta.get("tc_fused_members", ()))]
    # hoisted: nothing between the context input and it depends on the noise or a step's state
    seen, stack = set(), [kv]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    assert {n.target for n in seen if n.op == "placeholder"} == {"context"}
    assert not any("tc_rcm_state" in n.meta or n.op == "get_attr" and n.target.startswith("step") for n in seen)
    out = _run(gm, noise, ctx, eps[:3], "sde")
    ref = rcm_sample(plain.graph_module, noise, ctx, steps=3, net_dtype=F32, step_noise=eps[:3])
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= 1e-6, rel
    unfused, _, _ = _bake(plain, steps=3, mode="sde")
    assert torch.equal(out, _run(unfused, noise, ctx, eps[:3], "sde"))  # per column the same GEMM


def test_shipped_recipes_parse():
    r = load_recipe("turbo-int8-rcm")
    assert [p.name for p in r.passes] == ["w8a8_linear", "sagesla_attention", "fuse_norms", "fuse_attention_pooling",
                                         "fuse_gemm_epilogues", "fuse_sibling_gemms", "bake_rcm_sampler"]
    assert load_recipe("rcm-4step").passes[0].options.steps == 4
    with pytest.raises(RecipeError, match="steps"):
        load_recipe({"version": 1, "passes": [{"name": "bake_rcm_sampler", "options": {"steps": 5}}]})
    with pytest.raises(RecipeError, match="sde, ode"):
        load_recipe({"version": 1, "passes": [{"name": "bake_rcm_sampler", "options": {"mode": "euler"}}]})


# -- Wan2.2 A14B: two experts ----------------------------------------------------------------

A14B_TINY = WanConfig(name="wan-tiny-a14b", model_type="i2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2,
                      in_dim=36, text_dim=64, text_len=16, num_experts=2, default_frames=5, default_size=(64, 64))


@pytest.fixture(scope="module")
def experts():
    shape = A14B_TINY.video_shape()
    gms = []
    for seed in (11, 12):
        m = WanModel(A14B_TINY)
        init_random_(m, seed)
        gms.append(capture(m.float(), shape))
    return gms, shape


def test_expert_plan_high_high_low_low(experts):
    (high, low), shape = experts
    specs = input_specs(A14B_TINY, shape, F32)
    ctx = PassContext(model_config=A14B_TINY, video_shape=shape, dtype=F32, device=torch.device("cpu"),
                      input_specs=dict(specs), extras={"experts": {"low": low}})
    gm, records = run_pipeline(clone_graph_module(high), [BakeRCMSampler()], ctx, input_specs=specs)
    sampler = ctx.manifest_extra["sampler"]
    assert sampler["sigma_max"] == 200.0 and sampler["expert_plan"] == ["high", "high", "low", "low"]
    assert records[0].stats["expert_plan"] == "HHLL"
    assert list(ctx.input_specs)[:3] == ["noise", "context", "y"]
    # which weights each step reads: self-attention q of block 0 is per step (depends on x)
    per_step = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (F.linear, torch._C._nn.linear):
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a.target.endswith("blocks.0.self_attn.q.weight"):
                    per_step[n.meta["tc_step"]] = a.target.split(".")[0]
    assert per_step == {0: "high", 1: "high", 2: "low", 3: "low"}
    # cross-attention K/V: once per layer per expert used
    assert records[0].stats["cross_kv_after"] == 2 * 2 * 2
    # numerics: equals the Python loop with the expert switch, and differs from high-only
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(specs["x"][0], generator=g)
    context = torch.randn(specs["context"][0], generator=g)
    y = torch.randn(specs["y"][0], generator=g)
    eps = [torch.randn(specs["x"][0], generator=g) for _ in range(4)]
    with torch.no_grad():
        out = gm(noise, context, y, *eps)
    ref = rcm_sample(None, noise, context, y=y, steps=4, sigma_max=200.0, net_dtype=F32, step_noise=eps,
                     experts=(high, low))
    assert torch.equal(out, ref)
    only_high = rcm_sample(high, noise, context, y=y, steps=4, sigma_max=200.0, net_dtype=F32, step_noise=eps)
    assert not torch.allclose(out, only_high)


def test_two_experts_need_the_low_expert(experts):
    (high, _), shape = experts
    specs = input_specs(A14B_TINY, shape, F32)
    ctx = PassContext(model_config=A14B_TINY, video_shape=shape, dtype=F32, device=torch.device("cpu"),
                      input_specs=dict(specs))
    with pytest.raises(PassError, match="a baked sampler needs both"):
        run_pipeline(clone_graph_module(high), [BakeRCMSampler()], ctx, input_specs=specs)


# -- artifacts, CompiledSampler, independent loop ---------------------------------------------

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bake")
    den = turbocompile.optimize("wan-tiny", {"version": 1, "model": SMALL, "passes": []}, root / "den",
                                dtype="float32", device="cpu", seed=1)
    shipped = dict(load_recipe("rcm-4step").to_dict(), model=SMALL)   # the shipped recipe, small video
    smp = turbocompile.optimize("wan-tiny", shipped, root / "smp", dtype="float32", device="cpu", seed=1)
    return den, smp


def test_artifact_round_trip_and_independent_loop(artifacts, inputs):
    den, smp = artifacts
    noise, ctx, eps = inputs
    assert smp.manifest["kind"] == "sampler"
    s = smp.manifest["sampler"]
    assert s["timesteps"]["net"] == [988.0, 932.0, 852.0, 608.0] and s["steps"] == 4 and s["mode"] == "sde"
    assert s["timesteps"]["t"] == pytest.approx(rcm_schedule(4, 80.0), abs=0)
    assert s["expert_plan"] == ["main"] * 4
    loaded = turbocompile.load(smp.artifact, device="cpu")
    assert isinstance(loaded, CompiledSampler)
    in_memory = _run(smp.graph_module, noise, ctx, eps, "sde")
    assert torch.equal(loaded.sample(noise, ctx, step_noise=eps), in_memory)
    # same seed -> same result; the generator draws exactly like rcm_sample; another seed differs
    a = loaded(noise, ctx, generator=torch.Generator().manual_seed(5))
    b = loaded.sample(noise, ctx, generator=torch.Generator().manual_seed(5))
    c = loaded.sample(noise, ctx, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    net = turbocompile.load(den.artifact, device="cpu")
    assert isinstance(net, CompiledWan)
    ref = rcm_sample(net, noise, ctx, steps=4, net_dtype=F32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, ref)
    # an independent implementation of TD's loop over the denoiser artifact: same latents
    g = torch.Generator().manual_seed(5)
    hand_eps = [torch.randn(noise.shape, generator=g) for _ in range(4)]
    hand, _ = _hand_td_loop(net, noise, ctx, 80.0, 4, "sde", hand_eps)
    assert torch.equal(a, hand)


def test_sampler_input_errors(artifacts, inputs):
    _, smp = artifacts
    noise, ctx, eps = inputs
    m = turbocompile.load(smp.artifact, device="cpu")
    with pytest.raises(InputError, match="noise has shape"):
        m.sample(noise[..., :4], ctx)
    with pytest.raises(InputError, match="batch and video geometry are fixed"):
        m.sample(torch.cat([noise, noise]), ctx)
    with pytest.raises(InputError, match="4 tensors"):
        m.sample(noise, ctx, step_noise=eps[:3])
    with pytest.raises(InputError, match="takes no 'y'"):
        m.sample(noise, ctx, y=noise)
    with pytest.raises(InputError, match="context must be a tensor"):
        m.sample(noise, None)


def test_progress_bar_ticks_per_step_with_identical_output(tmp_path, monkeypatch):
    """The loaded sampler's progress path ticks once per baked step, each tick right after that
    step's state node, and returns exactly what the plain call returns."""
    import tqdm.auto

    import turbocompile
    from turbocompile import eager

    turbocompile.optimize("wan-tiny", "rcm-4step", tmp_path / "s", dtype="float32")
    sampler = turbocompile.load(tmp_path / "s", device="cpu")
    names = [n.name for n in sampler.graph_module.graph.nodes if n.name.startswith("rcm_state_")]
    assert names == [f"rcm_state_{i}" for i in range(1, 5)]
    shape = sampler.noise_shape
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(shape, generator=g)
    ctx = torch.randn(1, 24, 64, generator=g)
    steps = [torch.randn(shape, generator=g) for _ in range(4)]
    events = []

    class FakeBar:
        def __init__(self, total, **kw):
            self.total = total

        def update(self, n):
            events.append(("update", n))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    real_bind = eager.bind

    def spying_bind(gm, after=None):
        wrapped = {name: (lambda v, name=name, cb=cb: (events.append(("state", name)), cb(v)))
                   for name, cb in (after or {}).items()}
        return real_bind(gm, after=wrapped)

    monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
    monkeypatch.setattr(eager, "bind", spying_bind)
    with_bar = sampler(noise, ctx, step_noise=steps, progress=True)
    want = []
    for name in names:
        want += [("state", name), ("update", 1)]
    assert events == want
    assert torch.equal(with_bar, sampler(noise, ctx, step_noise=steps))
