"""Pass ``fuse_residual_epilogues``: the residual add of a fused norm moves into the W8A8 GEMM producing y.

After ``fuse_norms`` every residual site of a Wan block is ``residual_ln_modulate(_quant)(x, y, gate, ...)``
returning ``(x_new, normed...)``, with ``x_new = x + y·gate`` (gate None for the cross-attention). Where y
is the output of a W8A8 GEMM (the self-/cross-attention o-projections, ffn.2) that nothing else reads:

* ``w8a8_linear_prequant(qx, sx, ...)`` [-> ``reshape``] or ``w8a8_linear(h, ...)`` (then quantized by an
  explicit ``quantize_activation``, as ``w8a8_linear`` does inside)
                              -> ``x_new = turbocompile::w8a8_linear_residual(qx, sx, ..., residual=x, gate)``
* ``residual_ln_modulate(_quant)(x, y, gate, w, b, shift, scale, eps, ...)``
                              -> ``ln_modulate(_quant)(x_new, w, b, shift, scale, eps, ...)``
  (``residual_ln_modulate_quant_bound``, the FFN pre-norm after ``fuse_gemm_epilogues`` with "bound" scales,
  -> ``ln_modulate_quant_bound``: the same arguments after eps, the same outputs after x_new)

Users of the old x_new output now read the GEMM's output; the normalized (or quantized) outputs come
from the plain norm. Traffic per element and site (bf16): the GEMM reads x and writes x_new instead of
writing y (+2 B), the norm no longer reads y nor writes x_new (-4 B): 2 B less, and y never exists.

Numerics: the torch backend is the unfused graph op for op (bit for bit); the Triton GEMM rounds y to
the residual's dtype and applies the norm kernels' residual roundings, so x_new is bit-identical to the
fused norm's x_new on the GPU too (the normalized output is the same LayerNorm of the same x_new; its
kernel configuration may differ from the residual kernel's, a rounding-level difference at most).

Order: after ``fuse_norms`` (which creates the residual sites) and ``fuse_gemm_epilogues`` (which turns
ffn.2 into a pre-quantized GEMM); before ``fuse_sibling_gemms`` and ``bake_rcm_sampler`` in a recipe (the
new GEMM is not a sibling candidate; the unrolled graph simply repeats it per step).
Counts: ``fused`` (sites rewritten; ``gated`` of them with a gate), ``quantized`` (of them with the
quantizing norm), ``float_residual`` (sites whose y is not a W8A8 GEMM output: not candidates) and
``unmatched`` (W8A8 y that could not be fused, reason in the notes; an error under ``--strict``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from turbocompile.errors import TurboCompileError
from turbocompile.options import choice
from turbocompile.passbase import Pass, PassResult, register_pass
from turbocompile.passes._graph import mark

__all__ = ["FuseResidualEpilogues"]

_OPS = torch.ops.turbocompile
_PREQUANT = _OPS.w8a8_linear_prequant.default
_FLOAT_IN = _OPS.w8a8_linear.default
_RES = _OPS.residual_ln_modulate.default
_RES_QUANT = _OPS.residual_ln_modulate_quant.default
_RES_BOUND = _OPS.residual_ln_modulate_quant_bound.default
# residual norm -> the plain norm that takes x_new (all arguments after the residual's x, y, gate kept)
_PLAIN_NORM = {
    _RES: _OPS.ln_modulate.default,
    _RES_QUANT: _OPS.ln_modulate_quant.default,
    _RES_BOUND: _OPS.ln_modulate_quant_bound.default,
}


def _fn(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _producer(y) -> tuple[fx.Node | None, str | None]:
    """(the W8A8 GEMM node computing ``y``, None) when it can be fused; (gemm or None, why not) otherwise.

    ``y`` is the GEMM output itself or a ``reshape`` of it; each link must have no other user.
    """
    src = y
    if isinstance(src, fx.Node) and src.op == "call_method" and src.target in ("reshape", "view"):
        src = src.args[0]
    if not _fn(src, _PREQUANT, _FLOAT_IN):
        return None, "y is not a W8A8 GEMM output"
    if len(y.users) != 1 or (src is not y and len(src.users) != 1):
        return src, "the GEMM output has other users"
    return src, None


@register_pass
class FuseResidualEpilogues(Pass):
    """Move ``x + y·gate`` of the fused residual norms into the epilogue of the W8A8 GEMM computing y."""

    name = "fuse_residual_epilogues"
    description = ("x + y·gate of the residual norms in the epilogue of the W8A8 GEMM producing y (o-projections, "
                   "ffn.2): the GEMM reads x and writes x_new, the LayerNorm reads x_new only")
    requires = frozenset({"shapes"})
    provides = frozenset({"residual_epilogues"})
    after = frozenset({"w8a8", "fused_norms", "gemm_epilogues"})
    verify_min_sqnr_db = 40.0  # exact on the torch path; a LayerNorm kernel config may round differently

    @dataclass(frozen=True, kw_only=True)
    class Options:
        backend: str = choice("auto", ("auto", "triton", "torch"), "kernel backend of the fused GEMMs")

    def _call(self, g, target, args, like):
        node = mark(g.call_function(target, tuple(args)), self.name)
        node.meta["nn_module_stack"] = dict(like.meta.get("nn_module_stack", {}))
        return node

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        g = gm.graph
        stats = {"fused": 0, "gated": 0, "quantized": 0, "float_residual": 0, "unmatched": 0}
        notes: list[str] = []
        for node in list(g.nodes):
            if node.graph is not g or not _fn(node, *_PLAIN_NORM):
                continue
            gemm, why = _producer(node.args[1])
            if gemm is None:
                stats["float_residual"] += 1
                continue
            why = why or self._unfusable(node, gemm)
            if why:
                stats["unmatched"] += 1
                notes.append(f"{node.name}: {why}; left unfused")
                continue
            self._rewrite(g, node, gemm)
            stats["fused"] += 1
            stats["gated"] += node.args[2] is not None
            stats["quantized"] += node.target is not _RES
            g.erase_node(node)
            g.eliminate_dead_code()
        if stats["unmatched"] and ctx.strict:
            raise TurboCompileError(f"fuse_residual_epilogues: {stats['unmatched']} residual site(s) left unfused "
                                    f"under --strict: {notes[0]}")
        return PassResult(stats["fused"] > 0, stats, notes[:3])

    @staticmethod
    def _unfusable(node: fx.Node, gemm: fx.Node) -> str | None:
        """Why the site cannot be rewritten (shapes, dtypes, users), or None."""
        x, y = _val(node.args[0]), _val(node.args[1])
        out, inp = _val(gemm), _val(gemm.args[0])
        if x is None or y is None or out is None or inp is None:
            return "no shape information"
        if (x.dtype != out.dtype or tuple(y.shape) != tuple(x.shape) or out.shape[-1] != x.shape[-1]
                or out.numel() != x.numel()):
            return f"GEMM output {tuple(out.shape)} {out.dtype} does not match the residual {tuple(x.shape)} {x.dtype}"
        if x.dim() not in (2, 3):
            return f"residual of rank {x.dim()} (the fused GEMM takes [M, N] or [B, L, N])"
        if any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
            return "an output of the norm is used without getitem"
        return None

    def _rewrite(self, g: fx.Graph, node: fx.Node, gemm: fx.Node) -> None:
        o = self.options
        x, _, gate, w, b, shift, scale, eps = node.args[:8]
        with g.inserting_before(node):
            if gemm.target is _PREQUANT:
                qx, sx, qw, sw, bias, fmt, act, wgran = gemm.args[:8]
            else:  # the dynamic quantization w8a8_linear runs inside, made explicit (same op, same numerics)
                h, qw, sw, bias, fmt, act, wgran = gemm.args[:7]
                h2 = g.call_method("reshape", (h, -1, _val(h).shape[-1]))
                qa = self._call(g, _OPS.quantize_activation.default, (h2, fmt, act, o.backend), gemm)
                qx = g.call_function(operator.getitem, (qa, 0))
                sx = g.call_function(operator.getitem, (qa, 1))
            x_new = self._call(g, _OPS.w8a8_linear_residual.default,
                               (qx, sx, qw, sw, bias, fmt, act, wgran, x, gate, o.backend), gemm)
            x_new.meta["val"] = _val(x)
            # the plain norm: x_new, then every argument after the residual's (x, y, gate), unchanged
            normed = self._call(g, _PLAIN_NORM[node.target], (x_new, w, b, shift, scale, eps, *node.args[8:]), node)
            if node.target is _RES:
                outs = [x_new, normed]
            else:  # (x_new, q, scale[, bound scale]): the norm's outputs one by one
                n_out = 3 if node.target is _RES_QUANT else 4
                outs = [x_new] + [g.call_function(operator.getitem, (normed, i)) for i in range(n_out - 1)]
        for user in list(node.users):
            new = outs[user.args[1]]
            if new is not x_new:
                new.meta["val"] = _val(user)
            user.replace_all_uses_with(new)
            g.erase_node(user)
