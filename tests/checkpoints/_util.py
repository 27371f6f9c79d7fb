"""Shared builders for the checkpoint tests (small models, deterministic inputs)."""

from __future__ import annotations

import torch

from turbocompile.model.config import get_preset
from turbocompile.model.wan import WanModel, init_random_


def tiny_model(name: str = "wan-tiny", seed: int = 0, dtype=torch.float32) -> WanModel:
    """A built-in tiny model with random non-zero weights."""
    return init_random_(WanModel(get_preset(name)), seed=seed).to(dtype).eval()


def inputs(model: WanModel, batch: int = 1, seed: int = 1, ctx_len: int = 24):
    """(x, t, ctx, y, clip) for a 3×8×8 latent (grid 3×4×4) on ``model``'s config."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.out_dim, 3, 8, 8, generator=g)
    t = torch.tensor([937.0, 250.0][:batch])
    ctx = torch.randn(batch, ctx_len, cfg.text_dim, generator=g)
    y = torch.randn(batch, cfg.y_dim, 3, 8, 8, generator=g) if cfg.model_type == "i2v" else None
    clip = torch.randn(batch, 257, cfg.image_dim, generator=g) if cfg.has_image_input else None
    return x, t, ctx, y, clip


@torch.no_grad()
def run(model: WanModel, args) -> torch.Tensor:
    x, t, ctx, y, clip = args
    return model(x, t, ctx, y=y, clip_fea=clip)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k
