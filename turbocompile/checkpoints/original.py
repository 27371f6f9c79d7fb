"""Original Wan layout (``wan-architecture.md`` §2a): canonical keys, Conv3d patch weight.

The only difference from the canonical (WanModel) layout is ``patch_embedding.weight``:
Conv3d ``[D, in, pt, ph, pw]`` on disk, Linear ``[D, in·pt·ph·pw]`` in WanModel. Flattening
the last four dims gives the feature order (c, kt, kh, kw) that the model's patchify uses.
"""

from __future__ import annotations

import torch

__all__ = ["PATCH_KEY", "patch_weight_to_linear", "patch_weight_to_conv", "original_to_canonical",
           "canonical_to_original"]

PATCH_KEY = "patch_embedding.weight"


def patch_weight_to_linear(w: torch.Tensor) -> torch.Tensor:
    """Conv3d ``[D, in, pt, ph, pw]`` → Linear ``[D, in·pt·ph·pw]`` (2-D input returned as is)."""
    return w.reshape(w.shape[0], -1) if w.ndim == 5 else w


def patch_weight_to_conv(w: torch.Tensor, patch_size=(1, 2, 2)) -> torch.Tensor:
    """Linear ``[D, in·pt·ph·pw]`` → Conv3d ``[D, in, pt, ph, pw]`` (5-D input returned as is)."""
    if w.ndim == 5:
        return w
    return w.reshape(w.shape[0], -1, *patch_size)


def original_to_canonical(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(sd)
    if PATCH_KEY in out:
        out[PATCH_KEY] = patch_weight_to_linear(out[PATCH_KEY])
    return out


def canonical_to_original(sd: dict[str, torch.Tensor], patch_size=(1, 2, 2)) -> dict[str, torch.Tensor]:
    out = dict(sd)
    if PATCH_KEY in out:
        out[PATCH_KEY] = patch_weight_to_conv(out[PATCH_KEY], patch_size)
    return out
