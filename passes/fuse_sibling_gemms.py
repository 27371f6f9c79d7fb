"""Pass ``fuse_sibling_gemms``: W8A8 linears that read the same activation become one wider GEMM.

Horizontal fusion. In every Wan block the self-attention q, k and v projections read the same
normalized (after ``fuse_norms``: the same already-quantized) activation. Three GEMMs of N = dim
become one of N = 3·dim over weights concatenated along N at optimize time:

* fewer launches, and one persistent tile loop instead of three (at Wan-1.3B 480p a dim-wide GEMM
  is 256 × 6 tiles = 11.6 waves on 132 SMs; the fused one, 34.9 waves, wastes less in its last wave);
* each member's output is a ``narrow`` view of the fused ``[M, ΣN]`` output (rows strided by ΣN),
  which its consumers read in place: ``rmsnorm_rope`` and ``sagesla`` take strided rows.

Siblings are ``w8a8_linear_prequant`` nodes with the same (codes, scales) input, or ``w8a8_linear``
nodes with the same float input, with equal format, granularities, output dtype and backend and
weights held as graph constants. With 128×128 weight blocks every member but the last must have
N % 128 == 0 (the block scales are concatenated by rows of blocks). Per output column the fused GEMM
computes exactly what the member's own GEMM did (same codes, same K order, same per-channel scale).

Siblings need not sit in one module: the cross-attention k and v of every block read the same text
embedding and become one GEMM for the whole model (and, for I2V, k_img and v_img of every block, which read
the same image embedding, a second one). Measured on the H200 in a CUDA graph (benchmarks/probe_cross.py):
at Wan2.1-1.3B the 60 cross K/V W8A8 FP8 GEMMs (512 text tokens x 1536 -> 1536, each with its own quantizer
of the same embedding) take 0.535 ms per forward, one quantizer and one GEMM of N = 60 x 1536 take 0.138 ms,
every slice bit-equal; at Wan-14B 2.65 -> 1.89 ms. Cross-attention q (reads the video tokens) and o read
other activations and are never grouped with them.

When it pays: the persistent GEMM walks its tiles in GROUP_M bands, and each band reads the whole weight.
A weight that fits in L2 is read from HBM about once; one that does not is read once per band. On the
H200 (50 MB L2), q/k/v at Wan-1.3B 480p (3 x 2.25 MiB of FP8 codes) run 5% faster fused (0.424 -> 0.402 ms),
at Wan-14B 720p (3 x 25 MiB) 4.7% slower (9.15 -> 9.58 ms; benchmarks/RESULTS.md, session 10). So groups
whose fused weight exceeds ``max_weight_mib`` (default 16) stay apart, reported as ``unfusable`` -- unless
their activation has few rows: with M <= ``small_m_rows`` (default 1024 = BLOCK_M 128 x GROUP_M 8) there is
at most one band, so the weight is streamed once whatever its size (the cross K/V: M = batch x 512 text
tokens, fused weight 135 MiB at 1.3B, 2000 MiB at 14B). M is the traced row count (all but the last dim of
the input); a graph called with a larger batch than it was captured for reads the weight once per 1024 rows.
Cost: the fused output [M, N] stays alive until its last member's consumer (at 14B 512 x 409600 bf16 =
400 MiB for a whole denoiser forward; a baked sampler keeps the cross K/V for the whole call anyway).

Options: ``include`` (module-path globs of the linears that may be fused; default the self-attention
q, k, v (and o, which has no sibling) and the cross-attention k, v, k_img, v_img), ``min_members``,
``max_weight_mib`` and ``small_m_rows``.
Counts: ``groups``, ``fused_linears``, ``unfusable`` (sibling groups left alone, with the reason in the
notes), ``small_m`` (groups fused past ``max_weight_mib`` because M <= ``small_m_rows``; they are also in
``groups``). The fused node records its members' module paths in ``meta["tc_fused_members"]``
(``bake_rcm_sampler`` counts the cross K/V projections by them).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx

from turbocompile.options import globs, number
from turbocompile.passbase import Pass, PassResult, register_pass
from turbocompile.passes._graph import (attr_target, del_attr_if_unused, get_attr_value, mark, matches_any,
                                        module_path, set_attr_value)

__all__ = ["FuseSiblingGemms"]

_OPS = torch.ops.turbocompile
_PREQUANT = _OPS.w8a8_linear_prequant.default
_FLOAT_IN = _OPS.w8a8_linear.default

#: self-attention q, k, v (o has no sibling) and, of every block, the cross-attention k, v (text) and
#: k_img, v_img (I2V image tokens). Not cross-attention q and o: they read other activations.
DEFAULT_INCLUDE = ("blocks.*.self_attn.*", "blocks.*.cross_attn.k", "blocks.*.cross_attn.v",
                   "blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img")


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _sibling_key(n: fx.Node):
    """Hashable key shared by linears that can run as one GEMM, or None when ``n`` is no candidate."""
    if n.op != "call_function" or _val(n) is None:
        return None
    if n.target is _PREQUANT:
        qx, sx, qw, sw, bias, fmt, act, wgran, out_dtype, backend = n.args[:10]
        inputs = (qx, sx)
    elif n.target is _FLOAT_IN:
        x, qw, sw, bias, fmt, act, wgran, backend = n.args[:8]
        inputs, out_dtype = (x,), _val(n).dtype
    else:
        return None
    if attr_target(qw) is None or attr_target(sw) is None or (bias is not None and attr_target(bias) is None):
        return None
    return (n.target, inputs, fmt, act, wgran, out_dtype, backend)


def _rows(n: fx.Node) -> int | None:
    """Activation rows M of a candidate: the product of all but the last dim of its input, or None."""
    v = _val(n.args[0])
    if v is None or not all(isinstance(d, int) for d in v.shape):
        return None
    return math.prod(v.shape[:-1])


def _has_attr(gm: fx.GraphModule, target: str) -> bool:
    try:
        get_attr_value(gm, target)
    except AttributeError:
        return False
    return True


def _weights(n: fx.Node):
    """(qweight, wscale, bias) get_attr nodes of a candidate."""
    return n.args[2:5] if n.target is _PREQUANT else n.args[1:4]


@register_pass
class FuseSiblingGemms(Pass):
    """Run W8A8 linears that share their input (q, k, v; all cross K/V) as one GEMM over concatenated weights."""

    name = "fuse_sibling_gemms"
    description = ("W8A8 linears sharing one input (self-attention q, k, v; every block's cross-attention k, v) "
                   "as one wider GEMM (horizontal fusion)")
    requires = frozenset({"shapes", "w8a8"})
    provides = frozenset({"sibling_gemms"})
    after = frozenset({"w8a8", "fused_norms", "gemm_epilogues", "sparse_attention"})
    verify_min_sqnr_db = 60.0  # per column the same GEMM; only a float reference's blocking may differ

    @dataclass(frozen=True, kw_only=True)
    class Options:
        include: tuple[str, ...] = globs(DEFAULT_INCLUDE, "module paths of linears that may be fused (globs)")
        min_members: int = number(2, min=2, max=16, doc="smallest sibling group worth a fused GEMM")
        max_weight_mib: float = number(16.0, min=0.0, max=1e6,
                                       doc="largest fused weight (MiB of 8-bit codes) still fused; bigger ones stay "
                                           "apart unless M <= small_m_rows")
        small_m_rows: int = number(1024, min=0, max=1 << 30,
                                   doc="groups whose activation has at most this many rows (one GROUP_M band of "
                                       "the persistent GEMM reads the weight once) are fused whatever the weight "
                                       "size; 0: max_weight_mib applies to all")

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        o = self.options
        g = gm.graph
        groups: dict[tuple, list[fx.Node]] = defaultdict(list)
        for n in g.nodes:
            key = _sibling_key(n)
            if key is not None and matches_any(module_path(attr_target(_weights(n)[0])), o.include):
                groups[key].append(n)
        stats = {"groups": 0, "fused_linears": 0, "unfusable": 0, "small_m": 0}
        notes: list[str] = []
        replaced: set[str] = set()  # attributes of the fused members (erase_node clears a node's args)
        for key, members in groups.items():
            if len(members) < o.min_members:
                continue
            why, small_m = self._unfusable(gm, key, members)
            if why:
                stats["unfusable"] += 1
                notes.append(why)
                continue
            if small_m:
                stats["small_m"] += 1
                notes.append(small_m)
            replaced |= {attr_target(w) for m in members for w in _weights(m)} - {None}
            self._fuse(gm, key, members)
            stats["groups"] += 1
            stats["fused_linears"] += len(members)
        if stats["groups"]:
            g.eliminate_dead_code()  # the members' get_attr nodes
            for t in sorted(replaced):
                if _has_attr(gm, t):  # skip one already gone (e.g. removed with its parent module)
                    del_attr_if_unused(gm, t)
        return PassResult(stats["groups"] > 0, stats, notes[:3])

    def _unfusable(self, gm, key, members) -> tuple[str | None, str | None]:
        """(why the group stays apart or None, a note when only the small-M rule lets it fuse or None)."""
        o = self.options
        wgran = key[4]
        qws = [get_attr_value(gm, attr_target(_weights(m)[0])) for m in members]
        ns = [w.shape[0] for w in qws]
        mib = sum(w.numel() * w.element_size() for w in qws) / 2**20
        small_m = None
        if mib > o.max_weight_mib:
            rows = _rows(members[0])  # siblings share their input, so one member tells M
            if rows is None or rows > o.small_m_rows:
                m_txt = "" if rows is None else f" and M = {rows} rows > small_m_rows {o.small_m_rows}"
                return (f"{members[0].name}: the fused weight would hold {mib:.1f} MiB > max_weight_mib "
                        f"{o.max_weight_mib:g}{m_txt}"), None
            small_m = (f"{members[0].name}: {len(members)} linears fused, {mib:.1f} MiB > max_weight_mib "
                       f"{o.max_weight_mib:g} but M = {rows} rows <= small_m_rows {o.small_m_rows} "
                       "(one GROUP_M band reads the weight once)")
        if wgran == "block128" and any(n % 128 for n in ns[:-1]):
            return (f"{members[0].name}: 128x128 weight blocks need every member but the last to have N % 128 == 0 "
                    f"(N = {ns})"), None
        biases = [_weights(m)[2] for m in members]
        dtypes = {get_attr_value(gm, attr_target(b)).dtype for b in biases if b is not None}
        if len(dtypes) > 1:
            return f"{members[0].name}: the members' biases have different dtypes {sorted(map(str, dtypes))}", None
        return None, small_m

    def _fuse(self, gm: fx.GraphModule, key, members: list[fx.Node]) -> None:
        g = gm.graph
        paths = [module_path(attr_target(_weights(m)[0])) for m in members]
        parent = paths[0].rsplit(".", 1)[0] if all("." in p for p in paths) else ""
        same_parent = all(p.rsplit(".", 1)[0] == parent for p in paths)
        leaves = [p.rsplit(".", 1)[-1] for p in paths]
        if same_parent:
            base = (parent + "." if parent else "") + "fused_" + "_".join(leaves)
        else:  # e.g. the cross-attention k, v of every block (they all read the text embedding)
            base = f"fused_{paths[0].replace('.', '_')}_and_{len(members) - 1}_more"
        qws = [get_attr_value(gm, attr_target(_weights(m)[0])) for m in members]
        sws = [get_attr_value(gm, attr_target(_weights(m)[1])) for m in members]
        ns = [w.shape[0] for w in qws]
        bias_nodes = [_weights(m)[2] for m in members]
        bias = None
        if any(b is not None for b in bias_nodes):
            like = next(get_attr_value(gm, attr_target(b)) for b in bias_nodes if b is not None)
            bias = torch.cat([get_attr_value(gm, attr_target(b)) if b is not None
                              else torch.zeros(n, dtype=like.dtype, device=like.device)
                              for b, n in zip(bias_nodes, ns)])
        set_attr_value(gm, f"{base}.qweight", torch.cat(qws, 0).contiguous())
        set_attr_value(gm, f"{base}.wscale", torch.cat(sws, 0).contiguous())
        if bias is not None:
            set_attr_value(gm, f"{base}.bias", bias)
        first = members[0]
        with g.inserting_before(first):
            qn = mark(g.get_attr(f"{base}.qweight"), self.name)
            sn = mark(g.get_attr(f"{base}.wscale"), self.name)
            bn = mark(g.get_attr(f"{base}.bias"), self.name) if bias is not None else None
            if first.target is _PREQUANT:
                args = (*first.args[:2], qn, sn, bn, *first.args[5:10])
            else:
                args = (first.args[0], qn, sn, bn, *first.args[4:8])
            fused = mark(g.call_function(first.target, args), self.name)
            fused.meta["nn_module_stack"] = dict(first.meta.get("nn_module_stack", {}))
            fused.meta["tc_fused_members"] = list(paths)  # what it computes, for later passes' bookkeeping
            off = 0
            views = []
            for m, n in zip(members, ns):
                v = g.call_method("narrow", (fused, -1, off, n))
                v.meta["val"] = _val(m)
                views.append(v)
                off += n
        for m, v in zip(members, views):
            m.replace_all_uses_with(v)
            g.erase_node(m)
