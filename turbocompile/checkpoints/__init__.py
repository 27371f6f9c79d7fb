"""Checkpoint import/export for the canonical Wan DiT.

Layouts (``wan-architecture.md`` §2): original Wan (Conv3d patch weight), TurboDiffusion
(``net.`` prefix, Linear patch weight, fp32 norms, SLA ``proj_l``, int8 linears), diffusers
``WanTransformer3DModel``, and canonical (WanModel's own keys).

* :func:`load_state_dict` — raw tensors from a file / directory / module;
* :func:`detect_layout`, :func:`to_canonical` — key and shape conversion (+ ``extras``);
* :func:`infer_config` — WanConfig from weight shapes;
* :func:`load_model` — a ready WanModel plus :class:`LoadInfo`;
* :func:`save_original`, :func:`save_turbodiffusion`, :func:`to_diffusers_state_dict` — writers.
"""

from turbocompile.checkpoints.infer import infer_config
from turbocompile.checkpoints.io import load_state_dict
from turbocompile.checkpoints.layouts import LAYOUTS, detect_layout, to_canonical
from turbocompile.checkpoints.loader import LoadInfo, load_model
from turbocompile.checkpoints.writers import save_original, save_turbodiffusion, to_diffusers_state_dict

__all__ = [
    "LAYOUTS",
    "LoadInfo",
    "detect_layout",
    "infer_config",
    "load_model",
    "load_state_dict",
    "save_original",
    "save_turbodiffusion",
    "to_canonical",
    "to_diffusers_state_dict",
]
