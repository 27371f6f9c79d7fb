"""Helpers shared by the samplers: the denoiser call contract, argument checks, progress."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from turbocompile.sampling.schedules import SamplingError

Denoiser = Callable[..., torch.Tensor]


def call_denoiser(net: Denoiser, x: torch.Tensor, timestep: torch.Tensor, context, y=None,
                  clip_fea=None) -> torch.Tensor:
    """``net(x, timestep, context[, y=y][, clip_fea=clip_fea])``.

    Optional conditioning is passed only when given, so captured graphs whose forward takes
    just ``(x, timestep, context)`` work as denoisers too.
    """
    kwargs = {}
    if y is not None:
        kwargs["y"] = y
    if clip_fea is not None:
        kwargs["clip_fea"] = clip_fea
    return net(x, timestep, context, **kwargs)


def net_timestep(value: float, batch: int, device) -> torch.Tensor:
    """A ``[B]`` float32 timestep tensor (bf16-rounded values are exact in float32)."""
    return torch.full((batch,), float(value), dtype=torch.float32, device=device)


def resolve_experts(denoiser, experts) -> tuple[Denoiser, ...]:
    """The callables to sample with: ``(denoiser,)`` or the ``(high, low)`` expert pair."""
    if experts is None:
        if denoiser is None:
            raise SamplingError("no denoiser: pass denoiser, or experts=(high, low) for Wan2.2")
        return (denoiser,)
    if denoiser is not None:
        raise SamplingError("pass either denoiser or experts=(high, low), not both")
    experts = tuple(experts)
    if len(experts) != 2 or not all(callable(e) for e in experts):
        raise SamplingError(f"experts must be a pair of callables (high_noise, low_noise), got {experts!r}")
    return experts


def check_noise(noise) -> None:
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1 or not noise.is_floating_point():
        raise SamplingError("noise must be a floating-point tensor [B, C, T, H, W], got "
                            f"{type(noise).__name__} {getattr(noise, 'shape', '')} {getattr(noise, 'dtype', '')}")


def step_iter(n: int, progress: bool, desc: str) -> Sequence[int]:
    """``range(n)``, wrapped in a tqdm bar when ``progress``."""
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, total=n)
