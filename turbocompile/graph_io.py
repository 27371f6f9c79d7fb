"""Safe (pickle-free) serialization of turbocompile FX graphs to JSON.

Only what captured and rewritten Wan graphs contain is accepted: placeholders,
``get_attr``, ``call_function`` on an allow-listed set of modules (``torch``,
``torch.nn.functional``, ``operator``, ``torch.ops.turbocompile`` / ``torch.ops.aten``,
and ``getattr``), ``call_method`` on ``torch.Tensor`` methods, and ``output``. Loading
never executes arbitrary code: targets are resolved by walking attributes of
allow-listed modules.
"""

from __future__ import annotations

import builtins
import importlib
import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

from turbocompile.errors import ArtifactError

__all__ = ["graph_to_json", "graph_from_json", "GRAPH_FORMAT_VERSION"]

GRAPH_FORMAT_VERSION = 1

_FUNCTION_MODULES = ("_operator", "operator", "torch", "torch._C._nn", "torch.nn.functional",
                     "torch._C._VariableFunctions", "torch.functional", "math")
_OP_NAMESPACES = ("turbocompile", "aten")
_DTYPES = {str(d).split(".")[-1]: d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::")
        return f"torch.ops.{ns}.{name}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        ns, name = target._qualified_op_name.split("::")
        return f"torch.ops.{ns}.{name}"
    if target is getattr:
        return "builtins.getattr"
    return _get_qualified_name(target)


def _resolve_target(name: str):
    if name == "builtins.getattr":
        return builtins.getattr
    if name.startswith("torch.ops."):
        parts = name.split(".")
        if len(parts) not in (4, 5) or parts[2] not in _OP_NAMESPACES:
            raise ArtifactError(f"graph uses op '{name}' outside the allowed namespaces {_OP_NAMESPACES}")
        obj = torch.ops
        try:
            for p in parts[2:]:
                obj = getattr(obj, p)
        except (AttributeError, RuntimeError):
            raise ArtifactError(f"graph uses op '{name}', which is not registered in this turbocompile") from None
        return obj
    for mod in sorted(_FUNCTION_MODULES, key=len, reverse=True):
        if name.startswith(mod + "."):
            attr_path = name[len(mod) + 1:].split(".")
            root = importlib.import_module(mod.split(".")[0])
            obj = root
            for p in mod.split(".")[1:] + attr_path:
                if p.startswith("__"):
                    break
                obj = getattr(obj, p, None)
                if obj is None:
                    break
            if obj is not None and callable(obj):
                return obj
    raise ArtifactError(f"graph calls '{name}', which is not an allowed function")


def _enc(a: Any):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, str)):
        return a
    if isinstance(a, int):
        return a
    if isinstance(a, float):
        if math.isfinite(a):
            return a
        return {"float": repr(a)}
    if isinstance(a, tuple):
        return {"tuple": [_enc(x) for x in a]}
    if isinstance(a, list):
        return [_enc(x) for x in a]
    if isinstance(a, dict):
        return {"dict": {str(k): _enc(v) for k, v in a.items()}}
    if isinstance(a, slice):
        return {"slice": [_enc(a.start), _enc(a.stop), _enc(a.step)]}
    if a is Ellipsis:
        return {"ellipsis": True}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).split(".")[-1]}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).split(".")[-1]}
    if isinstance(a, torch.layout):
        return {"layout": str(a).split(".")[-1]}
    raise TypeError(f"cannot serialize graph argument of type {type(a).__name__}: {a!r}")


def _dec(a: Any, env: dict[str, fx.Node]):
    if isinstance(a, list):
        return [_dec(x, env) for x in a]
    if not isinstance(a, dict):
        if a is None or isinstance(a, (bool, str, int, float)):
            return a
        raise ArtifactError(f"malformed graph argument {a!r}")
    if len(a) != 1:
        raise ArtifactError(f"malformed graph argument {a!r}")
    ((kind, v),) = a.items()
    try:
        if kind == "node":
            return env[v]
        if kind == "float":
            return float(v)
        if kind == "tuple":
            return tuple(_dec(x, env) for x in v)
        if kind == "dict":
            return {k: _dec(x, env) for k, x in v.items()}
        if kind == "slice":
            return slice(*(_dec(x, env) for x in v))
        if kind == "ellipsis":
            return Ellipsis
        if kind == "dtype":
            return _DTYPES[v]
        if kind == "device":
            return torch.device(v)
        if kind == "memory_format":
            return getattr(torch, v)
        if kind == "layout":
            return getattr(torch, v)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ArtifactError(f"malformed graph argument {a!r}") from None
    raise ArtifactError(f"malformed graph argument {a!r}")


def graph_to_json(graph: fx.Graph) -> dict:
    """Encode ``graph`` as a JSON-ready dict."""
    nodes = []
    for n in graph.nodes:
        if n.op == "call_module":
            raise TypeError(f"node {n.name}: call_module is not serializable (capture flattens modules)")
        target = _target_name(n.target) if n.op == "call_function" else n.target
        entry = {"name": n.name, "op": n.op, "target": target, "args": _enc(n.args), "kwargs": _enc(n.kwargs)}
        if n.op == "placeholder" and n.args:
            entry["args"] = _enc(n.args)
        nodes.append(entry)
    return {"version": GRAPH_FORMAT_VERSION, "nodes": nodes}


def graph_from_json(data: dict) -> fx.Graph:
    """Rebuild an ``fx.Graph`` from :func:`graph_to_json` output (validated, no code execution)."""
    if not isinstance(data, dict) or data.get("version") != GRAPH_FORMAT_VERSION or \
            not isinstance(data.get("nodes"), list):
        raise ArtifactError("graph.json is malformed or of an unsupported graph format version")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    tensor_methods = set(dir(torch.Tensor))
    for entry in data["nodes"]:
        if not isinstance(entry, dict):
            raise ArtifactError("graph.json: a node entry is not a mapping")
        try:
            name, op, target = entry["name"], entry["op"], entry["target"]
            args = _dec(entry["args"], env)
            kwargs = _dec(entry["kwargs"], env)
        except KeyError as exc:
            raise ArtifactError(f"graph.json: node entry lacks {exc}") from None
        if not isinstance(name, str) or not isinstance(target, str):
            raise ArtifactError("graph.json: node name and target must be strings")
        if op in ("placeholder", "get_attr"):
            node = graph.create_node(op, target, name=name)
        elif op == "call_function":
            node = graph.create_node(op, _resolve_target(target), tuple(args), dict(kwargs), name=name)
        elif op == "call_method":
            if target.startswith("_") or target not in tensor_methods:
                raise ArtifactError(f"graph.json: '{target}' is not an allowed tensor method")
            node = graph.create_node(op, target, tuple(args), dict(kwargs), name=name)
        elif op == "output":
            node = graph.output(args[0] if args else None)
        else:
            raise ArtifactError(f"graph.json: unsupported node op '{op}'")
        if node.name != name and op != "output":
            raise ArtifactError(f"graph.json: duplicate node name '{name}'")
        env[name] = node
    try:
        graph.lint()
    except Exception as exc:  # noqa: BLE001 - any lint failure means a malformed file
        raise ArtifactError(f"graph.json does not form a valid graph: {exc}") from None
    return graph


# operator is imported so that qualified names like "_operator.add" resolve in all Pythons.
_ = operator
