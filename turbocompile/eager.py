"""Eager (no CUDA graph) execution of a turbocompile graph, with op calls that skip the dispatcher.

Through the dispatcher, one ``torch.ops.turbocompile`` call costs 40–330 µs more host time than
calling the op's Python body (argument boxing, the custom-op autograd and aliasing layers; measured
on the lent H100 machine, benchmarks/RESULTS.md session 25). A Wan-1.3B forward makes 422 such
calls, enough to leave the GPU waiting for the host when no CUDA graph is used.

:func:`bind` generates the Python code of a copy of the graph in which each turbocompile op node
calls the op's body (:func:`turbocompile.ops._registry.implementation`) and binds that code to the
original module. The graph itself is not changed: passes, artifacts and exporters still see the
ops, ``gm.code`` still shows them, and the weights are read from ``gm`` at call time (so ``.to()``
on the module is seen). Same kernels, same arguments, so the outputs are identical.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch.fx as fx

from turbocompile.ops._registry import implementation

__all__ = ["bind", "cached_bind"]


def bind(gm: fx.GraphModule, *, after: dict[str, Callable[[Any], None]] | None = None) -> Callable:
    """A callable running ``gm``'s graph with every turbocompile op called directly.

    Args:
        gm: the graph module (its attributes hold the weights).
        after: node name -> ``callback(value)`` called right after that node runs (progress
            reporting); a name that is not in the graph is ignored.

    Returns a function with ``gm``'s positional call signature. If ``gm`` is recompiled after
    this (its graph edited), bind it again.
    """
    graph = fx.Graph()
    graph.set_codegen(gm.graph._codegen)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    hooks = dict(after or {})
    for node in list(graph.nodes):
        if node.op == "call_function":
            body = implementation(node.target)
            if body is not None:
                node.target = body
        callback = hooks.get(node.name)
        if callback is not None:
            with graph.inserting_after(node):
                graph.call_function(callback, (node,))
    code = graph.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, f"<turbocompile.eager {type(gm).__name__}>", "exec"), scope)  # noqa: S102
    return types.MethodType(scope["forward"], gm)


def cached_bind(holder: dict, gm: fx.GraphModule, *, after: dict[str, Callable[[Any], None]] | None = None,
                slot: str = "_tc_eager") -> Callable:
    """``bind(gm, after=after)``, kept in ``holder[slot]`` (``holder``: the owner's ``__dict__``) and rebuilt
    once ``gm`` has been recompiled (its generated code is then a new object). ``after`` is read only when
    (re)building, so its callbacks must stay valid between calls; use one ``slot`` per set of callbacks."""
    cached = holder.get(slot)
    if cached is None or cached[0] is not gm.code:
        cached = (gm.code, bind(gm, after=after))
        holder[slot] = cached
    return cached[1]
