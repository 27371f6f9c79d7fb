"""The device guard's decisions (turbocompile.device_scope), on CPU with the CUDA calls stubbed.

tests/test_multi_gpu.py runs the real thing on a two-GPU machine; here the switching logic is checked
everywhere: a tensor standing in for one on ``cuda:1`` (``is_cuda``/``get_device``/``device`` overridden) and
``torch.cuda.current_device`` / ``torch.cuda.device`` replaced by recorders.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from turbocompile import device_scope as ds
from turbocompile.ops._registry import _BODIES


class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports itself as living on cuda:1 (only what the guard reads)."""

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return 1

    @property
    def device(self):
        return torch.device("cuda", 1)


@pytest.fixture
def cuda_stub(monkeypatch):
    """current device 0; ``torch.cuda.device(d)`` records d and marks it current inside the block."""
    state = {"current": 0, "entered": []}

    @contextlib.contextmanager
    def device(d):
        prev = state["current"]
        state["entered"].append(torch.device(d))
        state["current"] = torch.device(d).index
        try:
            yield
        finally:
            state["current"] = prev

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


def test_op_body_runs_on_its_tensors_device(cuda_stub):
    seen = []
    body = ds.on_tensor_device(lambda x, eps, *, flag=False: seen.append((cuda_stub["current"], eps, flag)) or x)
    x1 = torch.Tensor._make_subclass(_OnCuda1, torch.zeros(2))
    assert body(x1, 0.5, flag=True) is x1
    assert seen == [(1, 0.5, True)] and cuda_stub["entered"] == [torch.device("cuda", 1)]
    assert cuda_stub["current"] == 0  # restored
    # the first tensor decides, wherever it sits among the arguments; None and scalars are skipped
    body2 = ds.on_tensor_device(lambda a, b: cuda_stub["current"])
    assert body2(None, x1) == 1
    # already current, or a CPU tensor: no switch
    cuda_stub["current"] = 1
    assert body2(None, x1) == 1
    cuda_stub["current"] = 0
    assert body2(torch.zeros(1), x1) == 0
    assert len(cuda_stub["entered"]) == 2


def test_an_exception_leaves_the_device_as_it_was(cuda_stub):
    def boom(x):
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        ds.on_tensor_device(boom)(torch.Tensor._make_subclass(_OnCuda1, torch.zeros(1)))
    assert cuda_stub["current"] == 0


def test_device_scope_switches_only_for_cuda(cuda_stub):
    for dev in (None, "cpu", torch.device("meta")):
        with ds.device_scope(dev):
            assert cuda_stub["current"] == 0
    with ds.device_scope("cuda:1"):
        assert cuda_stub["current"] == 1
    assert cuda_stub["current"] == 0 and cuda_stub["entered"] == [torch.device("cuda", 1)]


def test_every_registered_op_body_is_guarded():
    """The bodies that the dispatcher and the eager runner call are the guarded wrappers of the op functions."""
    assert len(_BODIES) >= 20
    for name, body in _BODIES.items():
        assert body.__code__ is ds.on_tensor_device(lambda: None).__code__, name
        assert callable(body.__wrapped__), name
