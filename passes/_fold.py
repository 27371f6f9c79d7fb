"""Generic graph compiler helpers: constant folding, common-subexpression elimination, cleanup.

Used by ``bake_rcm_sampler`` (whose unrolled graph is where they pay off), but nothing here
knows about Wan or samplers:

* :func:`fold_constants` evaluates, once, every node that depends on no placeholder
  (``get_attr`` weights/buffers and Python literals only) and replaces the frontier of that
  constant subgraph — the constant nodes that feed non-constant ones — by ``get_attr``
  buffers registered on the GraphModule. The evaluation runs the graph's own ops on the
  graph's own tensors, so a folded value is bit-identical to what the graph would compute at
  run time on the same device.
* :func:`eliminate_common_subexpressions` merges nodes with the same op, target and
  (already merged) arguments: all graph ops here are pure functions, in-place methods and
  random ops excepted (never merged).
* :func:`drop_unused_attributes` deletes parameters/buffers no ``get_attr`` refers to.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from turbocompile.passes._graph import get_attr_value, remove_attr, set_attr_value

__all__ = ["constant_nodes", "fold_constants", "eliminate_common_subexpressions", "drop_unused_attributes",
           "FoldResult"]

#: call_function targets never merged or folded (random / stateful).
_IMPURE_FUNCTIONS = {torch.randn, torch.rand, torch.randint, torch.randn_like, torch.rand_like,
                     torch.randint_like, torch.normal, torch.bernoulli, torch.multinomial, torch.manual_seed,
                     torch.nn.functional.dropout, torch.empty, torch.empty_like}
_IMPURE_METHODS = {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_", "copy_", "fill_", "zero_"}


def _is_pure(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op == "call_method":
        t = node.target
        return t not in _IMPURE_METHODS and not (t.endswith("_") and not t.endswith("__"))
    if node.op == "call_function":
        if node.target in _IMPURE_FUNCTIONS:
            return False
        schema = getattr(node.target, "_schema", None)
        if schema is not None and (schema.is_mutable or "rand" in schema.name):
            return False
        return node.target is not operator.setitem
    return False


def constant_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on no placeholder (get_attr, and pure ops over constants)."""
    const: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            const.add(node)
        elif node.op in ("call_function", "call_method") and _is_pure(node):
            if all(a in const for a in node.all_input_nodes):
                const.add(node)
    return const


def _load(a, env):
    return fx.node.map_arg(a, lambda n: env[n])


def _evaluate(gm: fx.GraphModule, node: fx.Node, env: dict) -> Any:
    if node.op == "get_attr":
        return get_attr_value(gm, node.target)
    args, kwargs = _load(node.args, env), _load(node.kwargs, env)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    self_obj, *rest = args
    return getattr(self_obj, node.target)(*rest, **kwargs)


class FoldResult:
    """What :func:`fold_constants` did."""

    def __init__(self):
        self.folded: list[str] = []      # names of the new buffers
        self.aliased = 0                 # folded values that were an existing attribute (e.g. fp32 w.float())
        self.bytes = 0                   # bytes of the new buffers
        self.evaluated = 0               # constant nodes evaluated


def _tensor_key(t: torch.Tensor):
    return (t.device, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(),
            t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t))


def fold_constants(gm: fx.GraphModule, name_for: Callable[[fx.Node], str]) -> FoldResult:
    """Evaluate the constant subgraph of ``gm`` and replace its frontier by ``get_attr`` buffers.

    ``name_for(node)`` gives the (dotted) buffer name for a folded node; collisions get a
    numeric suffix. Non-tensor constants (shapes, Python numbers) are left in the graph.
    Values are stored as contiguous copies (safetensors refuses aliasing tensors), except
    when the value *is* an existing attribute (then the node becomes a ``get_attr`` of it).
    """
    graph = gm.graph
    const = constant_nodes(graph)
    frontier = [n for n in graph.nodes if n in const and n.op != "get_attr"
                and any(u not in const for u in n.users)]
    res = FoldResult()
    if not frontier:
        return res
    # Evaluate lazily in graph order, keeping only values still needed.
    needed: set[fx.Node] = set()
    stack = list(frontier)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    remaining_uses = {n: sum(1 for u in n.users if u in needed) for n in needed}
    existing = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            val = get_attr_value(gm, node.target)
            if isinstance(val, torch.Tensor):
                existing.setdefault(_tensor_key(val), node.target)
    frontier_set = set(frontier)
    values: dict[fx.Node, Any] = {}
    taken = {name for name, _ in gm.named_buffers()} | {name for name, _ in gm.named_parameters()}
    with torch.no_grad():
        for node in list(graph.nodes):
            if node not in needed:
                continue
            values[node] = _evaluate(gm, node, values)
            res.evaluated += node.op != "get_attr"
            for a in node.all_input_nodes:
                remaining_uses[a] -= 1
                if remaining_uses[a] == 0 and a not in frontier_set:
                    values.pop(a, None)
            if node not in frontier_set:
                continue
            val = values[node]
            if not isinstance(val, torch.Tensor):
                continue
            target = existing.get(_tensor_key(val))
            if target is None:
                base = name_for(node)
                target, k = base, 1
                while target in taken:
                    k += 1
                    target = f"{base}_{k}"
                taken.add(target)
                stored = val.detach().clone(memory_format=torch.contiguous_format)
                set_attr_value(gm, target, stored)
                existing[_tensor_key(stored)] = target
                res.folded.append(target)
                res.bytes += stored.numel() * stored.element_size()
            else:
                res.aliased += 1
            with graph.inserting_before(node):
                new = graph.get_attr(target)
            new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "tc_step")})
            new.meta["tc_from"] = list(node.meta.get("tc_from", [])) + ["constant_fold"]
            # only the non-constant users switch; constant users are dead after this pass
            for user in [u for u in node.users if u not in const]:
                user.replace_input_with(node, new)
            if remaining_uses.get(node, 0) == 0:
                values.pop(node, None)
    graph.eliminate_dead_code()
    return res


def _freeze(a) -> Any:
    """A hashable, type-exact key of a node argument (nodes by identity)."""
    if isinstance(a, fx.Node):
        return ("N", a)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_freeze(x) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple(sorted((str(k), _freeze(v)) for k, v in a.items())))
    if isinstance(a, slice):
        return ("slice", _freeze(a.start), _freeze(a.stop), _freeze(a.step))
    if isinstance(a, float):
        return ("float", repr(a))  # -0.0 != 0.0, nan == nan, 1.0 != 1
    if isinstance(a, (bool, int, str, type(None))):
        return (type(a).__name__, a)
    try:
        hash(a)
        return (type(a).__name__, a)
    except TypeError:
        return ("id", id(a))


def eliminate_common_subexpressions(graph: fx.Graph) -> int:
    """Merge duplicate pure nodes (same op, target, args, kwargs); returns how many were removed.

    Walks the graph in order, so the kept node (the first occurrence) dominates every use of
    the removed ones.
    """
    seen: dict[Any, fx.Node] = {}
    removed = 0
    for node in list(graph.nodes):
        if node.op not in ("get_attr", "call_function", "call_method") or not _is_pure(node):
            continue
        key = (node.op, node.target if node.op != "call_function" else ("fn", id(node.target)),
               _freeze(node.args), _freeze(node.kwargs))
        rep = seen.get(key)
        if rep is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(rep)
        graph.erase_node(node)
        removed += 1
    return removed


def drop_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete parameters and buffers no ``get_attr`` node refers to (and emptied submodules)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        remove_attr(gm, name)
        dropped += 1
    return dropped


_ = set_attr_value
