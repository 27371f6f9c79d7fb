"""Small graph helpers shared by the built-in passes."""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["is_linear", "is_transpose_12", "captured_attention", "block_index", "to_half", "from_half", "attr_target", "get_attr_value", "set_attr_value", "del_attr_if_unused", "remove_attr",
           "module_path", "matches_any", "mark", "LINEAR_TARGETS"]

LINEAR_TARGETS = (F.linear, torch._C._nn.linear)


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def single_user(node: fx.Node) -> fx.Node | None:
    """The node's only user, or None when it has none or several."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_transpose_12(node: Any) -> bool:
    """A ``x.transpose(1, 2)`` method call (how the captured attention moves heads before / after SDPA)."""
    return (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "transpose"
            and tuple(node.args[1:]) in ((1, 2), (2, 1)) and not node.kwargs)


def captured_attention(sdpa: fx.Node) -> tuple | None:
    """``(q, k, v, out)`` of an SDPA node captured as ``transpose(1,2) x3 -> sdpa -> transpose(1,2)``:
    q, k, v on the model's ``[B, L, H, D]`` layout and ``out``, the transpose back (its one user);
    None when the node deviates (extra arguments, other layouts, several users)."""
    qt, kt, vt = (tuple(sdpa.args) + (None, None, None))[:3]
    users = list(sdpa.users)
    if (len(sdpa.args) != 3 or sdpa.kwargs or not all(is_transpose_12(t) for t in (qt, kt, vt))
            or len(users) != 1 or not is_transpose_12(users[0])):
        return None
    return qt.args[0], kt.args[0], vt.args[0], users[0]


_HALF = (torch.bfloat16, torch.float16)


def to_half(graph: fx.Graph, args: list, dtype: torch.dtype, pass_name: str) -> list:
    """Inputs of an op that runs in 16-bit floats: as they are in a bf16/fp16 graph, cast to bf16 otherwise
    (a float32 graph casts around such ops; :func:`from_half` casts the result back)."""
    if dtype in _HALF:
        return list(args)
    return [mark(graph.call_method("to", (a, torch.bfloat16)), pass_name) for a in args]


def from_half(graph: fx.Graph, node: fx.Node, dtype: torch.dtype, pass_name: str) -> fx.Node:
    """The result of a 16-bit op in the graph's activation dtype (see :func:`to_half`)."""
    return node if dtype in _HALF else mark(graph.call_method("to", (node, dtype)), pass_name)


def block_index(node: fx.Node, module_pattern) -> int | None:
    r"""The block index captured by ``module_pattern`` (a compiled regex with one group, e.g.
    ``blocks\.(\d+)\.self_attn$``) in the innermost matching module path of ``node``, else None."""
    for path in reversed(list(node.meta.get("nn_module_stack", {}))):
        m = module_pattern.search(path)
        if m:
            return int(m.group(1))
    return None


def site_name(node: fx.Node) -> str:
    """Where ``node`` sits, for notes: its innermost module's path from the capture, else the node's name."""
    stack = node.meta.get("nn_module_stack")
    return list(stack)[-1] if stack else node.name


def attr_target(node: Any) -> str | None:
    """The attribute name of a ``get_attr`` node, else None."""
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def get_attr_value(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr_value(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Register ``value`` as a buffer at dotted ``target`` (creating parent modules)."""
    *parents, leaf = target.split(".")
    mod = gm
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    mod.register_buffer(leaf, value)


def remove_attr(gm: fx.GraphModule, target: str) -> None:
    """Delete the parameter, buffer or plain attribute at dotted ``target``."""
    *parents, leaf = target.split(".")
    mod = gm
    for p in parents:
        mod = getattr(mod, p)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    elif leaf in mod._buffers:
        del mod._buffers[leaf]
    else:
        delattr(mod, leaf)


def del_attr_if_unused(gm: fx.GraphModule, target: str) -> bool:
    """Remove ``target`` unless a ``get_attr`` node still reads it; True when removed."""
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return False
    remove_attr(gm, target)
    return True


def module_path(weight_target: str) -> str:
    """'blocks.0.self_attn.q.weight' -> 'blocks.0.self_attn.q'."""
    return weight_target.rsplit(".", 1)[0]


def matches_any(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def mark(node: fx.Node, pass_name: str) -> fx.Node:
    """Record provenance: nodes a pass creates carry ``meta['tc_from']``."""
    node.meta["tc_from"] = list(node.meta.get("tc_from", [])) + [pass_name]
    return node
