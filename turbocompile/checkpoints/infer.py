"""Infer a WanConfig from the shapes of a canonical-layout state dict."""

from __future__ import annotations

import re

import torch

from turbocompile.errors import CheckpointError
from turbocompile.model.config import PRESETS, WanConfig

__all__ = ["infer_config", "matching_presets", "HEAD_DIM"]

HEAD_DIM = 128  # every Wan config (wan-architecture.md §1.1)
_PATCH = (1, 2, 2)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
# The fields weights determine; a preset "matches" when all of them agree.
_SHAPE_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim",
                 "has_image_input", "image_dim", "patch_size")


def _shape(sd, key, ndim=None):
    t = sd.get(key)
    if t is None:
        raise CheckpointError(f"cannot infer the model config: key '{key}' is missing")
    if ndim is not None and t.ndim != ndim:
        raise CheckpointError(f"cannot infer the model config: '{key}' has shape {tuple(t.shape)}, "
                              f"expected {ndim} dims")
    return tuple(t.shape)


def matching_presets(cfg: WanConfig) -> list[str]:
    """Names of the built-in presets whose weight shapes equal ``cfg``'s (PRESETS order)."""
    want = tuple(getattr(cfg, f) if f != "image_dim" or cfg.has_image_input else None for f in _SHAPE_FIELDS)
    names = []
    for name, preset in PRESETS.items():
        have = tuple(getattr(preset, f) if f != "image_dim" or preset.has_image_input else None
                     for f in _SHAPE_FIELDS)
        if have == want:
            names.append(name)
    return names


def infer_config(state_dict: dict[str, torch.Tensor], *, prefer_experts: bool = False) -> WanConfig:
    """WanConfig of a canonical-layout state dict (see :func:`to_canonical`).

    dim, in/out dims, text/freq dims and ffn width come from weight shapes (biases where a
    TD int8 linear has no ``.weight``), num_layers from the block indices, heads = dim/128,
    model_type ``i2v`` when in_dim ≠ out_dim, ``has_image_input`` when ``img_emb.*`` is
    present, patch (1, 2, 2), eps 1e-6. When the shapes match a built-in preset, that preset
    is returned (its name, and fields such as text_len that weights cannot tell); with
    ``prefer_experts`` a two-expert (Wan2.2 A14B) preset wins over a same-shaped one.
    """
    dim, patch_dim = _shape(state_dict, "patch_embedding.weight", 2)
    out_rows = _shape(state_dict, "head.head.weight", 2)[0]
    vol = _PATCH[0] * _PATCH[1] * _PATCH[2]
    if patch_dim % vol or out_rows % vol:
        raise CheckpointError(f"patch_embedding.weight [{dim}, {patch_dim}] / head.head.weight [{out_rows}, ...] "
                              f"are not multiples of the patch volume {vol}")
    layers = {int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k))}
    if not layers:
        raise CheckpointError("cannot infer the model config: the checkpoint has no blocks.* keys")
    if dim % HEAD_DIM:
        raise CheckpointError(f"cannot infer heads: dim {dim} is not a multiple of the head dim {HEAD_DIM}")
    in_dim, out_dim = patch_dim // vol, out_rows // vol
    has_image = any(k.startswith("img_emb.") for k in state_dict)
    fields = dict(
        model_type="i2v" if in_dim != out_dim else "t2v",
        dim=dim, num_heads=dim // HEAD_DIM, num_layers=max(layers) + 1,
        ffn_dim=_shape(state_dict, "blocks.0.ffn.0.bias", 1)[0],
        in_dim=in_dim, out_dim=out_dim,
        text_dim=_shape(state_dict, "text_embedding.0.weight", 2)[1],
        freq_dim=_shape(state_dict, "time_embedding.0.weight", 2)[1],
        patch_size=_PATCH, eps=1e-6, has_image_input=has_image,
    )
    if has_image:
        fields["image_dim"] = _shape(state_dict, "img_emb.proj.0.weight", 1)[0]
    cfg = WanConfig(name="custom", **fields)
    names = matching_presets(cfg)
    if names:
        if prefer_experts:
            names.sort(key=lambda n: PRESETS[n].num_experts != 2)
        return PRESETS[names[0]]
    return cfg
