"""Pass ``fuse_attention_pooling``: SageSLA's pooling kernel folded into the q/k RMSNorm+RoPE kernels.

Before its attention kernel, SageSLA pools q, k and v (`kernels/sagesla/triton_prep`, pass A): the
mean of q's rows per query block, the sum of k's rows per key block, the |v| channel maxima. That
kernel re-reads q, k and v (Wan2.1-1.3B 480p on an H200: 3.2 ms of a 136 ms forward). The q and k
RMSNorm+RoPE kernels (``turbocompile::rmsnorm_rope``, from ``fuse_norms``) already read and write
exactly those rows, so this pass swaps them for ``turbocompile::rmsnorm_rope_pool``, which also
accumulates the block statistics (the k kernel reads v's rows of each key block too), and hands
them to the ``turbocompile::sagesla`` node (``q_pool``, ``k_blocksum``, ``v_absmax``), whose Triton
path then launches no pooling kernel. The statistics are computed from the same stored q/k values,
so only the fp32 summation order differs from pass A (on the torch backend nothing changes: the
reference recomputes them).

Matched per ``sagesla`` node: q and k are, through reshape/view/unflatten/flatten nodes only, the
outputs of ``rmsnorm_rope`` nodes with no other users (every node of the chain has one user), with
the same head count as the attention; v is a view of a ``[B, L, H·D]`` node (the v projection, or
its narrow slice of a fused q/k/v GEMM). Then q's node pools with ``pool_rows = block_q`` (means),
k's with ``pool_rows = block_k`` (sums) and v. Sites that deviate (e.g. a float32 graph, where q, k
and v reach the op through bf16 casts) are left alone and counted ``unmatched`` (errors under
``--strict``).

Dense sites (topk keeps every key block, e.g. topk 1.0): the q means only feed the block map, which
dense attention does not build, so q keeps its plain ``rmsnorm_rope`` and only k (with v) pools;
``q_pool`` stays None (the op accepts that for dense attention only). Counted in ``fused`` and
again in ``dense``.

Runs after ``fuse_norms`` and ``sagesla_attention`` (``after``); recipes list it before
``fuse_sibling_gemms`` (whose narrow q/k/v views the pooling kernel reads in place) and
``bake_rcm_sampler``.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from turbocompile.passbase import Pass, PassResult, leave_site, register_pass
from turbocompile.passes._graph import mark

__all__ = ["FuseAttentionPooling"]

_OPS = torch.ops.turbocompile
_VIEW_METHODS = frozenset({"reshape", "view", "unflatten", "flatten"})
_VIEW_FUNCTIONS = frozenset({torch.reshape, torch.flatten, torch.unflatten})
_N_SAGESLA_ARGS = 10  # q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant, backend


def _is_view(n) -> bool:
    """A node that only reshapes its first argument (row-major order kept: no data movement)."""
    if not isinstance(n, fx.Node) or not n.args:
        return False
    return ((n.op == "call_method" and n.target in _VIEW_METHODS)
            or (n.op == "call_function" and n.target in _VIEW_FUNCTIONS))


def _shape(n) -> tuple | None:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _view_chain(n: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """(root, chain): walk n back through view nodes; chain runs from root's user down to n."""
    chain = []
    while _is_view(n):
        chain.append(n)
        n = n.args[0]
    return n, chain[::-1]


def _norm_source(arg, heads: int) -> tuple[fx.Node, list[fx.Node]] | str:
    """The rmsnorm_rope node (and the view chain) behind a sagesla q/k argument, or why not."""
    root, chain = _view_chain(arg)
    if not (isinstance(root, fx.Node) and root.op == "call_function" and root.target is _OPS.rmsnorm_rope.default):
        return "is not a view of a rmsnorm_rope output"
    if root.args[4] != heads:
        return f"comes from a rmsnorm_rope over {root.args[4]} heads, not the attention's {heads}"
    if any(len(n.users) != 1 for n in [root, *chain]):
        return "has other users than the attention (its rmsnorm_rope or a view of it)"
    return root, chain


def _v_source(v: fx.Node, bld: tuple) -> fx.Node | None:
    """The nearest node of shape [B, L, H·D] that sagesla's v is a view of, or None."""
    n = v
    while _is_view(n):
        n = n.args[0]
        if _shape(n) == bld:
            return n
    return None


