"""TurboDiffusion layouts (``wan-architecture.md`` §2b).

* rcm training ``.pth``: original keys under a ``net.`` prefix, Linear patch weight, bf16.
  Activation-checkpointed modules add ``_checkpoint_wrapped_module.`` inside paths.
* released ``TurboWan*.pth``: no prefix, Linear patch weight, norm weights (q/k RMSNorm,
  ``norm3``) stored fp32, plus SLA's ``blocks.i.self_attn.attn_op.local_attn.proj_l.{weight,bias}``.
* released ``*-quant.pth``: every block Linear except ``proj_l`` is ``<path>.int8_weight`` +
  ``<path>.scale`` (+ ``<path>.bias``), see :mod:`.int8`.

Canonical form: prefixes stripped, ``proj_l`` moved to ``extras["proj_l"][i] = (w, b)`` and
int8 linears to ``extras["int8"][path] = (q, scale)`` (their ``.weight`` is then absent).
"""

from __future__ import annotations

import re

import torch

from turbocompile.checkpoints.int8 import quantize_int8_block128
from turbocompile.checkpoints.original import PATCH_KEY, patch_weight_to_linear

__all__ = ["PROJ_L", "NET_PREFIX", "CKPT_WRAPPER", "is_turbodiffusion", "turbodiffusion_to_canonical",
           "canonical_to_turbodiffusion", "empty_extras"]

NET_PREFIX = "net."
CKPT_WRAPPER = "_checkpoint_wrapped_module."
PROJ_L = "self_attn.attn_op.local_attn.proj_l"
_PROJ_L_RE = re.compile(r"^blocks\.(\d+)\." + re.escape(PROJ_L) + r"\.(weight|bias)$")
# Norm weights TD replaces by fp32 buffers (FastRMSNorm / FastLayerNorm), inside blocks only.
_FP32_NORM_RE = re.compile(r"^blocks\.\d+\.((self_attn|cross_attn)\.norm_(q|k|k_img)\.weight|norm3\.(weight|bias))$")
# Block linears TD quantizes (everything under blocks that is an nn.Linear, proj_l excepted).
_QUANT_RE = re.compile(r"^blocks\.\d+\.((self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)|ffn\.(0|2))\.weight$")


def empty_extras() -> dict:
    return {"proj_l": {}, "int8": {}}


def is_turbodiffusion(keys) -> bool:
    """True when a key carries a TD-only marker (prefix, wrapper, proj_l or int8 weights)."""
    return any(k.startswith(NET_PREFIX) or CKPT_WRAPPER in k or ".int8_weight" in k or ".proj_l." in k
               for k in keys)


def _strip(key: str) -> str:
    if key.startswith(NET_PREFIX):
        key = key[len(NET_PREFIX):]
    return key.replace(CKPT_WRAPPER, "")


def turbodiffusion_to_canonical(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    stripped = {_strip(k): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    extras = empty_extras()
    proj_l: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in stripped.items():
        m = _PROJ_L_RE.match(key)
        if m:
            proj_l.setdefault(int(m.group(1)), {})[m.group(2)] = value
            continue
        if key.endswith(".int8_weight"):
            path = key[: -len(".int8_weight")]
            scale = stripped.get(path + ".scale")
            if scale is None:
                out[key] = value  # left for the strict check to report
                continue
            extras["int8"][path] = (value, scale.float())
            continue
        if key.endswith(".scale") and key[: -len(".scale")] + ".int8_weight" in stripped:
            continue
        out[key] = value
    for i in sorted(proj_l):
        w, b = proj_l[i].get("weight"), proj_l[i].get("bias")
        if w is None or b is None:  # half a proj_l: keep the key so the strict check names it
            for name, t in proj_l[i].items():
                out[f"blocks.{i}.{PROJ_L}.{name}"] = t
            continue
        extras["proj_l"][i] = (w, b)
    if PATCH_KEY in out:
        out[PATCH_KEY] = patch_weight_to_linear(out[PATCH_KEY])
    return out, extras


def canonical_to_turbodiffusion(sd: dict[str, torch.Tensor], proj_l=None, *, net_prefix: bool = False,
                                quantize_int8: bool = False) -> dict[str, torch.Tensor]:
    """Canonical state dict → a TD released-checkpoint state dict.

    Norm weights inside blocks become fp32 (as TD's FastRMSNorm / FastLayerNorm buffers);
    ``proj_l`` ({block index: (weight, bias)} or a list) is added under the SLA path;
    ``quantize_int8`` writes block linears as int8 + 128×128 scales (TD ``*-quant.pth``).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _FP32_NORM_RE.match(key):
            value = value.float()
        if quantize_int8 and _QUANT_RE.match(key):
            q, s = quantize_int8_block128(value)
            path = key[: -len(".weight")]
            out[path + ".int8_weight"], out[path + ".scale"] = q, s
            continue
        out[key] = value.contiguous()
    if proj_l is not None:
        items = proj_l.items() if isinstance(proj_l, dict) else enumerate(proj_l)
        for i, (w, b) in items:
            out[f"blocks.{i}.{PROJ_L}.weight"] = w.contiguous()
            out[f"blocks.{i}.{PROJ_L}.bias"] = b.contiguous()
    if net_prefix:
        out = {NET_PREFIX + k: v for k, v in out.items()}
    return out
