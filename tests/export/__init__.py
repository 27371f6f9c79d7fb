"""Shared, cached wan-tiny artifacts and torch.export programs for the export tests.

Both test modules run in one pytest session, so the (slow) artifact creation and
``torch.export`` of each recipe happen once per session.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

_ROOT = Path(tempfile.mkdtemp(prefix="tc-export-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


def _w8a8(act: str, weight: str) -> dict:
    return {"name": "w8a8_linear", "options": {"format": "int8", "act_granularity": act,
                                                "weight_granularity": weight}}


# recipe key -> recipe (dicts where the built-in set lacks the combination)
RECIPES = {
    "baseline": "baseline",
    # w8a8-int8 (TD block-128 scales) + fuse_norms: every W8A8 and fused-norm op in one graph
    # (w8a8_linear, w8a8_linear_prequant, ln_modulate_quant, residual_ln_modulate_quant,
    # residual_ln_modulate, rmsnorm_rope)
    "int8_block_fused": {"version": 1, "name": "w8a8-int8+fuse_norms",
                         "passes": [_w8a8("block128", "block128"), "fuse_norms"]},
    "sagesla": "sagesla",
    # the full built-in stack: per-token x per-channel INT8, fused norms, SageSLA (standard ops)
    "turbo_int8": "turbo-int8",
    # FP8 linears, fused norms, the FFN's GELU GEMM at "bound" scales written by its pre-norm
    # (residual_ln_modulate_quant_bound -> w8a8_linear_gelu_quant_rowscale)
    "fp8_bound": {"version": 1, "name": "w8a8-fp8+fuse_norms+bound",
                  "passes": [{"name": "w8a8_linear", "options": {"format": "fp8", "act_granularity": "per_token",
                                                                 "weight_granularity": "per_channel"}},
                             "fuse_norms",
                             {"name": "fuse_gemm_epilogues", "options": {"quant_scale": "bound"}}]},
}


@functools.lru_cache(maxsize=None)
def artifact(key: str) -> Path:
    """Path of a float32 CPU wan-tiny artifact for RECIPES[key] (created once)."""
    import turbocompile

    out = _ROOT / key
    turbocompile.optimize("wan-tiny", RECIPES[key], out, dtype="float32", device="cpu", seed=1)
    return out


@functools.lru_cache(maxsize=None)
def program(key: str):
    """``turbocompile.export.pt2.export_program`` of artifact(key) (created once)."""
    from turbocompile.export.pt2 import export_program

    return export_program(artifact(key))


def tmp_root() -> Path:
    return _ROOT
