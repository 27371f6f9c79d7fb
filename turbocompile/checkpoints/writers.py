"""Writing a WanModel (or a canonical state dict) in the original, TurboDiffusion or diffusers layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from turbocompile.checkpoints.diffusers import canonical_to_diffusers
from turbocompile.checkpoints.original import canonical_to_original
from turbocompile.checkpoints.turbodiffusion import canonical_to_turbodiffusion
from turbocompile.errors import CheckpointError

__all__ = ["save_original", "save_turbodiffusion", "to_diffusers_state_dict", "SHARD_INDEX_NAME"]

SHARD_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_SHARD_NAME = "diffusion_pytorch_model-{:05d}-of-{:05d}.safetensors"


def _canonical(model) -> tuple[dict[str, torch.Tensor], tuple[int, int, int]]:
    if isinstance(model, nn.Module):
        patch = getattr(getattr(model, "config", None), "patch_size", (1, 2, 2))
        return {k: v.detach() for k, v in model.state_dict().items()}, tuple(patch)
    if isinstance(model, dict):
        return dict(model), (1, 2, 2)
    raise CheckpointError(f"cannot save a {type(model).__name__}; give a WanModel or a canonical state dict")


def _own_storage(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing storage with another (safetensors refuses shared ones)."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def save_original(model, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> Path:
    """Save in the original Wan layout (Conv3d patch weight, no prefix), safetensors.

    ``path`` ending in ``.safetensors`` (and no ``max_shard_bytes``) writes one file; any other
    path is a directory that receives ``diffusion_pytorch_model-0000i-of-0000n.safetensors``
    shards of at most ``max_shard_bytes`` (default 5 GB) plus ``SHARD_INDEX_NAME``.
    Returns the file written (the index for a sharded checkpoint).
    """
    from safetensors.torch import save_file

    sd, patch = _canonical(model)
    sd = _own_storage(canonical_to_original(sd, patch))
    path = Path(path)
    if path.suffix == ".safetensors" and max_shard_bytes is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path), metadata={"format": "pt"})
        return path
    limit = max_shard_bytes or 5 * 1024**3
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = _SHARD_NAME.format(i + 1, len(shards))
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = path / SHARD_INDEX_NAME
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index


def save_turbodiffusion(model, path: str | os.PathLike, proj_l=None, *, net_prefix: bool = False,
                        quantize_int8: bool = False) -> Path:
    """Save as a TurboDiffusion ``.pth`` (Linear patch weight, fp32 block norm weights).

    Args:
        proj_l: SLA ``proj_l`` weights, ``{block index: (weight [d, d], bias [d])}`` or a list,
            written to ``blocks.i.self_attn.attn_op.local_attn.proj_l.{weight,bias}``.
        net_prefix: prefix every key with ``net.`` (rcm training format).
        quantize_int8: write the block linears as TD ``Int8Linear`` (``int8_weight`` + 128×128
            ``scale``), like the released ``*-quant.pth`` checkpoints.
    """
    path = Path(path)
    if path.suffix not in (".pth", ".pt"):
        raise CheckpointError(f"TurboDiffusion checkpoints are .pth/.pt files, got '{path.name}'")
    sd, _ = _canonical(model)
    out = canonical_to_turbodiffusion(sd, proj_l, net_prefix=net_prefix, quantize_int8=quantize_int8)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, str(path))
    return path


def to_diffusers_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict for a diffusers ``WanTransformer3DModel`` (``load_state_dict(..., strict=True)``)."""
    sd, patch = _canonical(model)
    return canonical_to_diffusers(sd, patch)
