"""Reading raw state dicts from disk or from an in-memory module.

Supported sources:

* a ``.safetensors`` file;
* a sharded safetensors checkpoint: its ``*.index.json`` file, or the directory holding it;
* a ``.pth`` / ``.pt`` file (``torch.load(weights_only=True, mmap=True)``: nothing is executed
  and the tensors stay backed by the file until used);
* a directory holding exactly one checkpoint (one of the above);
* an ``nn.Module`` (a diffusers ``WanTransformer3DModel``, a ``WanModel``, ...): its state dict.

Nothing here renames keys or changes dtypes: that is :mod:`.layouts`' job.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from turbocompile.errors import CheckpointError

__all__ = ["load_state_dict", "read_file", "checkpoint_files", "expert_dirs", "resolve_directory", "two_expert_error",
           "EXPERT_DIRS", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES = (".safetensors", ".pth", ".pt", ".index.json")
# Wan2.2 A14B checkpoints: one directory per expert. Original Wan / TD release layout, and the
# diffusers pipeline layout (``transformer`` runs the high-noise steps, ``transformer_2`` the
# low-noise ones: diffusers ``WanPipeline`` with ``boundary_ratio``).
EXPERT_DIRS = {"high": "high_noise_model", "low": "low_noise_model"}
DIFFUSERS_EXPERT_DIRS = {"high": "transformer", "low": "transformer_2"}


def expert_dirs(directory: Path) -> dict[str, Path] | None:
    """{"high": path, "low": path} when ``directory`` is a two-expert (Wan2.2 A14B) checkpoint: original
    (``high_noise_model/``, ``low_noise_model/``) or diffusers (``transformer/``, ``transformer_2/``)
    subdirectories, or TurboDiffusion's release pair, two files named alike but for ``high`` / ``low``
    (``TurboWan2.2-I2V-A14B-high-720P.pth``, ``...-low-720P.pth``)."""
    for names in (EXPERT_DIRS, DIFFUSERS_EXPERT_DIRS):
        if all((directory / n).is_dir() for n in names.values()):
            return {k: directory / n for k, n in names.items()}
    files = [p for p in directory.iterdir() if p.is_file() and p.name.lower().endswith((".pth", ".pt"))]
    if len(files) == 2:
        a, b = sorted(files, key=lambda p: p.name.lower().find("high") < 0)  # the "high" one first
        parts = re.split(r"(?i)(high)", a.name)
        if len(parts) == 3 and parts[0] + ("low" if parts[1].islower() else "LOW") + parts[2] == b.name:
            return {"high": a, "low": b}
    return None


def two_expert_error(directory: Path, got: str = "no expert was given") -> CheckpointError:
    names = ", ".join(p.name for p in expert_dirs(directory).values())
    return CheckpointError(f"'{directory}' is a Wan2.2 A14B checkpoint with two experts ({names}) and {got}; "
                           "choose one: expert='high' or expert='low' (or pass the expert's directory)")


def resolve_directory(directory: Path) -> Path:
    """The directory actually holding the weights: a diffusers pipeline root → its ``transformer/``."""
    if expert_dirs(directory):
        raise two_expert_error(directory)
    sub = directory / DIFFUSERS_EXPERT_DIRS["high"]
    has_files = any(p.is_file() and p.name.endswith(SUPPORTED_SUFFIXES) for p in directory.iterdir())
    if not has_files and sub.is_dir():
        return sub
    return directory
# Wrapper keys some trainers put around the tensors in a .pth file.
_WRAPPER_KEYS = ("state_dict", "model", "net")


def _progress(items, desc: str):
    """tqdm over ``items`` when there are several of them (shards), else the plain list."""
    if len(items) < 2:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="file")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read safetensors file '{path}': {exc}") from None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # a legacy (non-zip) torch.save file cannot be memory-mapped
            if "_use_new_zipfile_serialization" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read torch checkpoint '{path}' (weights_only): {first}") from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"'{path}' does not hold a state dict of tensors (got {type(obj).__name__}); "
            f"expected a dict of tensors, optionally under one of {list(_WRAPPER_KEYS)}"
        )
    return dict(obj)


def _read_index(path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"'{path}' is not a sharded-checkpoint index with a 'weight_map': {exc}") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (path.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"index '{path}' names shard files that do not exist: {', '.join(missing[:5])}"
                              + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    out = _merge_shards([path.parent / s for s in shards], f"loading {path.parent.name or path.name}")
    absent = sorted(set(weight_map) - set(out))
    if absent:
        raise CheckpointError(f"index '{path}' lists {len(absent)} keys its shards do not hold: "
                              f"{', '.join(absent[:5])}")
    return out


def read_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one checkpoint file (``.safetensors``, ``.pth``, ``.pt`` or a shard ``*.index.json``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    name = path.name.lower()
    if name.endswith(".index.json"):
        return _read_index(path)
    if name.endswith(".safetensors"):
        return _read_safetensors(path)
    if name.endswith((".pth", ".pt")):
        return _read_torch(path)
    raise CheckpointError(
        f"unsupported checkpoint file type '{path.name}'; supported: {', '.join(SUPPORTED_SUFFIXES)} "
        "or a directory holding them"
    )


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The files making up the one checkpoint in ``directory``.

    An ``*.index.json`` wins (one file is returned: the index); otherwise every
    ``*.safetensors`` file (shards without an index are merged); otherwise the single
    ``.pth`` / ``.pt`` file. Raises when the directory holds none, or several torch files.
    """
    directory = resolve_directory(Path(directory))
    files = sorted(p for p in directory.iterdir() if p.is_file())
    indexes = [p for p in files if p.name.endswith(".index.json")]
    if len(indexes) == 1:
        return indexes
    if len(indexes) > 1:
        raise CheckpointError(f"directory '{directory}' holds several shard indexes "
                              f"({', '.join(p.name for p in indexes)}); pass the one to load")
    safet = [p for p in files if p.name.endswith(".safetensors")]
    if safet:
        return safet
    torch_files = [p for p in files if p.suffix in (".pth", ".pt")]
    if len(torch_files) == 1:
        return torch_files
    if torch_files:
        raise CheckpointError(f"directory '{directory}' holds several torch checkpoints "
                              f"({', '.join(p.name for p in torch_files)}); pass the file to load")
    raise CheckpointError(f"directory '{directory}' holds no checkpoint file "
                          f"({', '.join(SUPPORTED_SUFFIXES)})")


