"""Pass ``merge_padding_keys``: cross-attention over the prompt's real tokens, its padding as one key.

Wan pads each prompt's text embedding with zero rows up to ``text_len`` (512 tokens; original Wan,
TurboDiffusion and diffusers all do). Every padding row then goes through the same row-wise layers
(text embedding, K/V projections, k-RMSNorm), so the K and V rows of the padding are equal, and
softmax attention over m equal keys is attention over one of them with its logit raised by ln(m).
A 100-token prompt needs 101 keys instead of 512.

The pass matches, in every block's cross-attention, the captured pattern
``transpose(1,2) x3 -> scaled_dot_product_attention -> transpose(1,2)`` whose k and v depend on the
``context`` input alone (so not Wan2.1 I2V's image keys, and not self-attention), and replaces it with

* ``turbocompile::key_tail_start(k, v)``: where the trailing run of rows equal to the last row starts
  (per batch and head; found at run time, by comparing the rows themselves), and
* ``turbocompile::tail_merged_attention(q, k, v, tail_start)``: attention over the keys before it and
  one key for the whole run,

on the model's ``[B, L, H, D]`` layout. Nothing is assumed about the prompt: equal rows are found,
not presumed, so a context without padding (or with padding that a non-row-wise layer made unequal,
e.g. block-128 activation scales) gives a tail of one key and the plain attention. The result is the
attention over all keys up to the rounding of the attention kernel. ``key_tail_start`` depends on
the text only, so ``bake_rcm_sampler`` computes it once per sampling call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from turbocompile.options import choice
from turbocompile.passbase import Pass, PassResult, leave_site, register_pass
from turbocompile.passes._graph import block_index, captured_attention, from_half, mark, to_half

__all__ = ["MergePaddingKeys"]

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_CROSS_ATTN = re.compile(r"(?:^|\.)blocks\.(\d+)\.cross_attn$")
_TEXT_INPUT = "context"


def _input_dependencies(graph: fx.Graph) -> dict[fx.Node, frozenset[str]]:
    """For every node, the names of the graph inputs (placeholders) its value depends on."""
    deps: dict[fx.Node, frozenset[str]] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            deps[node] = frozenset({node.target})
        else:
            acc: frozenset[str] = frozenset()
            for a in node.all_input_nodes:
                acc = acc | deps.get(a, frozenset())
            deps[node] = acc
    return deps


@register_pass
class MergePaddingKeys(Pass):
    """Cross-attention over the text's distinct keys: the padding's equal K/V rows become one key."""

    name = "merge_padding_keys"
    description = "cross-attention: the prompt padding's equal keys merged into one (cost follows the real length)"
    requires = frozenset({"shapes"})
    provides = frozenset({"merged_padding_keys"})
    # the kernel's own rounding (fp32 softmax, P rounded to bf16 for P·V) differs from SDPA's in the last bits
    verify_min_sqnr_db = 40.0

    @dataclass(frozen=True, kw_only=True)
    class Options:
        backend: str = choice("auto", ("auto", "triton", "torch"), "kernel backend")

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        o = self.options
        graph = gm.graph
        if not any(n.op == "placeholder" and n.target == _TEXT_INPUT for n in graph.nodes):
            return PassResult(False, {"replaced": 0, "unmatched": 0, "not_text": 0},
                              [f"the graph has no '{_TEXT_INPUT}' input: nothing to merge"])
        deps = _input_dependencies(graph)
        text_only = frozenset({_TEXT_INPUT})
        stats = {"replaced": 0, "unmatched": 0, "not_text": 0}
        notes = []
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _SDPA:
                continue
            layer = block_index(node, _CROSS_ATTN)
            if layer is None:
                continue  # self-attention (or anything outside a cross-attention module)
            matched = captured_attention(node)
            if matched is None:
                leave_site(ctx, stats, notes, f"blocks.{layer}.cross_attn: attention is not the captured "
                                              "transpose/SDPA pattern; left as is")
                continue
            q, k, v, out_t = matched
            if deps[k] != text_only or deps[v] != text_only:
                stats["not_text"] += 1  # e.g. Wan2.1 I2V's image keys (from clip_fea)
                continue
            with graph.inserting_before(out_t):
                args = to_half(graph, [q, k, v], ctx.dtype, self.name)
                tail = mark(graph.call_function(torch.ops.turbocompile.key_tail_start.default,
                                                (args[1], args[2], o.backend)), self.name)
                new = mark(graph.call_function(torch.ops.turbocompile.tail_merged_attention.default,
                                               (*args, tail, o.backend)), self.name)
                for n in (tail, new):
                    n.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
                result = from_half(graph, new, ctx.dtype, self.name)
            out_t.replace_all_uses_with(result)
            for dead in (out_t, node, *node.args[:3]):
                if not dead.users:
                    graph.erase_node(dead)
            stats["replaced"] += 1
        if ctx.dtype == torch.float32 and stats["replaced"]:
            notes.append("float32 graph: q, k, v are cast to bf16 around the merged-key attention")
        return PassResult(stats["replaced"] > 0, stats, notes)
