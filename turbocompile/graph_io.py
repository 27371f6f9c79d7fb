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
import types
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


# operator functions a graph may call (no operator.call / methodcaller / attrgetter: those would let a
# crafted graph call arbitrary objects).
_OPERATOR_OK = frozenset((
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "matmul", "getitem",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "invert", "not_", "lshift", "rshift",
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "index", "truth", "contains",
))
# torch.* callables that touch files, global state or compilation: never reachable from a graph.
_TORCH_DENY = frozenset((
    "load", "save", "from_file", "compile", "hub", "manual_seed", "seed", "set_default_device",
    "set_default_dtype", "set_default_tensor_type", "set_num_threads", "set_num_interop_threads",
    "set_printoptions", "set_grad_enabled", "set_float32_matmul_precision", "set_rng_state",
    "use_deterministic_algorithms", "set_deterministic_debug_mode", "set_warn_always", "export", "jit",
    "package", "cond", "while_loop", "vmap", "func",
))


def _resolve_target(name: str):
    """Map a qualified name to an allowed callable: one attribute of an allow-listed module (never
    a walk through submodules, never a private or dunder name), or a registered custom/aten op."""
    if not isinstance(name, str):
        raise ArtifactError("graph.json: a call target is not a string")
    if name == "builtins.getattr":
        return builtins.getattr
    if name.startswith("torch.ops."):
        parts = name.split(".")
        if len(parts) not in (4, 5) or parts[2] not in _OP_NAMESPACES or any(
                not p.isidentifier() or p.startswith("_") for p in parts[3:]):
            raise ArtifactError(f"graph uses op '{name[:200]}' outside the allowed namespaces {_OP_NAMESPACES}")
        obj = torch.ops
        try:
            for p in parts[2:]:
                obj = getattr(obj, p)
        except (AttributeError, RuntimeError):
            raise ArtifactError(f"graph uses op '{name}', which is not registered in this turbocompile") from None
        if not isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            raise ArtifactError(f"graph uses op '{name}', which is not an operator")
        return obj
    mod, _, attr = name.rpartition(".")
    if mod in _FUNCTION_MODULES and attr.isidentifier() and not attr.startswith("_"):
        if mod in ("_operator", "operator") and attr not in _OPERATOR_OK:
            raise ArtifactError(f"graph calls '{name}', which is not an allowed function")
        if mod == "torch" and attr in _TORCH_DENY:
            raise ArtifactError(f"graph calls '{name}', which is not an allowed function")
        obj = getattr(importlib.import_module(mod), attr, None)
        if obj is not None and callable(obj) and not isinstance(obj, (type, types.ModuleType)):
            return obj
    raise ArtifactError(f"graph calls '{name[:200]}', which is not an allowed function")


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
            if not isinstance(v, str):
                raise TypeError
            return float(v)
        if kind == "tuple":
            return tuple(_dec(x, env) for x in v)
        if kind == "dict":
            return {k: _dec(x, env) for k, x in v.items()}  # keys are checked by graph_from_json
        if kind == "slice":
            return slice(*(_dec(x, env) for x in v))
        if kind == "ellipsis":
            return Ellipsis
        if kind == "dtype":
            return _DTYPES[v]
        if kind == "device":
            if not isinstance(v, str):
                raise TypeError
            return torch.device(v)
        if kind == "memory_format":
            out = getattr(torch, v)
            if isinstance(out, torch.memory_format):
                return out
        if kind == "layout":
            out = getattr(torch, v)
            if isinstance(out, torch.layout):
                return out
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
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
        except RecursionError:
            raise ArtifactError("graph.json: a node argument is nested too deeply") from None
        if not isinstance(name, str) or not isinstance(target, str):
            raise ArtifactError("graph.json: node name and target must be strings")
        if not name.isidentifier() or name in env:
            raise ArtifactError(f"graph.json: invalid or duplicate node name '{name[:100]}'")
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) or \
                not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise ArtifactError(f"graph.json: node '{name}' has malformed args/kwargs")
        # The graph's Python code is generated from these names: only plain identifiers may reach it.
        if op == "placeholder" and (not target.isidentifier() or args or kwargs):
            raise ArtifactError(f"graph.json: placeholder '{name}' has an invalid target")
        if op == "get_attr" and not all((p.isidentifier() and not p.startswith("__")) or (p.isascii() and p.isdigit())
                                      for p in target.split(".")):
            raise ArtifactError(f"graph.json: get_attr '{name}' has an invalid target '{target[:100]}'")
        if op == "call_function" and target == "builtins.getattr" and not (
                len(args) == 2 and isinstance(args[1], str) and not args[1].startswith("_") and not kwargs):
            raise ArtifactError(f"graph.json: getattr node '{name}' must read a public attribute by name")
        try:
            if op in ("placeholder", "get_attr"):
                node = graph.create_node(op, target, name=name)
            elif op == "call_function":
                node = graph.create_node(op, _resolve_target(target), tuple(args), dict(kwargs), name=name)
            elif op == "call_method":
                if target.startswith("_") or target not in tensor_methods:
                    raise ArtifactError(f"graph.json: '{target[:100]}' is not an allowed tensor method")
                node = graph.create_node(op, target, tuple(args), dict(kwargs), name=name)
            elif op == "output":
                if len(args) != 1 or kwargs:
                    raise ArtifactError("graph.json: the output node must have exactly one argument")
                node = graph.output(args[0])
            else:
                raise ArtifactError(f"graph.json: unsupported node op '{str(op)[:50]}'")
        except ArtifactError:
            raise
        except Exception as exc:  # noqa: BLE001 - fx rejects something: a malformed file
            raise ArtifactError(f"graph.json: node '{name}' is malformed: {type(exc).__name__}") from None
        if node.name != name and op != "output":
            raise ArtifactError(f"graph.json: duplicate node name '{name}'")
        env[name] = node
    if not any(n.op == "output" for n in graph.nodes):
        raise ArtifactError("graph.json: the graph has no output node")
    try:
        graph.lint()
    except Exception as exc:  # noqa: BLE001 - any lint failure means a malformed file
        raise ArtifactError(f"graph.json does not form a valid graph: {exc}") from None
    return graph


# operator is imported so that qualified names like "_operator.add" resolve in all Pythons.
_ = operator
