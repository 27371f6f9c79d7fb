"""turbocompile: a graph compiler for Wan video diffusion transformers.

Public API::

    import turbocompile
    result = turbocompile.optimize("wan-tiny", "baseline", "out/wan-tiny")
    model = turbocompile.load("out/wan-tiny")
    velocity = model(x, timestep, context)

Importing turbocompile registers the ``torch.ops.turbocompile.*`` ops; it never imports
Triton nor initialises CUDA.
"""

from __future__ import annotations

from turbocompile import ops  # noqa: F401  (registers torch.ops.turbocompile.*)
from turbocompile.api import CompiledWan, OptimizeResult, load, optimize
from turbocompile.errors import TurboCompileError
from turbocompile.model.config import PRESETS, WanConfig, get_preset
from turbocompile.model.wan import WanModel

__version__ = "0.1.0"

__all__ = ["optimize", "load", "CompiledWan", "OptimizeResult", "WanModel", "WanConfig", "PRESETS",
           "get_preset", "TurboCompileError", "ops", "__version__"]
