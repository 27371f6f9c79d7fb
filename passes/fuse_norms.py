"""Pass ``fuse_norms``: the memory-bound norm sites of every Wan block -> single fused ops.

Sites matched in the captured graph (``wan-architecture.md`` §7), per block:

* ``LN(x)·(1+scale)+shift`` (no-affine LN, AdaLN modulation) before self-attention and the
  FFN, and in the head (float32 output)      -> ``turbocompile::ln_modulate``
* the affine LayerNorm before cross-attention -> ``turbocompile::ln_modulate`` (weight, bias)
* q/k RMSNorm over the full model dim + interleaved 3D RoPE (self-attention), or RMSNorm
  alone (cross-attention q/k)                 -> ``turbocompile::rmsnorm_rope``
* a residual add ``x + y·gate`` (or ``x + y``) feeding one of the LayerNorms above
                                              -> ``turbocompile::residual_ln_modulate`` (one pass over x, y)
* when ``w8a8_linear`` ran first and every consumer of a norm is a W8A8 linear with the same
  activation format, the norm also quantizes: ``*_ln_modulate_quant`` + ``w8a8_linear_prequant``.

Matching is structural on the captured graph's exact op sequence; sites that deviate are
left alone and counted as ``unmatched`` (errors under ``--strict``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from turbocompile.options import choice
from turbocompile.passbase import Pass, PassResult, register_pass
from turbocompile.passes._graph import mark

__all__ = ["FuseNorms"]

_OPS = torch.ops.turbocompile


def _method(n, name: str) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target == name


def _fn(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _only_user(n: fx.Node) -> fx.Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _to_dtype(n) -> torch.dtype | None:
    """dtype of a ``.to(dtype)`` node, else None."""
    if _method(n, "to") and len(n.args) == 2 and isinstance(n.args[1], torch.dtype) and not n.kwargs:
        return n.args[1]
    return None


class _Site:
    """A matched LayerNorm(+modulation) site: replace ``out`` by a fused op over ``x``."""

    def __init__(self, x, weight, bias, shift, scale, eps, out, out_dtype, nodes):
        self.x, self.weight, self.bias, self.shift, self.scale = x, weight, bias, shift, scale
        self.eps, self.out, self.out_dtype, self.nodes = eps, out, out_dtype, nodes


def _match_layer_norm(ln: fx.Node) -> _Site | None:
    """F.layer_norm(x.float(), (D,), [w.float(), b.float()], eps) [.to(dt)] [·(1+scale)+shift [.to(dt)]]."""
    if not _fn(ln, F.layer_norm) or not _method(ln.args[0], "float"):
        return None
    x = ln.args[0].args[0]
    kw = dict(ln.kwargs)
    pos = list(ln.args[2:])
    weight = kw.get("weight", pos[0] if len(pos) > 0 else None)
    bias = kw.get("bias", pos[1] if len(pos) > 1 else None)
    eps = kw.get("eps", pos[2] if len(pos) > 2 else 1e-5)
    nodes = [ln.args[0], ln]
    cur = ln
    out_dtype = torch.float32
    nxt = _only_user(cur)
    if nxt is not None and _to_dtype(nxt) is not None:
        out_dtype = _to_dtype(nxt)
        cur = nxt
        nodes.append(cur)
        nxt = _only_user(cur)
        if nxt is not None and _method(nxt, "float"):  # re-upcast for the float32 modulation
            after = _only_user(nxt)
            if after is not None and _fn(after, operator.mul):
                nodes.append(nxt)
                cur = nxt
                nxt = after
    shift = scale = None
    if nxt is not None and _fn(nxt, operator.mul) and nxt.args[0] is cur:
        one_plus = nxt.args[1]
        add = _only_user(nxt)
        if (_fn(one_plus, operator.add) and one_plus.args[0] == 1 and add is not None
                and _fn(add, operator.add) and add.args[0] is nxt and len(one_plus.users) == 1):
            scale, shift = one_plus.args[1], add.args[1]
            nodes += [one_plus, nxt, add]
            cur = add
            out_dtype = torch.float32
            nxt = _only_user(cur)
            if nxt is not None and _to_dtype(nxt) is not None:
                out_dtype = _to_dtype(nxt)
                cur = nxt
                nodes.append(cur)
        elif nodes[-1].target == "float":
            return None
    elif nodes[-1].op == "call_method" and nodes[-1].target == "float":
        return None
    return _Site(x, weight, bias, shift, scale, float(eps), cur, out_dtype, nodes)


def _match_residual(x: fx.Node, dt: torch.dtype):
    """x = a + y·gate.to(dt)  or  x = a + y  ->  (a, y, gate or None, nodes)."""
    if not _fn(x, operator.add) or len(x.args) != 2:
        return None
    a, rhs = x.args
    if not isinstance(a, fx.Node) or not isinstance(rhs, fx.Node):
        return None
    va, vr = a.meta.get("val"), rhs.meta.get("val")
    if va is None or vr is None or va.dtype != dt or va.shape != vr.shape:
        return None
    if _fn(rhs, operator.mul) and len(rhs.users) == 1 and _to_dtype(rhs.args[1]) == dt \
            and len(rhs.args[1].users) == 1:
        y, gate = rhs.args[0], rhs.args[1].args[0]
        if isinstance(y, fx.Node) and y.meta.get("val") is not None and y.meta["val"].shape == va.shape:
            return a, y, gate, [rhs.args[1], rhs]
    if vr.dtype == dt:
        return a, rhs, None, []
    return None


def _match_rmsnorm(mul_w: fx.Node):
    """(z.float()·rsqrt(mean(z.float()²)+eps)).to(dt) · w  ->  (z, w_node, eps, nodes)."""
    if not _fn(mul_w, operator.mul):
        return None
    t, w = mul_w.args
    dt = _to_dtype(t)
    if dt is None or not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    m = t.args[0]
    if not _fn(m, operator.mul):
        return None
    f, r = m.args
    if not _method(f, "float") or not _fn(r, torch.rsqrt):
        return None
    a = r.args[0]
    if not _fn(a, operator.add) or not isinstance(a.args[1], float):
        return None
    mean = a.args[0]
    if not _method(mean, "mean") or not _method(mean.args[0], "pow") or mean.args[0].args[0] is not f:
        return None
    return f.args[0], w, a.args[1], [f, mean.args[0], mean, a, r, m, t, mul_w]


def _match_rope(u: fx.Node):
    """unflatten(H) -> .float() -> interleaved rotation by (cos, sin) -> .to(dt): returns (end, cos, sin)."""
    fl = _only_user(u)
    if not _method(fl, "float"):
        return None
    pairs = _only_user(fl)
    if not _method(pairs, "unflatten"):
        return None
    parts = sorted(pairs.users, key=lambda n: n.name)
    if len(parts) != 2 or not all(_fn(p, operator.getitem) for p in parts):
        return None
    stack = None
    tables = set()
    for p in parts:
        for mul in p.users:
            if not _fn(mul, operator.mul) or not isinstance(mul.args[1], fx.Node) or mul.args[1].op != "get_attr":
                return None
            tables.add(mul.args[1].target)
            comb = _only_user(mul)
            if not _fn(comb, operator.add, operator.sub):
                return None
            st = _only_user(comb)
            if not _fn(st, torch.stack):
                return None
            stack = stack or st
    flat = _only_user(stack)
    end = _only_user(flat) if _method(flat, "flatten") else None
    if _to_dtype(end) is None or len(tables) != 2:
        return None
    cos = next(t for t in tables if "cos" in t)
    sin = next(t for t in tables if "sin" in t)
    return end, cos, sin


@register_pass
class FuseNorms(Pass):
    """Fuse LayerNorm/AdaLN modulation, RMSNorm+RoPE and gated residuals into single kernels."""

    name = "fuse_norms"
    description = "LN+AdaLN modulate, RMSNorm+RoPE and gated residuals as fused memory-bound kernels"
    requires = frozenset({"shapes"})
    provides = frozenset({"fused_norms"})
    after = frozenset({"w8a8", "sparse_attention"})
    verify_min_sqnr_db = 35.0

    @dataclass(frozen=True, kw_only=True)
    class Options:
        residual: bool = True
        rope: bool = True
        quant_epilogue: bool = True
        # Activation granularities whose quantizer moves into the norm. block128 is left out by
        # default: its 128-row scale blocks need the whole band's statistics before any tile can
        # be quantized, so a fused kernel reads x twice (H200, B1 L75600 D5120: 1.14 ms fused vs
        # 0.72 ms for LN + the standalone quantizer); the norm op now composes exactly that for
        # block128, so opting in changes the graph, not the kernels.
        quant_granularities: tuple[str, ...] = ("per_token",)

        def __post_init__(self):
            bad = [g for g in self.quant_granularities if g not in ("per_token", "block128")]
            if bad:
                raise ValueError(f"quant_granularities: unknown {bad[0]!r}; valid: per_token, block128")
        backend: str = choice("auto", ("auto", "triton", "torch"), "kernel backend")

    # -- helpers -----------------------------------------------------------------------
    def _call(self, gm, target, args, val_from=None):
        node = gm.graph.call_function(target, tuple(args))
        mark(node, self.name)
        if val_from is not None:
            node.meta["nn_module_stack"] = dict(val_from.meta.get("nn_module_stack", {}))
        return node

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        o = self.options
        dt = ctx.dtype
        stats = {"ln_modulate": 0, "ln_affine": 0, "head": 0, "residual": 0, "rmsnorm_rope": 0, "rmsnorm": 0,
                 "quant_epilogue": 0}
        g = gm.graph

        # 1. RMSNorm (+RoPE) on q/k projections.
        for node in list(g.nodes):
            if node.graph is not g or not _fn(node, operator.mul):
                continue
            m = _match_rmsnorm(node)
            if m is None:
                continue
            z, w, eps, _ = m
            u = _only_user(node)
            heads = ctx.model_config.num_heads
            rope = _match_rope(u) if (o.rope and _method(u, "unflatten")) else None
            with g.inserting_before(next(iter(node.users))):
                if rope is not None:
                    end, cos_t, sin_t = rope
                    cos = g.get_attr(cos_t)
                    sin = g.get_attr(sin_t)
                    fused = self._call(gm, _OPS.rmsnorm_rope.default, (z, w, cos, sin, heads, eps, o.backend), node)
                    heads_view = g.call_method("unflatten", (fused, -1, (heads, -1)))
                    heads_view.meta["val"] = end.meta.get("val")
                    end.replace_all_uses_with(heads_view)
                    stats["rmsnorm_rope"] += 1
                else:
                    fused = self._call(gm, _OPS.rmsnorm_rope.default, (z, w, None, None, heads, eps, o.backend), node)
                    fused.meta["val"] = node.meta.get("val")
                    node.replace_all_uses_with(fused)
                    stats["rmsnorm"] += 1
            g.eliminate_dead_code()

        # 2. LayerNorm sites (+ modulation), then the residual add feeding them.
        for node in list(g.nodes):
            if node.graph is not g or not _fn(node, F.layer_norm):
                continue
            site = _match_layer_norm(node)
            if site is None:
                continue
            w = site.weight
            b = site.bias
            res = _match_residual(site.x, dt) if o.residual else None
            with g.inserting_before(site.out):
                if res is not None:
                    a, y, gate, _ = res
                    fused = self._call(gm, _OPS.residual_ln_modulate.default,
                                       (a, y, gate, w, b, site.shift, site.scale, site.eps, site.out_dtype,
                                        o.backend), site.out)
                    new_x = g.call_function(operator.getitem, (fused, 0))
                    h = g.call_function(operator.getitem, (fused, 1))
                    new_x.meta["val"] = site.x.meta.get("val")  # later matches read shapes/dtypes
                    site.x.replace_all_uses_with(new_x, delete_user_cb=lambda u: u not in site.nodes)
                    stats["residual"] += 1
                else:
                    h = self._call(gm, _OPS.ln_modulate.default,
                                   (site.x, w, b, site.shift, site.scale, site.eps, site.out_dtype, o.backend),
                                   site.out)
            h.meta["val"] = site.out.meta.get("val")
            site.out.replace_all_uses_with(h)
            if site.out_dtype == torch.float32 and site.shift is not None:
                stats["head"] += 1
            elif w is not None:
                stats["ln_affine"] += 1
            else:
                stats["ln_modulate"] += 1
            g.eliminate_dead_code()

        # 3. Quantization epilogue for norms consumed only by W8A8 linears.
        if o.quant_epilogue:
            stats["quant_epilogue"] = self._fuse_quant(gm)
        g.eliminate_dead_code()
        modified = any(v for v in stats.values())
        return PassResult(modified, stats)

    def _fuse_quant(self, gm) -> int:
        g = gm.graph
        count = 0
        for node in list(g.nodes):
            is_plain = _fn(node, _OPS.ln_modulate.default)
            if is_plain:
                h = node
            elif _fn(node, operator.getitem) and node.args[1] == 1 and _fn(node.args[0],
                                                                           _OPS.residual_ln_modulate.default):
                h = node
            else:
                continue
            users = list(h.users)
            if not users or not all(_fn(u, _OPS.w8a8_linear.default) and u.args[0] is h for u in users):
                continue
            modes = {tuple(u.args[4:7]) + (u.args[7],) for u in users}
            if len(modes) != 1:
                continue
            fmt, act_gran, w_gran, backend = next(iter(modes))
            if act_gran not in self.options.quant_granularities:
                continue
            val = h.meta.get("val")
            if val is None or val.dim() != 3:
                continue
            seq = val.shape[1]
            with g.inserting_before(users[0]):
                if is_plain:
                    a = list(node.args)
                    q = self._call(gm, _OPS.ln_modulate_quant.default,
                                   (a[0], a[1], a[2], a[3], a[4], a[5], fmt, act_gran, self.options.backend), node)
                    qx = g.call_function(operator.getitem, (q, 0))
                    sx = g.call_function(operator.getitem, (q, 1))
                else:
                    res = node.args[0]
                    a = list(res.args)
                    q = self._call(gm, _OPS.residual_ln_modulate_quant.default,
                                   (*a[:8], fmt, act_gran, self.options.backend), res)
                    new_x = g.call_function(operator.getitem, (q, 0))
                    qx = g.call_function(operator.getitem, (q, 1))
                    sx = g.call_function(operator.getitem, (q, 2))
                    x_old = next((u for u in res.users if u.args[1] == 0), None)
                    if x_old is not None:
                        x_old.replace_all_uses_with(new_x)
            for u in users:
                with g.inserting_before(u):
                    _, qw, sw, bias = u.args[:4]
                    y2 = self._call(gm, _OPS.w8a8_linear_prequant.default,
                                    (qx, sx, qw, sw, bias, fmt, act_gran, w_gran, val.dtype, backend), u)
                    y = g.call_method("reshape", (y2, -1, seq, u.meta["val"].shape[-1]))
                u.replace_all_uses_with(y)
                g.erase_node(u)
            count += 1
            g.eliminate_dead_code()
        return count
