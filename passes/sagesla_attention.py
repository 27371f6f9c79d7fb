"""Pass ``sagesla_attention``: self-attention cores -> ``torch.ops.turbocompile.sagesla``.

Matches, in every Wan block's **self**-attention (never cross-attention), the captured
pattern ``transpose(1,2) ×3 -> scaled_dot_product_attention -> transpose(1,2)`` and replaces it
with one op on the model's own ``[B, L, H, D]`` layout: no transposes or copies remain.
TurboDiffusion's SLA ``proj_l`` weights (``blocks.i.self_attn.attn_op.local_attn.proj_l``),
when the checkpoint has them, are stored in the artifact and fed to the op's linear branch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from turbocompile.errors import TurboCompileError
from turbocompile.options import choice, number
from turbocompile.passbase import Pass, PassResult, leave_site, register_pass
from turbocompile.passes._graph import block_index, captured_attention, from_half, mark, set_attr_value, to_half

__all__ = ["SageSLAAttention"]

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SELF_ATTN = re.compile(r"(?:^|\.)blocks\.(\d+)\.self_attn$")


@register_pass
class SageSLAAttention(Pass):
    """Replace self-attention with block-sparse quantized SageSLA attention."""

    name = "sagesla_attention"
    description = "self-attention -> SageSLA (block-sparse INT8 QK / FP8 PV + linear branch)"
    requires = frozenset({"shapes"})
    provides = frozenset({"sparse_attention"})
    verify_min_sqnr_db = 5.0  # sparse attention changes the function by design; catches NaNs and blow-ups

    @dataclass(frozen=True, kw_only=True)
    class Options:
        topk: float = number(0.1, min=1e-6, max=1.0, doc="fraction of key blocks kept per query block")
        block_q: int = number(64, min=16, max=256, doc="query block size (64 = TD's SM90 geometry)")
        block_k: int = number(128, min=16, max=256, doc="key block size (128 = TD's SM90 geometry)")
        quant: str = choice("int8-fp8", ("int8-fp8", "int8-fp16", "none"),
                            "int8-fp8 = SageSLA, none = plain SLA in bf16")
        dense_layers: tuple[int, ...] = ()
        backend: str = choice("auto", ("auto", "triton", "torch"), "kernel backend")

        def __post_init__(self):
            for b in (self.block_q, self.block_k):
                if b & (b - 1):
                    raise ValueError(f"block sizes must be powers of two, got {b}")
            for i in self.dense_layers:
                if i < 0:
                    raise ValueError(f"dense_layers must be layer indices >= 0, got {i}")

    def check_config(self, cfg) -> None:
        bad = [i for i in self.options.dense_layers if i >= cfg.num_layers]
        if bad:
            raise TurboCompileError(f"dense_layers {bad} out of range: the model has {cfg.num_layers} layers "
                                    f"(valid indices 0..{cfg.num_layers - 1})")

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        o = self.options
        cfg = ctx.model_config
        self.check_config(cfg)
        proj = dict(ctx.extras.get("proj_l", {}))
        stats = {"replaced": 0, "dense_kept": 0, "with_proj_l": 0, "unmatched": 0}
        notes = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _SDPA:
                continue
            layer = block_index(node, _SELF_ATTN)
            if layer is None:
                continue  # cross-attention or anything else
            if layer in o.dense_layers:
                stats["dense_kept"] += 1
                continue
            matched = captured_attention(node)
            if matched is None:
                leave_site(ctx, stats, notes, f"blocks.{layer}.self_attn: attention is not the captured "
                                              "transpose/SDPA pattern; left dense")
                continue
            q, k, v, out_t = matched
            pw = pb = None
            with gm.graph.inserting_before(out_t):
                if layer in proj:
                    w, b = proj.pop(layer)
                    base = f"blocks.{layer}.self_attn.proj_l"
                    set_attr_value(gm, f"{base}.weight", w.to(device=ctx.device, dtype=torch.float32))
                    set_attr_value(gm, f"{base}.bias", b.to(device=ctx.device, dtype=torch.float32))
                    pw = mark(gm.graph.get_attr(f"{base}.weight"), self.name)
                    pb = mark(gm.graph.get_attr(f"{base}.bias"), self.name)
                    stats["with_proj_l"] += 1
                args = to_half(gm.graph, [q, k, v], ctx.dtype, self.name)
                new = gm.graph.call_function(
                    torch.ops.turbocompile.sagesla.default,
                    (*args, float(o.topk), pw, pb, int(o.block_q), int(o.block_k), o.quant, o.backend),
                )
                mark(new, self.name)
                new.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
                result = from_half(gm.graph, new, ctx.dtype, self.name)
            out_t.replace_all_uses_with(result)
            for dead in (out_t, node, *node.args[:3]):
                if not dead.users:
                    gm.graph.erase_node(dead)
            stats["replaced"] += 1
        if proj:
            notes.append(f"{len(proj)} proj_l weights had no matching self-attention (layers {sorted(proj)[:4]})")
        if ctx.dtype == torch.float32 and stats["replaced"]:
            notes.append("float32 graph: q, k, v are cast to bf16 around the sagesla op")
        return PassResult(stats["replaced"] > 0, stats, notes)