@register_pass
class FuseAttentionPooling(Pass):
    """Compute SageSLA's block statistics inside the q/k RMSNorm+RoPE kernels (no pooling kernel)."""

    name = "fuse_attention_pooling"
    description = "SageSLA's q/k/v block pooling computed by the q/k RMSNorm+RoPE kernels (no pass-A kernel)"
    requires = frozenset({"shapes"})
    provides = frozenset({"attention_pooling"})
    after = frozenset({"fused_norms", "sparse_attention"})
    # the same function: only the fp32 summation order of the block statistics differs, which can
    # at most flip a near-tie of the top-k block selection or an INT8 rounding of K
    verify_min_sqnr_db = 40.0

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        g = gm.graph
        stats = {"fused": 0, "dense": 0, "unmatched": 0}
        notes: list[str] = []
        for node in list(g.nodes):
            if node.op != "call_function" or node.target is not _OPS.sagesla.default:
                continue
            args = list(node.args)
            if len(args) > _N_SAGESLA_ARGS and any(a is not None for a in args[_N_SAGESLA_ARGS:]):
                continue  # already fed with precomputed statistics
            why = self._fuse(g, node, args)
            if why is not None:
                leave_site(ctx, stats, notes, f"{node.name}: {why}; left to SageSLA's own pooling kernel")
                continue
            stats["fused"] += 1
            if node.args[_N_SAGESLA_ARGS] is None:
                stats["dense"] += 1
        if stats["fused"]:
            g.eliminate_dead_code()
        return PassResult(stats["fused"] > 0, stats, notes[:3])

    def _fuse(self, g: fx.Graph, node: fx.Node, args: list) -> str | None:
        """Rewrite one sagesla site; returns why not when it does not match (graph untouched)."""
        if node.kwargs or len(args) != _N_SAGESLA_ARGS:
            return "the sagesla call is not in the positional form sagesla_attention emits"
        q, k, v, topk, _, _, block_q, block_k = args[:8]
        qshape = _shape(q)
        if qshape is None or len(qshape) != 4 or _shape(k) != qshape or _shape(v) != qshape:
            return "q, k, v shapes are unknown or differ"
        B, L, H, D = qshape
        Kb = math.ceil(L / block_k)
        dense = max(1, min(Kb, int(topk * Kb))) == Kb  # sagesla's kept key blocks (ref.num_kept_blocks)
        ksrc = _norm_source(k, H)
        if isinstance(ksrc, str):
            return f"k {ksrc}"
        qsrc = None
        if not dense:
            qsrc = _norm_source(q, H)
            if isinstance(qsrc, str):
                return f"q {qsrc}"
        vroot = _v_source(v, (B, L, H * D))
        if vroot is None:
            return f"v is not a view of a [B, L, H*D] = [{B}, {L}, {H * D}] tensor"
        with g.inserting_before(node):
            q_pool = None
            if qsrc is not None:
                q, (q_pool,) = self._pooled_norm(g, *qsrc, int(block_q), True, None, 1)
            k, (k_sum, v_max) = self._pooled_norm(g, *ksrc, int(block_k), False, vroot, 2)
        node.args = (q, k, *args[2:], q_pool, k_sum, v_max)
        for root, chain in [ksrc] + ([qsrc] if qsrc is not None else []):
            for n in [*chain[::-1], root]:
                g.erase_node(n)
        return None

    def _pooled_norm(self, g, root: fx.Node, chain: list[fx.Node], pool_rows: int, mean: bool, v, n_extra: int):
        """rmsnorm_rope_pool in place of ``root`` (inserted at the current point), its out put through
        a copy of ``chain``; returns (the view for sagesla, [the first ``n_extra`` pooled outputs])."""
        z, weight, cos, sin, heads, eps, backend = root.args
        fused = mark(g.call_function(_OPS.rmsnorm_rope_pool.default,
                                     (z, weight, cos, sin, heads, eps, pool_rows, mean, v, backend)), self.name)
        fused.meta["nn_module_stack"] = dict(root.meta.get("nn_module_stack", {}))
        outs = [g.call_function(operator.getitem, (fused, i)) for i in range(1 + n_extra)]
        outs[0].meta["val"] = root.meta.get("val")
        cur = outs[0]
        for old in chain:  # the same views of the new output
            if old.op == "call_method":
                cur = g.call_method(old.target, (cur, *old.args[1:]), dict(old.kwargs))
            else:
                cur = g.call_function(old.target, (cur, *old.args[1:]), dict(old.kwargs))
            cur.meta["val"] = old.meta.get("val")
        return cur, outs[1:]
