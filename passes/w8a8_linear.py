"""Pass ``w8a8_linear``: ``F.linear`` -> ``torch.ops.turbocompile.w8a8_linear``.

Weights are quantized once, here (int8 or fp8 e4m3 codes + float32 scales stored in the
artifact); loading never re-quantizes. Which linears: by default TurboDiffusion's choice —
every linear inside the transformer blocks (self/cross q, k, v, o and the FFN), never
the SLA ``proj_l``, the embeddings, the time MLP or the head. TurboDiffusion ``-quant``
checkpoints (``int8_weight`` / ``scale``) are used bit-exactly instead of re-quantizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from turbocompile.errors import TurboCompileError
from turbocompile.options import choice, globs
from turbocompile.passbase import Pass, PassResult, register_pass
from turbocompile.passes._graph import (attr_target, del_attr_if_unused, get_attr_value, is_linear, mark,
                                        matches_any, module_path, set_attr_value)

__all__ = ["W8A8Linear"]


@register_pass
class W8A8Linear(Pass):
    """Quantize linears to 8-bit weights and activations (INT8 TurboDiffusion-compatible, or FP8)."""

    name = "w8a8_linear"
    description = "8-bit weight/activation linears (int8 TurboDiffusion-compatible, or fp8 e4m3)"
    requires = frozenset({"shapes"})
    provides = frozenset({"w8a8"})
    verify_min_sqnr_db = 20.0

    @dataclass(frozen=True, kw_only=True)
    class Options:
        format: str = choice("int8", ("int8", "fp8"), "8-bit format (fp8 = e4m3)")
        weight_granularity: str = choice("per_channel", ("block128", "per_channel"),
                                         "weight scales: 128x128 tiles (TurboDiffusion) or one per output channel")
        act_granularity: str = choice("per_token", ("block128", "per_token"),
                                      "activation scales: 128 tokens x 128 channels (TurboDiffusion) or per token")
        include: tuple[str, ...] = globs(("blocks.*",), "module paths to quantize (globs)")
        skip: tuple[str, ...] = globs(("*proj_l*",), "module paths never quantized (globs; wins over include)")
        backend: str = choice("auto", ("auto", "triton", "torch"), "kernel backend")

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        from turbocompile.ops.w8a8 import quantize_weight  # op-side helper, not a kernel import

        o = self.options
        td_int8 = dict(ctx.extras.get("int8", {}))
        if td_int8 and (o.format, o.weight_granularity) != ("int8", "block128"):
            raise TurboCompileError(
                f"the checkpoint holds TurboDiffusion int8 weights ({len(td_int8)} linears); they can only be used "
                f"with format int8 and weight_granularity block128 (got {o.format}, {o.weight_granularity}): use recipe "
                f"turbo-int8-td (or w8a8-int8-td), or those options in your recipe"
            )
        stats = {"quantized": 0, "from_checkpoint": 0, "skipped": 0, "float_bytes": 0, "quant_bytes": 0}
        skipped: list[str] = []
        nodes = [n for n in gm.graph.nodes if is_linear(n)]
        it = nodes
        if ctx.progress:
            from tqdm import tqdm

            it = tqdm(nodes, desc="quantizing linears", unit="linear", leave=False)
        for node in it:
            args = list(node.args) + [None] * (3 - len(node.args))
            x, w_node, b_node = args[:3]
            b_node = node.kwargs.get("bias", b_node)
            wt = attr_target(w_node)
            if wt is None:
                continue  # computed weight (e.g. an upcast in the float32 islands): not a candidate
            path = module_path(wt)
            if not matches_any(path, o.include) or matches_any(path, o.skip):
                stats["skipped"] += 1
                skipped.append(path)
                continue
            w = get_attr_value(gm, wt)
            if path in td_int8:
                q, s = td_int8.pop(path)
                q, s = q.to(w.device), s.to(device=w.device, dtype=torch.float32)
                stats["from_checkpoint"] += 1
            else:
                q, s = quantize_weight(w, o.format, o.weight_granularity)
            qname, sname = f"{path}.qweight", f"{path}.wscale"
            set_attr_value(gm, qname, q)
            set_attr_value(gm, sname, s)
            with gm.graph.inserting_before(node):
                qn = mark(gm.graph.get_attr(qname), self.name)
                sn = mark(gm.graph.get_attr(sname), self.name)
                new = gm.graph.call_function(
                    torch.ops.turbocompile.w8a8_linear.default,
                    (x, qn, sn, b_node, o.format, o.act_granularity, o.weight_granularity, o.backend),
                )
            mark(new, self.name)
            new.meta.update({k: v for k, v in node.meta.items() if k != "tc_from"})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            if w_node is not None and not w_node.users:
                gm.graph.erase_node(w_node)
            del_attr_if_unused(gm, wt)
            stats["quantized"] += 1
            stats["float_bytes"] += w.numel() * w.element_size()
            stats["quant_bytes"] += q.numel() * q.element_size() + s.numel() * s.element_size()
        if td_int8:
            raise TurboCompileError(f"{len(td_int8)} TurboDiffusion int8 linears were left unused (not in the graph, "
                                    f"or excluded by include/skip), e.g. '{next(iter(td_int8))}'")
        if stats["quant_bytes"]:
            stats["size_reduction"] = round(stats["float_bytes"] / stats["quant_bytes"], 3)
        notes = [f"kept in float: {len(skipped)} linears outside include/skip (e.g. {skipped[0]})"] if skipped else []
        return PassResult(stats["quantized"] > 0, stats, notes)
