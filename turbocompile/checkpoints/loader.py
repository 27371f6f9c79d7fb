"""``load_model``: any supported checkpoint → a ready canonical :class:`WanModel`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from turbocompile.checkpoints.diffusers import config_from_diffusers
from turbocompile.checkpoints.infer import infer_config, matching_presets
from turbocompile.checkpoints.int8 import dequantize_int8_block128
from turbocompile.checkpoints.io import two_expert_error, expert_dirs, load_state_dict, resolve_directory
from turbocompile.checkpoints.layouts import detect_layout, to_canonical
from turbocompile.errors import CheckpointError
from turbocompile.model.config import PRESETS, WanConfig, get_preset
from turbocompile.model.wan import WanModel

__all__ = ["LoadInfo", "load_model", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_SHOW = 4  # keys named per category in error messages


@dataclass(frozen=True)
class LoadInfo:
    """What :func:`load_model` read.

    Attributes:
        layout: detected layout ("canonical", "original", "turbodiffusion", "diffusers").
        source: the file or directory read (the expert's directory for A14B), or
            ``<in-memory ClassName>``.
        config: the WanConfig the model was built with.
        extras: ``{"proj_l": {i: (w, b)}, "int8": {path: (q, scale)}}`` (see ``to_canonical``),
            tensors moved to the model's device, dtypes as stored.
        expert: "high" / "low" for a Wan2.2 A14B expert, else None.
        dtype: the dtype of every model parameter.
    """

    layout: str
    source: str
    config: WanConfig
    extras: dict = field(repr=False)
    expert: str | None = None
    dtype: torch.dtype = torch.float32


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise CheckpointError(f"dtype {dtype!r} is not a floating dtype; choose one of {', '.join(_DTYPES)}")


def _select_expert(path: Path, expert: str | None) -> Path:
    experts = expert_dirs(path) if path.is_dir() else None
    if experts:
        if expert not in experts:
            raise two_expert_error(path, "no expert was given" if expert is None else f"expert={expert!r} was given")
        return resolve_directory(experts[expert]) if experts[expert].is_dir() else experts[expert]
    if expert is not None:
        raise CheckpointError(f"expert={expert!r} given but '{path}' is not a Wan2.2 A14B checkpoint "
                              "(no high_noise_model/low_noise_model or transformer/transformer_2 subdirectories, no -high/-low .pth pair)")
    return resolve_directory(path) if path.is_dir() else path


def _preset_or(cfg: WanConfig, prefer_experts: bool = False) -> WanConfig:
    """The preset ``cfg`` matches (a two-expert one first where ``prefer_experts``: one expert of an A14B
    pair has the shapes of a one-expert 14B model), else ``cfg`` itself."""
    names = matching_presets(cfg)
    if prefer_experts:
        names = sorted(names, key=lambda n: PRESETS[n].num_experts != 2)
    return PRESETS[names[0]] if names and PRESETS[names[0]].eps == cfg.eps else cfg


def _diffusers_config_json(directory: Path, prefer_experts: bool = False) -> WanConfig | None:
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        data = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"'{cfg_file}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "num_attention_heads" not in data:
        return None  # e.g. the original Wan config.json: the weights are authoritative
    return _preset_or(config_from_diffusers(data), prefer_experts)


def _module_config(module: nn.Module) -> WanConfig | None:
    if isinstance(module, WanModel):
        return module.config
    cfg = getattr(module, "config", None)
    if cfg is not None and hasattr(cfg, "get") and cfg.get("num_attention_heads") is not None:
        return _preset_or(config_from_diffusers(dict(cfg)))
    return None


def _few(keys) -> str:
    keys = list(keys)
    more = f", ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _check_strict(sd: dict[str, torch.Tensor], model: nn.Module, cfg: WanConfig, layout: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [f"{k} (checkpoint {list(sd[k].shape)} vs model {list(s)})"
                 for k, s in expected.items() if k in sd and tuple(sd[k].shape) != s]
    not_float = [f"{k} ({sd[k].dtype})" for k in expected if k in sd and not sd[k].is_floating_point()]
    problems = []
    if not_float:
        problems.append(f"{len(not_float)} not floating point: {_few(not_float)}")
    if missing:
        problems.append(f"{len(missing)} missing: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: {_few(misshaped)}")
    if problems:
        raise CheckpointError(f"{layout} checkpoint does not match model '{cfg.name}' "
                              f"(dim {cfg.dim}, {cfg.num_layers} layers, in {cfg.in_dim}): " + "; ".join(problems))


def _default_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    for key in ("blocks.0.self_attn.q.weight", "blocks.0.self_attn.q.bias", "text_embedding.0.weight"):
        t = sd.get(key)
        if t is not None and t.is_floating_point():
            return t.dtype
    for t in sd.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def load_model(source, config: WanConfig | str | None = None, *, expert: str | None = None, dtype=None,
               device="cpu", allow_quantized: bool = False) -> tuple[WanModel, LoadInfo]:
    """Load a Wan DiT checkpoint of any supported layout into a canonical :class:`WanModel`.

    Args:
        source: checkpoint file, directory (single file, shards + index, diffusers directory with
            ``config.json``, Wan2.2 A14B directory with ``high_noise_model/`` and
            ``low_noise_model/``), or an in-memory module (diffusers ``WanTransformer3DModel``,
            ``WanModel``).
        config: WanConfig or preset name; default: diffusers ``config.json`` / module config when
            present, else inferred from the weights (:func:`infer_config`).
        expert: "high" | "low", required for (and only for) Wan2.2 A14B directories.
        dtype: dtype of every parameter; default: the dtype of the block linear weights. Mixed
            checkpoints (TD stores norm weights fp32) are unified, since WanModel's activation
            dtype is that of its weights.
        device: where the parameters live.
        allow_quantized: TD int8 checkpoints are refused unless True; then the int8 linears are
            kept in ``info.extras["int8"]`` (for the w8a8_linear pass) and the float weights the
            model needs are DEQUANTIZED (``q · scale`` per 128×128 block, fp32 product cast to
            ``dtype``), so the model is complete and runs (with the quantization error).

    The model is built on the meta device and the checkpoint tensors are assigned to it
    (``load_state_dict(assign=True)``), so no second copy of the weights is allocated when the
    dtype and device already match. Loading is strict: missing, unexpected or mis-shaped keys
    raise :class:`CheckpointError` naming them.
    """
    target = resolve_dtype(dtype)
    device = torch.device(device)
    file_cfg = None
    if isinstance(source, nn.Module):
        if expert is not None:
            raise CheckpointError(f"expert={expert!r} only applies to a Wan2.2 A14B checkpoint directory, "
                                  f"not to an in-memory {type(source).__name__}")
        desc = f"<in-memory {type(source).__name__}>"
        file_cfg = _module_config(source)
        raw = load_state_dict(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CheckpointError(f"checkpoint '{path}' does not exist")
        path = _select_expert(path, expert)
        desc = str(path)
        if path.is_dir():
            file_cfg = _diffusers_config_json(path, prefer_experts=expert is not None)
        raw = load_state_dict(path)
    else:
        raise CheckpointError(f"cannot load a model from a {type(source).__name__}; "
                              "give a file, a directory or an nn.Module")

    layout = detect_layout(raw)
    sd, extras = to_canonical(raw, layout)
    del raw

    if isinstance(config, str):
        config = get_preset(config)
    if config is None:
        config = file_cfg or infer_config(sd, prefer_experts=expert is not None)

    int8 = extras["int8"]
    if int8 and not allow_quantized:
        raise CheckpointError(
            f"checkpoint holds TurboDiffusion int8 weights ({len(int8)} linears): optimize it with a recipe "
            "that runs the w8a8_linear pass (or load with allow_quantized=True to dequantize them)"
        )
    if target is None:
        target = _default_dtype(sd)
    for path_, (q, s) in int8.items():
        if path_ + ".weight" in sd:
            raise CheckpointError(f"'{path_}' has both a float weight and int8_weight/scale")
        try:
            sd[path_ + ".weight"] = dequantize_int8_block128(q, s, target)
        except ValueError as exc:
            raise CheckpointError(f"int8 linear '{path_}': {exc}") from None

    _check_proj_l(extras["proj_l"], config)
    with torch.device("meta"):
        model = WanModel(config)
    _check_strict(sd, model, config, layout)
    sd = {k: v.to(device=device, dtype=target if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    # init_non_persistent_buffers() recomputes on the buffer's current device, which is still
    # meta after a meta build: put a placeholder on the target device first.
    model.time_freqs = torch.empty(0, device=device)
    model.init_non_persistent_buffers()
    model.eval()
    moved = {
        "proj_l": {i: (w.to(device), b.to(device)) for i, (w, b) in extras["proj_l"].items()},
        "int8": {p: (q.to(device), s.to(device)) for p, (q, s) in int8.items()},
    }
    info = LoadInfo(layout=layout, source=desc, config=config, extras=moved, expert=expert, dtype=target)
    return model, info


def _check_proj_l(proj_l: dict, config) -> None:
    """SLA ``proj_l`` weights must fit the model: a block that exists, [head_dim, head_dim] and [head_dim]
    (checked here, naming the key, rather than inside the attention op after capture)."""
    hd = config.dim // config.num_heads
    for i, (w, b) in sorted(proj_l.items()):
        key = f"blocks.{i}.self_attn.attn_op.local_attn.proj_l"
        if not 0 <= i < config.num_layers:
            raise CheckpointError(f"'{key}.weight': block {i} does not exist ({config.name} has "
                                  f"{config.num_layers} blocks)")
        if tuple(w.shape) != (hd, hd) or tuple(b.shape) != (hd,):
            raise CheckpointError(f"'{key}': weight {tuple(w.shape)} and bias {tuple(b.shape)} do not fit head dim "
                                  f"{hd}; expected ({hd}, {hd}) and ({hd},)")