def load_state_dict(source) -> dict[str, torch.Tensor]:
    """Read the raw state dict of ``source`` (keys and dtypes exactly as stored).

    Args:
        source: a checkpoint file, a directory holding one checkpoint (single file, shards
            with an index, or bare shards), or an ``nn.Module`` (its ``state_dict()``).
    """
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(f"cannot load a checkpoint from a {type(source).__name__}; "
                              "give a file, a directory or an nn.Module")
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if path.is_file():
        return read_file(path)
    files = checkpoint_files(path)  # raises for a two-expert directory
    if len(files) == 1:
        return read_file(files[0])
    return _merge_shards(files, f"loading {path.name}")


def _merge_shards(files: list[Path], desc: str) -> dict[str, torch.Tensor]:
    """The union of shard files' tensors. Shards partition the keys: a key held by two files means they
    are separate checkpoints side by side (two experts, an fp16 copy), never merged silently."""
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, Path] = {}
    for f in _progress(files, desc=desc):
        part = read_file(f)
        both = sorted(k for k in part if k in owner)
        if both:
            raise CheckpointError(f"'{owner[both[0]].name}' and '{f.name}' both hold {len(both)} of the same keys "
                                  f"({', '.join(both[:3])}): separate checkpoints, not shards; pass the file to load")
        out.update(part)
        owner.update(dict.fromkeys(part, f))
    return out
