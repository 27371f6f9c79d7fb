"""Pass ordering (networkx), prerequisites, cycles, disabling and verification."""


import pytest
import torch

from turbocompile.capture import capture, example_inputs, input_specs, propagate_shapes
from turbocompile.errors import PassError, PipelineError
from turbocompile.model.config import get_preset
from turbocompile.model.wan import WanModel, init_random_
from turbocompile.passbase import Pass, PassContext, PassResult
from turbocompile.pipeline import order_passes, run_pipeline


def _mk(name, requires=(), provides=(), after=(), fn=None):
    class P(Pass):
        pass

    P.name = name
    P.requires = frozenset(requires)
    P.provides = frozenset(provides)
    P.after = frozenset(after)
    P.run = fn or (lambda self, gm, ctx: PassResult(False, {"seen": 1}))
    return P()


def test_order_respects_requires_and_keeps_recipe_order_otherwise():
    a = _mk("a", provides={"A"})
    b = _mk("b", requires={"A"})
    c = _mk("c")
    assert [p.name for p in order_passes([b, c, a])] == ["c", "a", "b"]
    assert [p.name for p in order_passes([a, c, b])] == ["a", "c", "b"]


def test_soft_after_and_missing_prerequisite_and_cycle():
    a = _mk("a", provides={"A"}, after={"B"})
    b = _mk("b", provides={"B"})
    assert [p.name for p in order_passes([a, b])] == ["b", "a"]
    assert [p.name for p in order_passes([a])] == ["a"]
    with pytest.raises(PipelineError, match="pass 'x' requires 'Q', which no pass in the pipeline provides"):
        order_passes([_mk("x", requires={"Q"})])
    with pytest.raises(PipelineError, match="cycle: "):
        order_passes([_mk("p", provides={"P"}, requires={"R"}), _mk("r", provides={"R"}, requires={"P"})])
    with pytest.raises(PipelineError, match="more than once"):
        order_passes([_mk("a"), _mk("a")])


def _setup():
    cfg = get_preset("wan-tiny")
    shape = cfg.video_shape()
    gm = capture(init_random_(WanModel(cfg)), shape)
    specs = input_specs(cfg, shape)
    propagate_shapes(gm, specs)
    ctx = PassContext(model_config=cfg, video_shape=shape, dtype=torch.float32, device=torch.device("cpu"))
    return cfg, shape, gm, specs, ctx


def _scale_output(factor):
    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(torch.mul, (out.args[0], factor))
        out.args = (new,)
        return PassResult(True, {"scaled": 1})
    return run


def test_run_records_stats_disables_and_verifies():
    cfg, shape, gm, specs, ctx = _setup()
    inputs = example_inputs(cfg, shape)
    gm, recs = run_pipeline(gm, [_mk("noop"), _mk("skipme")], ctx, input_specs=specs, verify_inputs=inputs,
                            disabled=["skipme"])
    assert [(r.name, r.status) for r in recs] == [("noop", "ran"), ("skipme", "disabled")]
    assert recs[0].verify["rel_err"] == 0.0 and recs[0].stats == {"seen": 1}
    with pytest.raises(PassError, match=r"pass 'bad' failed \(after: noop\): --verify failed"):
        run_pipeline(gm, [_mk("noop"), _mk("bad", fn=_scale_output(1.5))], ctx, input_specs=specs,
                     verify_inputs=inputs)
    with pytest.raises(PipelineError, match="cannot disable 'zzz'"):
        run_pipeline(gm, [_mk("noop")], ctx, input_specs=specs, disabled=["zzz"])


def test_pass_exceptions_are_wrapped_with_history():
    cfg, shape, gm, specs, ctx = _setup()

    def boom(self, gm, ctx):
        raise ValueError("kaput")

    with pytest.raises(PassError, match=r"pass 'boom' failed \(after: first\): ValueError: kaput"):
        run_pipeline(gm, [_mk("first"), _mk("boom", fn=boom)], ctx, input_specs=specs)
