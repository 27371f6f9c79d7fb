"""Helpers shared by the pass tests: optimize wan-tiny with an inline recipe and run it on fixed inputs."""

from __future__ import annotations

import torch

import turbocompile
from turbocompile.capture import example_inputs
from turbocompile.checkpoints import save_turbodiffusion
from turbocompile.model.config import get_preset
from turbocompile.model.wan import WanModel, init_random_


def recipe(*passes, device: str = "cpu") -> dict:
    """An inline bf16 recipe of ``passes`` on ``device`` (CPU unless a test runs its Triton path on a GPU)."""
    return {"version": 1, "name": "t", "model": {"dtype": "bfloat16", "device": device}, "passes": list(passes)}


def inputs(device: "str | torch.device" = "cpu") -> list[torch.Tensor]:
    """wan-tiny's seed-1 example inputs (bf16) on ``device``, in call order."""
    cfg = get_preset("wan-tiny")
    return list(example_inputs(cfg, cfg.video_shape(), seed=1, device=device, dtype=torch.bfloat16).values())


def run(rec, seed=0, **kw):
    """(OptimizeResult, output) of wan-tiny optimized with ``rec`` and called on :func:`inputs` (on the device
    the model was built on)."""
    res = turbocompile.optimize("wan-tiny", rec, seed=seed, **kw)
    device = next(iter(res.graph_module.state_dict().values())).device
    with torch.no_grad():
        return res, res.graph_module(*inputs(device))


def count_calls(gm, target) -> int:
    """Number of call_function nodes of ``gm`` calling ``target``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def w8a8(fmt: str = "fp8", act: str = "per_token") -> dict:
    """A ``w8a8_linear`` recipe entry: ``fmt`` codes, per-channel weight scales, ``act`` activation scales."""
    return {"name": "w8a8_linear", "options": {"format": fmt, "weight_granularity": "per_channel",
                                               "act_granularity": act}}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def pass_stats(res, name: str) -> dict:
    """The stats that pass ``name`` recorded in ``res``'s manifest."""
    return next(p["stats"] for p in res.manifest["passes"] if p["name"] == name)


def td_checkpoint_with_proj_l(path):
    """wan-tiny (seed-5 bf16 weights) saved as a TurboDiffusion checkpoint at ``path`` with random SLA ``proj_l``
    layers in every block; returns (checkpoint path, {block: (weight, bias)})."""
    cfg = get_preset("wan-tiny")
    model = init_random_(WanModel(cfg), seed=5).to(torch.bfloat16)
    d = cfg.head_dim
    gen = torch.Generator().manual_seed(0)
    proj = {i: (torch.randn(d, d, generator=gen) * 0.05, torch.randn(d, generator=gen) * 0.05)
            for i in range(cfg.num_layers)}
    return save_turbodiffusion(model, path, proj_l=proj), proj
