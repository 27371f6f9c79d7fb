"""Pass ``fuse_gemm_epilogues``: W8A8 GEMM -> GELU(tanh) [-> W8A8 linear] as one GEMM with an epilogue.

Matched in every Wan block's FFN (``ffn.0 -> GELU(approximate="tanh") -> ffn.2``) after
``w8a8_linear`` (and ``fuse_norms``, whose quantizing norm turns ffn.0 into
``w8a8_linear_prequant(...).reshape(B, L, N)``):

* producer: ``w8a8_linear(x, ...)`` (x is then quantized by ``quantize_activation`` explicitly) or
  ``w8a8_linear_prequant(qx, sx, ...)`` [-> ``reshape``], each with the GELU as only user;
* ``gelu(approximate="tanh")``                  -> ``turbocompile::w8a8_linear_gelu`` (bf16 out);
* when option ``quant_epilogue`` is on and EVERY user of the GELU is a ``w8a8_linear`` with per-token
  activations and one format: the GELU output is quantized by the fused op
  (``turbocompile::w8a8_linear_gelu_quant`` -> (q, scale)) and those users become
  ``w8a8_linear_prequant`` on it (no standalone quantizer, no bf16 GELU pass). Option
  ``quant_scale``: "amax" (default, the consumers' own per-token quantizer, bit for bit), "pow2":
  FP8 consumers get power-of-two per-token scales (``out_scale="pow2"`` of the fused op: on Hopper
  the GEMM then writes FP8 codes instead of bf16 h), or "bound": power-of-two scales from an upper
  bound of each row known before the GEMM (``out_scale="bound"``: the epilogue writes the final FP8
  codes; the weight's bound constants ``[C, b]`` are computed here, once, and stored beside the weight
  as ``<module>.gelu_bound``). INT8 consumers keep "amax", "bound" also needs per-token activations
  (notes say so).
* "bound" with option ``bound_in_norm`` (default on): when ffn.0's input ``(qx, sx)`` comes straight from
  a fused quantizing LayerNorm (``ln_modulate_quant`` / ``residual_ln_modulate_quant``, FP8 per token, as
  ``fuse_norms`` leaves the FFN's pre-norm), that norm becomes its ``*_ln_modulate_quant_bound`` variant,
  which also writes the bound scales from the codes still in its registers, and the GEMM becomes
  ``turbocompile::w8a8_linear_gelu_quant_rowscale(qx, sx, ..., row_scale)``: the separate row-bound
  kernel, which re-read all of qx (M×K bytes), is gone; nothing else changes. Codes and scales are the
  same (bit for bit on the torch backend; on Triton the squares are summed in another order, so a row's
  exponent can differ only where its bound lies within a few fp32 ulps of a power-of-two multiple of 448,
  as between the row-bound kernel and the reference). Elsewhere (input from ``quantize_activation``, the
  norm's codes shared with another bound GEMM) the row-bound kernel stays.

Counts: ``gelu`` (GEMM+GELU fused, bf16 out), ``gelu_quant`` (GEMM+GELU+quantize fused),
``bound_from_norm`` (of them "bound" sites whose row scales the norm writes),
``prequant_consumers`` (linears switched to the pre-quantized input), ``unmatched`` (tanh GELUs fed by
a W8A8 GEMM that could not be fused, e.g. the GEMM output has other users; an error under
``--strict``) and ``float_gelu`` (GELUs after float linears, e.g. the text embedding: not candidates).
Numerics: the torch backend reproduces the unfused graph bit for bit; the Triton kernel applies the
GELU to the fp32 accumulator (one rounding instead of two), a bf16-rounding-level difference.
With ``quant_scale: pow2`` the torch backend equals the unfused graph with ffn.2's activation quantized
by ``ref.quantize_pow2_ref`` instead (a different FP8 scale: FP8-rounding-level change); with "bound" at
the scale of ``ref.row_bound_scale_ref`` (larger than the row's amax, which only moves its smallest
values toward e4m3 subnormals).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from turbocompile.errors import TurboCompileError
from turbocompile.options import choice
from turbocompile.passbase import Pass, PassResult, register_pass
from turbocompile.kernels.w8a8.ref import gelu_bound_constants_ref
from turbocompile.passes._graph import attr_target, get_attr_value, mark, module_path, set_attr_value

__all__ = ["FuseGemmEpilogues"]

_OPS = torch.ops.turbocompile
_GELU_TARGETS = (F.gelu, torch._C._nn.gelu, torch.ops.aten.gelu.default)
# quantizing norm -> (its variant that also writes the bound row scales, index of its codes output)
_BOUND_NORMS = {
    _OPS.ln_modulate_quant.default: (_OPS.ln_modulate_quant_bound.default, 0),
    _OPS.residual_ln_modulate_quant.default: (_OPS.residual_ln_modulate_quant_bound.default, 1),
}


def _fn(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _is_tanh_gelu(n) -> bool:
    if not _fn(n, *_GELU_TARGETS):
        return False
    approx = n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
    return approx == "tanh"


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


@register_pass
class FuseGemmEpilogues(Pass):
    """Fuse GELU (tanh) and the next linear's per-token quantization into the W8A8 GEMM epilogue."""

    name = "fuse_gemm_epilogues"
    description = "W8A8 GEMM + GELU(tanh) epilogue, optionally emitting the next linear's int8/fp8 input"
    requires = frozenset({"shapes"})
    provides = frozenset({"gemm_epilogues"})
    after = frozenset({"w8a8", "fused_norms"})
    verify_min_sqnr_db = 35.0  # bf16-rounding-level changes only (measured far above: see tests)

    @dataclass(frozen=True, kw_only=True)
    class Options:
        quant_epilogue: bool = True
        quant_scale: str = choice("amax", ("amax", "pow2", "bound"),
                                  "per-token scale of the fused FP8 quantization: amax/448, a power of two "
                                  "covering the amax, or one covering a bound known before the GEMM")
        bound_in_norm: bool = field(
            default=True, metadata={"doc": "quant_scale bound: the fused norm that quantizes ffn.0's input also "
                                           "writes the bound row scales (no row-bound kernel re-reading it)"})
        backend: str = choice("auto", ("auto", "triton", "torch"), "kernel backend of the fused ops")

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.quant_scale in ("pow2", "bound"):
            # ffn.2's input quantized on another FP8 grid: a quantizing change, not a rounding one
            # (wan-tiny turbo-fp8: 39.3 dB vs the amax graph); the floor of such changes, as w8a8_linear's 20
            self.verify_min_sqnr_db = 25.0

    def _call(self, g, target, args, like=None):
        node = g.call_function(target, tuple(args))
        mark(node, self.name)
        if like is not None:
            node.meta["nn_module_stack"] = dict(like.meta.get("nn_module_stack", {}))
        return node

    def _scale_args(self, gm, gelu, cfmt, act, qw, sw, bias, wgran, notes) -> tuple:
        """The fused op's arguments after ``backend`` for option quant_scale (none for "amax", so default
        graphs keep the 11-argument call)."""
        scale = self.options.quant_scale
        if scale == "amax":
            return ()
        if cfmt != "fp8":
            notes.append(f"{gelu.name}: quant_scale={scale} applies to FP8 consumers; '{cfmt}' keeps amax")
            return ()
        if scale == "pow2":
            return ("pow2",)
        if act != "per_token":
            notes.append(f"{gelu.name}: quant_scale=bound needs per-token activations ('{act}'); pow2 instead")
            return ("pow2",)
        targets = [attr_target(n) for n in (qw, sw)] + ([attr_target(bias)] if bias is not None else [])
        if None in targets:  # the bound constants cannot be folded: pow2 (no per-call float64 weight pass)
            notes.append(f"{gelu.name}: quant_scale=bound needs constant weights; pow2 instead")
            return ("pow2",)
        wq, ws = get_attr_value(gm, targets[0]), get_attr_value(gm, targets[1])
        wb = gelu_bound_constants_ref(wq, ws, get_attr_value(gm, targets[2]) if bias is not None else None, wgran)
        target = f"{module_path(targets[0])}.gelu_bound"
        set_attr_value(gm, target, wb)
        return ("bound", mark(gm.graph.get_attr(target), self.name))

    def _bound_norm(self, qx, sx) -> fx.Node | None:
        """The fused quantizing norm whose outputs are exactly ``(qx, sx)`` (FP8 codes and per-token scales,
        positional arguments as ``fuse_norms`` emits them), or None."""
        if not (_fn(qx, operator.getitem) and _fn(sx, operator.getitem)) or qx.args[0] is not sx.args[0]:
            return None
        norm = qx.args[0]
        if not _fn(norm, *_BOUND_NORMS) or norm.kwargs:
            return None
        first = _BOUND_NORMS[norm.target][1]
        if (qx.args[1], sx.args[1]) != (first, first + 1) or tuple(norm.args[-3:-1]) != ("fp8", "per_token"):
            return None
        return norm

    def _fold_bound_into_norm(self, g: fx.Graph, norm: fx.Node, wb: fx.Node) -> fx.Node:
        """Swap ``norm`` for its ``*_bound`` variant reading the constants ``wb`` (same arguments, ``wbound``
        before ``backend``; the same outputs plus one): returns the node of its bound row scales."""
        target, first = _BOUND_NORMS[norm.target]
        norm.prepend(wb)  # the constant must be defined before the norm reads it
        with g.inserting_before(norm):
            new = g.call_function(target, (*norm.args[:-1], wb, norm.args[-1]))
        new.meta.update({k: v for k, v in norm.meta.items() if k in ("nn_module_stack", "tc_from")})
        mark(new, self.name)
        norm.replace_all_uses_with(new)
        g.erase_node(norm)
        with g.inserting_after(new):
            return g.call_function(operator.getitem, (new, first + 2))

    def _producer(self, gelu: fx.Node):
        """(gemm node, nodes to drop) when the GELU's input is a fusable W8A8 GEMM, else None."""
        src = gelu.args[0]
        chain = []
        if isinstance(src, fx.Node) and src.op == "call_method" and src.target == "reshape":
            if len(src.users) != 1:
                return None
            chain.append(src)
            src = src.args[0]
        if not _fn(src, _OPS.w8a8_linear.default, _OPS.w8a8_linear_prequant.default) or len(src.users) != 1:
            return None
        return src, chain

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        o = self.options
        g = gm.graph
        stats = {"gelu": 0, "gelu_quant": 0, "bound_from_norm": 0, "prequant_consumers": 0, "unmatched": 0,
                 "float_gelu": 0}
        notes: list[str] = []
        for gelu in list(g.nodes):
            if gelu.graph is not g or not _is_tanh_gelu(gelu):
                continue
            src = gelu.args[0]
            if isinstance(src, fx.Node) and src.op == "call_method" and src.target == "reshape":
                src = src.args[0]
            if not _fn(src, _OPS.w8a8_linear.default, _OPS.w8a8_linear_prequant.default):
                stats["float_gelu"] += 1
                continue
            prod = self._producer(gelu)
            gval = _val(gelu)
            if prod is None or gval is None or gval.dim() < 2:
                stats["unmatched"] += 1
                notes.append(f"{gelu.name}: the GEMM output has other users or no shape; left unfused")
                continue
            gemm, _ = prod
            n_out = gval.shape[-1]
            with g.inserting_before(gelu):
                if gemm.target is _OPS.w8a8_linear_prequant.default:
                    qx, sx, qw, sw, bias, fmt, act, wgran, out_dtype, _be = gemm.args[:10]
                else:
                    x, qw, sw, bias, fmt, act, wgran, _be = gemm.args[:8]
                    out_dtype = _val(gemm).dtype
                    k = _val(x).shape[-1]
                    x2 = g.call_method("reshape", (x, -1, k))
                    qa = self._call(g, _OPS.quantize_activation.default, (x2, fmt, act, o.backend), gemm)
                    qx = g.call_function(operator.getitem, (qa, 0))
                    sx = g.call_function(operator.getitem, (qa, 1))
                users = list(gelu.users)
                all_w8a8 = bool(users) and all(_fn(u, _OPS.w8a8_linear.default) and u.args[0] is gelu
                                               and len(u.args) >= 8 and _val(u) is not None for u in users)
                modes = {tuple(u.args[4:8]) for u in users} if all_w8a8 else set()
                quant = o.quant_epilogue and len(modes) == 1 and next(iter(modes))[1] == "per_token"
                if quant:
                    cfmt, _, cwgran, cbackend = next(iter(modes))
                    scale_args = self._scale_args(gm, gelu, cfmt, act, qw, sw, bias, wgran, notes)
                    norm = self._bound_norm(qx, sx) if scale_args[:1] == ("bound",) and o.bound_in_norm else None
                    if norm is not None:  # the norm writes the bound scales: the GEMM takes them
                        s = self._fold_bound_into_norm(g, norm, scale_args[1])
                        q = self._call(g, _OPS.w8a8_linear_gelu_quant_rowscale.default,
                                       (qx, sx, qw, sw, bias, fmt, act, wgran, out_dtype, s, o.backend), gemm)
                        stats["bound_from_norm"] += 1
                    else:
                        if scale_args[:1] == ("bound",) and o.bound_in_norm:
                            notes.append(f"{gelu.name}: quant_scale=bound: ffn.0's input is not an FP8 per-token "
                                         "fused norm's output; its bound scales take the row-bound kernel")
                        fargs = (qx, sx, qw, sw, bias, fmt, act, wgran, out_dtype, cfmt, o.backend) + scale_args
                        fused = self._call(g, _OPS.w8a8_linear_gelu_quant.default, fargs, gemm)
                        q = g.call_function(operator.getitem, (fused, 0))
                        s = g.call_function(operator.getitem, (fused, 1))
                else:
                    fused = self._call(g, _OPS.w8a8_linear_gelu.default,
                                       (qx, sx, qw, sw, bias, fmt, act, wgran, out_dtype, o.backend), gemm)
                    h = g.call_method("reshape", (fused, -1, *gval.shape[1:]))
                    h.meta["val"] = gval
            if quant:
                for u in users:
                    uval = _val(u)
                    with g.inserting_before(u):
                        _, uqw, usw, ubias = u.args[:4]
                        y2 = self._call(g, _OPS.w8a8_linear_prequant.default,
                                        (q, s, uqw, usw, ubias, cfmt, "per_token", cwgran, uval.dtype, cbackend), u)
                        y = g.call_method("reshape", (y2, -1, *uval.shape[1:]))
                        y.meta["val"] = uval
                    u.replace_all_uses_with(y)
                    g.erase_node(u)
                    stats["prequant_consumers"] += 1
                stats["gelu_quant"] += 1
            else:
                gelu.replace_all_uses_with(h)
                stats["gelu"] += 1
            g.erase_node(gelu)
            g.eliminate_dead_code()
        if stats["unmatched"] and ctx.strict:
            raise TurboCompileError(f"fuse_gemm_epilogues: {stats['unmatched']} GELU site(s) left unfused under "
                                    f"--strict: {notes[0]}")
        modified = bool(stats["gelu"] or stats["gelu_quant"])
        return PassResult(modified, stats, notes[:3])
