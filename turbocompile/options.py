"""Typed, frozen option dataclasses built from untrusted YAML/dict data.

Passes declare their options as ``@dataclass(frozen=True, kw_only=True)`` classes whose
fields carry validation metadata (:func:`choice`, :func:`number`, :func:`globs`).
:func:`build_options` turns a mapping into an instance, raising :class:`RecipeError`
with the YAML path for unknown keys, wrong types and out-of-range values.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from turbocompile.errors import RecipeError

__all__ = ["choice", "number", "globs", "build_options", "options_to_dict"]


def choice(default: str, choices: tuple[str, ...], doc: str = "") -> Any:
    """A string field restricted to ``choices``."""
    return dataclasses.field(default=default, metadata={"choices": choices, "doc": doc})


def number(default, *, min=None, max=None, doc: str = "") -> Any:  # noqa: A002
    """An int/float field with an inclusive range."""
    return dataclasses.field(default=default, metadata={"min": min, "max": max, "doc": doc})


def globs(default: tuple[str, ...] = (), doc: str = "") -> Any:
    """A tuple of glob patterns (YAML list of strings)."""
    return dataclasses.field(default=tuple(default), metadata={"globs": True, "doc": doc})


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, path: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .nan slips through every range check (nan < lo is False)
            raise RecipeError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list, got {value!r}")
        elem = args[0] if args else str
        if len(args) == 2 and args[1] is Ellipsis or len(args) <= 1:
            return tuple(_coerce(v, elem, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{path}: expected a list of {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise RecipeError(f"{path}: unsupported option type {_type_name(tp)}")


def build_options(cls, data: Any, path: str):
    """Instantiate the options dataclass ``cls`` from ``data`` (a mapping or None)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(f"{path}: unknown option '{unknown[0]}'; valid options: {', '.join(sorted(fields)) or '(none)'}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        field = fields[name]
        fpath = f"{path}.{name}"
        value = _coerce(value, hints[name], fpath)
        meta = field.metadata
        if "choices" in meta and value is not None and value not in meta["choices"]:
            raise RecipeError(f"{fpath}: '{value}' is not valid; choose one of {', '.join(meta['choices'])}")
        lo, hi = meta.get("min"), meta.get("max")
        if value is not None and ((lo is not None and value < lo) or (hi is not None and value > hi)):
            rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise RecipeError(f"{fpath}: {value!r} is out of range {rng}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{path}: {exc}") from None


def options_to_dict(options) -> dict:
    """JSON/YAML-ready dict of an options instance (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(options):
        v = getattr(options, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
