"""A model on a GPU other than cuda:0 (``device="cuda:1"``): optimize, call, artifact, CUDA graph, baked sampler, CLI.

Triton launches on the *current* device, which stays cuda:0 here; the graph's kernels must still run on
cuda:1 (``turbocompile.device_scope``). Each case checks that the output equals the same build on cuda:0, that
the caller's current device is unchanged, and that nothing was allocated on cuda:0 meanwhile. Needs two GPUs:
skipped elsewhere (this is not a pass on a one-GPU machine).
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import turbocompile
from turbocompile.cli import cli
from turbocompile.cuda_graph import signature_example_inputs

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

# Hopper-class GPUs run turbo-fp8's Gluon/TMA kernels; older ones run the Triton paths of the same ops
RECIPES = ("turbo-fp8", "turbo-int8")
TOL = 1e-3  # same kernels on the same GPU model; a few ops reduce with atomics, so not always bit-identical


class _StaysOffCuda0:
    """Checks that a block leaves cuda:0 current and allocates nothing there, not even briefly."""

    def __enter__(self):
        torch.cuda.synchronize(0)
        torch.cuda.reset_peak_memory_stats(0)
        self.before = torch.cuda.memory_allocated(0)
        assert torch.cuda.current_device() == 0
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            torch.cuda.synchronize(1)
            assert torch.cuda.current_device() == 0
            # the peak also catches short-lived buffers (e.g. an autotuner's cache flush) put on cuda:0
            assert torch.cuda.max_memory_allocated(0) == self.before, "tensors were allocated on cuda:0"
        return False


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("recipe", RECIPES)
def test_optimize_and_call_on_the_second_gpu(recipe, tmp_path):
    torch.cuda.set_device(0)
    with _StaysOffCuda0():
        res1 = turbocompile.optimize("wan-tiny", recipe, tmp_path / "a1", device="cuda:1", seed=5)
        assert {t.device for t in res1.graph_module.state_dict().values()} == {torch.device("cuda", 1)}
        ins = signature_example_inputs(res1.manifest["signature"], "cuda:1", seed=1)
        out1 = res1.graph_module(*ins)  # through the dispatcher: each op guards its own device
        assert out1.device == torch.device("cuda", 1)
        eager1 = res1.eager_runner()(*ins)
        m1 = turbocompile.load(tmp_path / "a1", device="cuda:1")
        loaded1 = m1(*[t.cpu() for t in ins])
        graph1 = m1.enable_cuda_graph()(*[t.cpu() for t in ins])
    res0 = turbocompile.optimize("wan-tiny", recipe, device="cuda:0", seed=5)
    out0 = res0.graph_module(*[t.to("cuda:0") for t in ins])
    assert torch.isfinite(out0).all()
    for name, got in (("graph", out1), ("eager", eager1), ("loaded", loaded1), ("cuda graph", graph1)):
        assert _rel(got, out0) < TOL, (recipe, name, _rel(got, out0))


def test_baked_sampler_on_the_second_gpu(tmp_path):
    torch.cuda.set_device(0)
    turbocompile.optimize("wan-tiny", "turbo-int8-rcm", tmp_path / "s", device="cuda:1", seed=2)
    shape = turbocompile.load(tmp_path / "s", device="cpu").noise_shape
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=gen)
    ctx = torch.randn(shape[0], 24, 64, generator=gen)
    step_noise = [torch.randn(shape, generator=gen) for _ in range(4)]
    outs = {}
    for dev in ("cuda:1", "cuda:0"):
        s = turbocompile.load(tmp_path / "s", device=dev)
        if dev == "cuda:1":
            with _StaysOffCuda0():
                outs[dev] = s.sample(noise, ctx, step_noise=step_noise)
                outs["graph"] = s.enable_cuda_graph().sample(noise, ctx, step_noise=step_noise)
        else:
            outs[dev] = s.sample(noise, ctx, step_noise=step_noise)
    assert torch.isfinite(outs["cuda:0"]).all()
    assert _rel(outs["cuda:1"], outs["cuda:0"]) < TOL
    assert _rel(outs["graph"], outs["cuda:0"]) < TOL


def test_cli_device_index(tmp_path):
    torch.cuda.set_device(0)
    r = CliRunner().invoke(cli, ["optimize", "wan-tiny", "turbo-fp8", "-o", str(tmp_path / "a"), "--device", "cuda:1",
                                 "-q"])
    assert r.exit_code == 0, r.output
    save_file({"context": torch.randn(1, 24, 64)}, str(tmp_path / "ctx.safetensors"))
    outs = {}
    for dev in ("cuda:1", "cuda:0"):
        dst = tmp_path / f"lat-{dev[-1]}.safetensors"
        r = CliRunner().invoke(cli, ["run", str(tmp_path / "a"), "--context", str(tmp_path / "ctx.safetensors"),
                                     "--seed", "0", "--steps", "2", "-o", str(dst), "--device", dev, "-q"])
        assert r.exit_code == 0, (dev, r.output)
        outs[dev] = next(iter(load_file(str(dst)).values()))
    assert torch.isfinite(outs["cuda:0"]).all()
    assert _rel(outs["cuda:1"], outs["cuda:0"]) < TOL
    r = CliRunner().invoke(cli, ["optimize", "wan-tiny", "turbo-fp8", "-o", str(tmp_path / "b"), "--device",
                                 f"cuda:{torch.cuda.device_count()}"])
    assert r.exit_code == 2 and "is not valid; this machine has" in r.output and not (tmp_path / "b").exists()
