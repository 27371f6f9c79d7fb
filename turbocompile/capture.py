"""Capture: trace a canonical Wan model into a flat ``torch.fx.GraphModule``.

The graph is specialised to one video geometry (the token grid is static, the batch stays
symbolic): RoPE tables become constants of the graph, every ``nn.Module`` is traced
through (``F.linear`` with ``get_attr`` weights), so the graph holds only
placeholders, ``get_attr``, ``call_function``, ``call_method`` and ``output`` nodes —
what the artifact serializer and the passes expect. Attribute names are the checkpoint
keys (``blocks.3.self_attn.q.weight``), plus ``rope_cos``, ``rope_sin`` and ``time_freqs``.

Shapes are propagated with fake tensors (:func:`propagate_shapes`), so a 14B model at
720p on the meta device is analysed without running it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch._subclasses.fake_tensor import FakeTensorMode

from turbocompile.model.config import VideoShape
from turbocompile.model.rope import rope_tables
from turbocompile.model.wan import WanModel

__all__ = ["capture", "input_specs", "example_inputs", "propagate_shapes", "lint", "graph_device"]


class _FlatTracer(fx.Tracer):
    """Traces through every module, recording parameters as ``get_attr`` nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # noqa: ARG002
        return False


class _CaptureRoot(nn.Module):
    def __init__(self, model: WanModel, shape: VideoShape):
        super().__init__()
        self.model = model
        self.grid = shape.grid
        device = next(model.parameters()).device
        cos, sin = rope_tables(shape.grid, model.config.head_dim)
        # [L, 1, d/2]: broadcast over heads without slicing inside the traced code
        self.register_buffer("rope_cos", cos[:, None, :].contiguous().to(device))
        self.register_buffer("rope_sin", sin[:, None, :].contiguous().to(device))


class _RootT2V(_CaptureRoot):
    def forward(self, x, timestep, context):
        return self.model.forward_static(x, timestep, context, y=None, clip_fea=None, grid=self.grid,
                                         cos=self.rope_cos, sin=self.rope_sin)


class _RootI2V(_CaptureRoot):
    def forward(self, x, timestep, context, y):
        return self.model.forward_static(x, timestep, context, y=y, clip_fea=None, grid=self.grid,
                                         cos=self.rope_cos, sin=self.rope_sin)


class _RootI2VClip(_CaptureRoot):
    def forward(self, x, timestep, context, y, clip_fea):
        return self.model.forward_static(x, timestep, context, y=y, clip_fea=clip_fea, grid=self.grid,
                                         cos=self.rope_cos, sin=self.rope_sin)


_ROOT_CLASSES = {(False, False): _RootT2V, (True, False): _RootI2V, (True, True): _RootI2VClip}


def input_specs(model_config, shape: VideoShape, dtype: torch.dtype = torch.float32) -> dict:
    """Name -> (shape, dtype) of the graph inputs for ``shape`` (y / clip_fea only if the model takes them)."""
    cfg = model_config
    b = shape.batch
    specs = {
        "x": (shape.latent(cfg.out_dim if cfg.model_type == "i2v" else cfg.in_dim), dtype),
        "timestep": ((b,), torch.float32),
        "context": ((b, cfg.text_len, cfg.text_dim), dtype),
    }
    if cfg.model_type == "i2v":
        specs["y"] = (shape.latent(cfg.y_dim), dtype)
    if cfg.has_image_input:
        specs["clip_fea"] = ((b, cfg.image_len, cfg.image_dim), dtype)
    return specs


def example_inputs(model_config, shape: VideoShape, *, seed: int = 0, device="cpu",
                   dtype: torch.dtype = torch.float32) -> dict:
    """Random, non-zero inputs for the graph (timesteps drawn over the whole 0–1000 range)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name, (shp, dt) in input_specs(model_config, shape, dtype).items():
        if name == "timestep":
            out[name] = (torch.rand(shp, generator=gen) * 1000.0).to(device)
        else:
            out[name] = torch.randn(shp, generator=gen).to(device=device, dtype=dt)
    return out


def capture(model: WanModel, shape: VideoShape) -> fx.GraphModule:
    """Trace ``model`` for the static geometry ``shape`` into a flat GraphModule.

    The returned module's ``meta["turbocompile"]`` records the model config, the video
    shape and the input names.
    """
    cfg = model.config
    root = _CaptureRoot(model, shape)
    names = list(input_specs(cfg, shape))
    has_y = "y" in names
    has_clip = "clip_fea" in names

    # A root class whose forward has exactly the model's inputs, so no placeholder stands
    # for an absent optional argument (the tracer reads ``type(root).forward``).
    root.__class__ = _ROOT_CLASSES[(has_y, has_clip)]

    tracer = _FlatTracer()
    graph = tracer.trace(root)

    # Flatten attribute names: "model.blocks.0..." -> "blocks.0...".
    attrs: dict[str, torch.Tensor] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            obj = root
            for part in node.target.split("."):
                obj = getattr(obj, part)
            new = node.target[len("model."):] if node.target.startswith("model.") else node.target
            node.target = new
            attrs[new] = obj
    stray = sorted(t for t in attrs if t.startswith("_tensor_constant"))
    if stray:  # a tensor computed eagerly during tracing: a bug in the model code
        raise RuntimeError(f"capture produced untracked tensor constants {stray}; the model must not slice "
                           "or compute buffers outside traced ops")
    gm = fx.GraphModule(attrs, graph, class_name="WanGraph")
    gm.meta["turbocompile"] = {
        "model_config": cfg.to_dict(),
        "video_shape": shape.to_dict(),
        "inputs": names,
    }
    gm.graph.lint()
    return gm


def propagate_shapes(gm: fx.GraphModule, inputs: dict[str, tuple]) -> fx.GraphModule:
    """Fill ``node.meta["val"]`` with fake tensors for inputs given as name -> (shape, dtype).

    Works for parameters on any device, the meta device included: nothing is computed.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = graph_device(gm)
    with mode:
        fakes = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in inputs.values()]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    return gm


def graph_device(gm: fx.GraphModule) -> torch.device:
    """Device of a graph's weights (cpu when it has none)."""
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")


def lint(gm: fx.GraphModule) -> None:
    """Structural check of a graph (raises on malformed graphs)."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                if not hasattr(obj, part):
                    raise RuntimeError(f"get_attr node '{node.name}' refers to missing attribute '{node.target}'")
                obj = getattr(obj, part)
