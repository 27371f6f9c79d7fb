"""CUDA-graph execution (turbocompile.cuda_graph, load(cuda_graph=True), enable_cuda_graph).

On a CPU-only machine only the error paths and the runner's copy-in / replay / clone plumbing (with a
stand-in graph object) can be tested; the real capture test runs only where CUDA is present.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import turbocompile
from tests._env import has_cuda
from turbocompile.capture import example_inputs
from turbocompile.cuda_graph import CUDAGraphRunner, signature_example_inputs
from turbocompile.errors import InputError, KernelUnavailableError
from turbocompile.model.config import get_preset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cg") / "a"
    res = turbocompile.optimize("wan-tiny", "baseline", out, dtype="float32", device="cpu", seed=3)
    return res, out


def test_cpu_requests_fail_with_kernel_unavailable(tiny):
    res, out = tiny
    with pytest.raises(KernelUnavailableError, match="needs a CUDA GPU"):
        turbocompile.load(out, device="cpu", cuda_graph=True)
    m = turbocompile.load(out, device="cpu")
    with pytest.raises(KernelUnavailableError, match="needs a CUDA GPU"):
        m.enable_cuda_graph()
    assert m.cuda_graph is False
    with pytest.raises(KernelUnavailableError, match="needs a CUDA GPU"):
        res.cuda_graph()


def test_signature_example_inputs_follow_the_manifest(tiny):
    res, _ = tiny
    sig = res.manifest["signature"]
    xs = signature_example_inputs(sig, "cpu")
    assert [tuple(t.shape) for t in xs] == [tuple(i["shape"]) for i in sig["inputs"]]
    t = xs[[i["name"] for i in sig["inputs"]].index("timestep")]
    assert torch.all((t >= 0) & (t < 1000))


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: replay runs the function on the static buffers."""

    def __init__(self, fn, ins, out):
        self.fn, self.ins, self.out, self.replays = fn, ins, out, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.fn(*self.ins))


def _fake_runner(fn, example):
    r = CUDAGraphRunner.__new__(CUDAGraphRunner)
    nn.Module.__init__(r)
    r.names = ["x", "y"]
    r.device = torch.device("cpu")  # device_scope: no device switch
    r.static_inputs = [t.clone() for t in example]
    r.static_output = fn(*r.static_inputs)
    r.graph = _FakeGraph(fn, r.static_inputs, r.static_output)
    return r


def test_runner_copies_in_replays_and_returns_a_clone():
    fn = lambda a, b: a * 2 + b  # noqa: E731
    r = _fake_runner(fn, [torch.zeros(2, 3), torch.zeros(2, 3)])
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    out1 = r(a, b)
    assert torch.equal(out1, fn(a, b)) and r.graph.replays == 1
    out2 = r(b, a)
    assert torch.equal(out1, fn(a, b)), "a returned output must not be overwritten by the next replay"
    assert torch.equal(out2, fn(b, a))
    assert torch.equal(r(a.double(), b), fn(a, b))  # dtype converted on copy-in
    with pytest.raises(InputError, match=r"x has shape \[3, 3\]; the CUDA graph was captured for \[2, 3\]"):
        r(torch.zeros(3, 3), b)
    with pytest.raises(InputError, match="captured with 2 inputs, got 1"):
        r(a)


@pytest.mark.skipif(not has_cuda(), reason="CUDA graph capture needs a GPU")
def test_capture_and_replay_matches_eager_on_cuda(tmp_path):
    out = tmp_path / "a"
    turbocompile.optimize("wan-tiny", "turbo-int8", out, dtype="bfloat16", device="cuda", seed=3)
    eager = turbocompile.load(out, device="cuda")
    graphed = turbocompile.load(out, device="cuda", cuda_graph=True)
    assert graphed.cuda_graph
    cfg = get_preset("wan-tiny")
    inp = example_inputs(cfg, cfg.video_shape(), seed=5, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = eager(*inp.values())
        got = graphed(*inp.values())
    assert torch.equal(got, want)
    x2 = torch.cat([inp["x"], inp["x"]])
    with pytest.raises(InputError):
        graphed(x2, torch.tensor([1.0, 2.0], device="cuda"), torch.cat([inp["context"]] * 2))
