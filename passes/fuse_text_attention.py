"""Pass ``fuse_text_attention``: Wan's cross-attention between its q and o projections as one kernel.

After ``w8a8_linear`` and ``fuse_norms`` (and, if present, ``merge_padding_keys``) every block's
cross-attention is, per video token,

    q GEMM -> rmsnorm_rope(z, w, no RoPE) -> attention over the text keys -> flatten heads
           -> w8a8_linear (o projection: quantize per token, GEMM)

which moves the token's row five times through HBM between the two GEMMs (norm in/out, attention
in/out, quantizer in) besides the codes. This pass replaces the chain with

    q GEMM -> norm_attention_quant(z, w, k, v, value_bound(v), tail_start) -> w8a8_linear_prequant (o proj.)

where ``torch.ops.turbocompile.norm_attention_quant`` reads z, normalizes, attends (to every key, or
to the tail-merged keys of ``merge_padding_keys``) and writes the FP8 codes and scales that the o
projection's GEMM consumes. ``value_bound(v)`` (max |v| per sample) depends on the text only, so the
baked sampler computes it once per call.

Numerics: q and the attention output are rounded to the activation dtype as the unfused graph stores
them; the attention kernel's own rounding (P in the value dtype) differs from SDPA's in the last bits.
The codes' scale is ``max|v| / 448`` per sample instead of each token's abs-max / 448: every attention
output is a convex combination of value rows, so it never exceeds max|v|, and e4m3 being a
floating-point format, a larger scale keeps the relative precision of every value above its smallest
normal (2^-6 · max|v| / 448). That argument fails for INT8's uniform grid, so only FP8 o projections
are fused (INT8 ones are reported and left as is).

The q RMSNorm's statistic (option ``sumsq_from_gemm``, off by default): the fused op's first kernel re-reads
all of z only for ``rstd = rsqrt(mean(z²) + eps)`` per token. With the option, when z is the reshaped output of a
per-token x per-channel ``w8a8_linear_prequant`` used by nothing else, that GEMM becomes
``w8a8_linear_prequant_sumsq``, whose epilogue also writes the sums of squares of the stored z per 128 columns,
and they reach ``norm_attention_quant`` as its ``sumsq`` argument: no rstd pass over z. z is the same tensor; the
statistic is summed in another fp32 order, so q may differ in a rare last-bit rounding (H100: 4e-6 of the codes).
Off by default because it does not pay across model sizes (RESULTS.md session 27, H100, 100-token prompt, q GEMM
+ fused op per layer): Wan-1.3B 0.327 -> 0.314 ms, Wan-14B 4.21 -> 4.43 ms. The epilogue's granule sums slow the
q GEMM by 12% / 23%, and each head's program re-reading the row's sums costs the fused op more than the rstd
pass at 14B (attention kernel alone with a given rstd: 1.07 ms; with the sums: 1.46 ms; with the pass: 1.33 ms).

Matched sites: a per-token ``w8a8_linear`` whose input is the heads-flattened output of an attention
(the captured ``transpose/SDPA/transpose`` pattern without mask or scale, or ``tail_merged_attention``)
whose q is a RoPE-less ``rmsnorm_rope`` of a projection, each intermediate used only by the next.
Self-attention has RoPE (and becomes SageSLA), so only cross-attention matches; Wan2.1 I2V's
cross-attention adds an image-key attention before the o projection and does not match either.
Counts: ``fused`` (sites rewritten), ``sumsq_from_gemm`` (of those, sites whose RMSNorm statistic comes from
the q GEMM's epilogue) and ``unmatched`` (near misses, with the reason in the notes).

Measured (RESULTS.md session 26, ``benchmarks/bench_text_attention.py``, 100-token prompt, per layer): 0.196 ms
against 0.265 ms unfused with merged keys and 0.310 ms with cuDNN over all 512 keys (H100, Wan-1.3B); 1.34 /
1.84 / 2.25 ms at Wan-14B. Over all 512 keys (a prompt with no padding) the fused op takes 0.383 ms, slower
than cuDNN: break-even near 350 real tokens. 4-step 1.3B sampling with ``merge_padding_keys``: 528.3 -> 519.5 ms.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from turbocompile.options import choice
from turbocompile.passbase import Pass, PassResult, leave_site, register_pass
from turbocompile.passes._graph import captured_attention, is_transpose_12, mark, single_user, site_name

__all__ = ["FuseTextAttention"]

_OPS = torch.ops.turbocompile
_HALF = (torch.bfloat16, torch.float16)


def _attention_of(x: fx.Node):
    """``(q, k, v, tail_start | None)`` when ``x`` is ``flatten(attention, 2)`` (heads flattened), else None."""
    if not (x.op == "call_method" and x.target == "flatten" and tuple(x.args[1:]) == (2,) and not x.kwargs):
        return None
    att = x.args[0]
    if not isinstance(att, fx.Node) or single_user(att) is not x:
        return None
    if att.op == "call_function" and att.target is _OPS.tail_merged_attention.default:
        q, k, v, tail = att.args[:4]
        return q, k, v, tail
    if is_transpose_12(att):
        sdpa = att.args[0]
        matched = captured_attention(sdpa) if isinstance(sdpa, fx.Node) else None
        if matched is not None and matched[3] is att:
            q, k, v, _ = matched
            return q, k, v, None
    return None


def _normed_q(q: fx.Node):
    """``(z, weight, num_heads, eps)`` when q is ``unflatten(rmsnorm_rope(z, w, None, None, H, eps), -1, (H, -1))``
    and each of the two nodes has one user, else None."""
    if not (isinstance(q, fx.Node) and q.op == "call_method" and q.target == "unflatten" and len(q.args) == 3):
        return None
    norm, dim, sizes = q.args
    if dim != -1 or not isinstance(norm, fx.Node) or single_user(norm) is not q:
        return None
    if not (norm.op == "call_function" and norm.target is _OPS.rmsnorm_rope.default):
        return None
    z, w, cos, sin, heads, eps = norm.args[:6]
    if cos is not None or sin is not None or tuple(sizes) != (heads, -1):
        return None
    return z, w, heads, eps


def _sumsq_gemm(z: fx.Node) -> fx.Node | None:
    """The ``w8a8_linear_prequant`` node whose [M, D] output z reshapes to [B, L, D], when that GEMM can write
    z's granule sums of squares (per-token x per-channel, INT8 or FP8) and nothing but z reads its output,
    nor anything but the q norm reads z (its one user, replaced by the fused op); else None."""
    if not (isinstance(z, fx.Node) and z.op == "call_method" and z.target in ("reshape", "view")
            and len(z.users) == 1):
        return None
    gemm = z.args[0]
    if not (isinstance(gemm, fx.Node) and gemm.op == "call_function"
            and gemm.target is _OPS.w8a8_linear_prequant.default and single_user(gemm) is z):
        return None
    fmt, act_gran, w_gran = gemm.args[5:8]
    if fmt not in ("int8", "fp8") or act_gran != "per_token" or w_gran != "per_channel":
        return None
    # rows of z must be rows of the GEMM output: same last dim (a reshape that keeps it keeps the rows)
    y, zv = gemm.meta.get("val"), z.meta.get("val")
    if y is None or zv is None or y.dim() != 2 or zv.dim() != 3 or y.shape[1] != zv.shape[2]:
        return None
    return gemm


@register_pass
class FuseTextAttention(Pass):
    """Cross-attention q RMSNorm + attention + the o projection's quantizer as one kernel."""

    name = "fuse_text_attention"
    description = "cross-attention: q RMSNorm, attention and the o projection's FP8 quantizer fused"
    requires = frozenset({"shapes", "w8a8", "fused_norms"})
    provides = frozenset({"fused_text_attention"})
    after = frozenset({"merged_padding_keys"})
    # quantized codes of a kernel whose attention rounds P like SDPA's flash kernels, not like the reference
    verify_min_sqnr_db = 25.0

    @dataclass(frozen=True, kw_only=True)
    class Options:
        backend: str = choice("auto", ("auto", "triton", "torch"), "kernel backend")
        sumsq_from_gemm: bool = dataclasses.field(
            default=False, metadata={"doc": "take the q RMSNorm's sums of squares from the q GEMM's epilogue "
                                           "(w8a8_linear_prequant_sumsq) instead of a pass over z"})

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        g = gm.graph
        stats = {"fused": 0, "sumsq_from_gemm": 0, "unmatched": 0}
        notes: list[str] = []
        for u in list(g.nodes):
            if u.op != "call_function" or u.target is not _OPS.w8a8_linear.default:
                continue
            x, qw, sw, bias, fmt, act_gran, w_gran, backend = u.args[:8]
            site = _attention_of(x) if isinstance(x, fx.Node) and single_user(x) is u else None
            if site is None:
                continue  # not an attention's o projection
            q, k, v, tail = site
            normed = _normed_q(q)
            if normed is None:
                continue  # q without its own RMSNorm (or with RoPE: self-attention)
            z, w, heads, eps = normed
            where = site_name(u)
            val = u.meta.get("val")
            if fmt != "fp8" or act_gran != "per_token":
                leave_site(ctx, stats, notes, f"{where}: o projection is {fmt} {act_gran}; the fused kernel "
                                              "writes FP8 codes with per-token scales only; left as is")
                continue
            if ctx.dtype not in _HALF or val is None or val.dim() != 3:
                leave_site(ctx, stats, notes, f"{where}: needs a bf16/fp16 graph with a [B, L, N] o projection "
                                              f"(got {ctx.dtype}); left as is")
                continue
            sumsq = self._sumsq_from_gemm(g, z) if self.options.sumsq_from_gemm else None
            extra = () if sumsq is None else (sumsq,)  # without it, the 9-argument call of older graphs
            with g.inserting_before(u):
                bound = mark(g.call_function(_OPS.value_bound.default, (v,)), self.name)
                fused = mark(g.call_function(_OPS.norm_attention_quant.default,
                                             (z, w, k, v, bound, tail, heads, eps, self.options.backend, *extra)),
                             self.name)
                for n in (bound, fused):
                    n.meta["nn_module_stack"] = dict(u.meta.get("nn_module_stack", {}))
                qx = g.call_function(operator.getitem, (fused, 0))
                sx = g.call_function(operator.getitem, (fused, 1))
                y2 = mark(g.call_function(_OPS.w8a8_linear_prequant.default,
                                          (qx, sx, qw, sw, bias, fmt, act_gran, w_gran, val.dtype, backend)),
                          self.name)
                y2.meta["nn_module_stack"] = dict(u.meta.get("nn_module_stack", {}))
                y = g.call_method("reshape", (y2, -1, val.shape[1], val.shape[2]))
                y.meta["val"] = val
            u.replace_all_uses_with(y)
            g.erase_node(u)
            stats["fused"] += 1
            stats["sumsq_from_gemm"] += sumsq is not None
        g.eliminate_dead_code()  # the replaced chains (flatten, attention, transposes, q norm)
        return PassResult(stats["fused"] > 0, stats, notes)

    def _sumsq_from_gemm(self, g: fx.Graph, z: fx.Node) -> fx.Node | None:
        """Replace the q GEMM producing z (see :func:`_sumsq_gemm`) by ``w8a8_linear_prequant_sumsq`` with the
        same arguments; returns its sumsq output node, or None (z left as it is) when the site does not fit."""
        gemm = _sumsq_gemm(z)
        if gemm is None:
            return None
        with g.inserting_before(gemm):
            both = mark(g.call_function(_OPS.w8a8_linear_prequant_sumsq.default, tuple(gemm.args),
                                        dict(gemm.kwargs)), self.name)
            both.meta["nn_module_stack"] = dict(gemm.meta.get("nn_module_stack", {}))
            y = g.call_function(operator.getitem, (both, 0))
            y.meta["val"] = gemm.meta["val"]
            sumsq = g.call_function(operator.getitem, (both, 1))
        gemm.replace_all_uses_with(y)
        g.erase_node(gemm)
        return sumsq
