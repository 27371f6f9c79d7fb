"""Layout detection and conversion to the canonical (WanModel) state-dict layout."""

from __future__ import annotations

import torch

from turbocompile.checkpoints.diffusers import diffusers_to_canonical, is_diffusers
from turbocompile.checkpoints.original import PATCH_KEY, original_to_canonical
from turbocompile.checkpoints.turbodiffusion import empty_extras, is_turbodiffusion, turbodiffusion_to_canonical
from turbocompile.errors import CheckpointError

__all__ = ["LAYOUTS", "detect_layout", "to_canonical"]

LAYOUTS = ("canonical", "original", "turbodiffusion", "diffusers")


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """Name the key layout of a raw state dict: one of :data:`LAYOUTS`.

    * ``diffusers``: ``condition_embedder.*`` / ``attn1`` / ``proj_out`` keys;
    * ``turbodiffusion``: a ``net.`` prefix, ``_checkpoint_wrapped_module.``, SLA ``proj_l`` or
      ``int8_weight`` keys;
    * ``original``: Wan keys with a Conv3d (5-D) patch weight;
    * ``canonical``: Wan keys with a Linear (2-D) patch weight (also what an unquantized TD
      checkpoint without ``proj_l`` looks like; converting it is the identity).
    """
    keys = list(state_dict)
    if not keys:
        raise CheckpointError("checkpoint is empty: no tensors to load")
    if is_diffusers(keys):
        return "diffusers"
    if is_turbodiffusion(keys):
        return "turbodiffusion"
    patch = state_dict.get(PATCH_KEY)
    if patch is None:
        raise CheckpointError(
            f"cannot tell the checkpoint layout: no '{PATCH_KEY}' and no diffusers/TurboDiffusion keys "
            f"(first keys: {', '.join(keys[:4])}); expected one of {', '.join(LAYOUTS)}"
        )
    if patch.ndim == 5:
        return "original"
    if patch.ndim == 2:
        return "canonical"
    raise CheckpointError(f"'{PATCH_KEY}' has shape {tuple(patch.shape)}; expected Conv3d [D, in, pt, ph, pw] "
                          "or Linear [D, in·pt·ph·pw]")


def to_canonical(state_dict: dict[str, torch.Tensor], layout: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """Convert a raw state dict to WanModel's keys and shapes.

    Returns ``(state_dict, extras)``; ``extras`` always has ``"proj_l"`` ({block index:
    (weight, bias)}, TD SLA) and ``"int8"`` ({linear path: (int8 [out, in], fp32 scale
    [⌈out/128⌉, ⌈in/128⌉])}, TD quantized linears, whose ``.weight`` is then absent from the
    state dict). Tensors are not copied or cast.
    """
    layout = detect_layout(state_dict) if layout is None else layout
    if layout == "canonical":
        return dict(state_dict), empty_extras()
    if layout == "original":
        return original_to_canonical(state_dict), empty_extras()
    if layout == "turbodiffusion":
        return turbodiffusion_to_canonical(state_dict)
    if layout == "diffusers":
        return diffusers_to_canonical(state_dict), empty_extras()
    raise CheckpointError(f"unknown checkpoint layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
