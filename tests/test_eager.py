"""turbocompile.eager.bind: the graph's code with turbocompile ops called without the dispatcher."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import turbocompile
from turbocompile.cuda_graph import signature_example_inputs
from turbocompile.eager import bind, cached_bind


class _OpLog(TorchDispatchMode):
    """Names of the overloads dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _turbo(names):
    return sorted({n for n in names if n.startswith("turbocompile.")})


@pytest.fixture(scope="module", params=["turbo-int8", "turbo-int8-rcm"])
def built(request):
    res = turbocompile.optimize("wan-tiny", request.param, dtype="float32", device="cpu")
    return res, signature_example_inputs(res.manifest["signature"], "cpu", seed=1)


def test_outputs_identical_and_graph_untouched(built):
    res, inp = built
    gm = res.graph_module
    code, targets = gm.code, [n.target for n in gm.graph.nodes]
    with torch.no_grad():
        want = gm(*inp)
        got = bind(gm)(*inp)
    assert torch.equal(got, want)
    assert gm.code is code and [n.target for n in gm.graph.nodes] == targets


def test_ops_skip_the_dispatcher(built):
    res, inp = built
    gm = res.graph_module
    with torch.no_grad(), _OpLog() as through_ops:
        gm(*inp)
    with torch.no_grad(), _OpLog() as bound:
        bind(gm)(*inp)
    assert _turbo(through_ops.names), "the graph should call turbocompile ops"
    assert _turbo(bound.names) == []
    assert any(n.startswith("aten.") for n in bound.names)  # the bodies' own torch work still runs


def test_weights_are_read_from_the_module_at_call_time(built):
    res, inp = built
    gm = res.graph_module
    fn = bind(gm)
    name, buf = next((n, b) for n, b in gm.named_buffers() if b.is_floating_point() and b.dim() == 1)
    owner, _, attr = name.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    with torch.no_grad():
        before = fn(*inp)
        setattr(mod, attr, buf + 1.0)  # a new tensor object, as .to() would install
        try:
            after_ir, after_bound = gm(*inp), fn(*inp)
        finally:
            setattr(mod, attr, buf)
    assert torch.equal(after_bound, after_ir)
    assert not torch.equal(after_bound, before)


def test_after_callbacks_and_cache(built):
    res, inp = built
    gm = res.graph_module
    seen = []
    first_call = next(n for n in gm.graph.nodes if n.op == "call_function")
    fn = bind(gm, after={first_call.name: lambda v: seen.append(v), "no_such_node": seen.append})
    with torch.no_grad():
        fn(*inp)
    assert len(seen) == 1
    holder = {}
    a = cached_bind(holder, gm)
    assert cached_bind(holder, gm) is a
    gm.recompile()  # new generated code: rebuilt
    assert cached_bind(holder, gm) is not a


def test_loaded_artifact_runs_bound_code(tmp_path):
    turbocompile.optimize("wan-tiny", "turbo-int8", tmp_path / "a", dtype="float32", device="cpu")
    m = turbocompile.load(tmp_path / "a", device="cpu")
    inp = signature_example_inputs(m.manifest["signature"], "cpu", seed=2)
    with torch.no_grad(), _OpLog() as log:
        got = m(*inp)
    assert _turbo(log.names) == []
    with torch.no_grad():
        assert torch.equal(got, m.graph_module(*inp))
