"""Helpers shared by the pass tests: optimize wan-tiny with an inline recipe and run it on fixed inputs."""

from __future__ import annotations

import torch

import turbocompile
from turbocompile.capture import example_inputs
from turbocompile.model.config import get_preset


def recipe(*passes) -> dict:
    """An inline bf16 CPU recipe of ``passes``."""
    return {"version": 1, "name": "t", "model": {"dtype": "bfloat16", "device": "cpu"}, "passes": list(passes)}


def inputs() -> list[torch.Tensor]:
    """wan-tiny's seed-1 example inputs (bf16), in call order."""
    cfg = get_preset("wan-tiny")
    return list(example_inputs(cfg, cfg.video_shape(), seed=1, dtype=torch.bfloat16).values())


def run(rec, seed=0, **kw):
    """(OptimizeResult, output) of wan-tiny optimized with ``rec`` and called on :func:`inputs`."""
    res = turbocompile.optimize("wan-tiny", rec, seed=seed, **kw)
    with torch.no_grad():
        return res, res.graph_module(*inputs())


def count_calls(gm, target) -> int:
    """Number of call_function nodes of ``gm`` calling ``target``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)
