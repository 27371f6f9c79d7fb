"""How the ``torch.ops.turbocompile`` ops are defined, and where their Python bodies are kept.

:func:`define` is ``torch.library.custom_op`` plus a record of the decorated function, so the eager
runner (:mod:`turbocompile.eager`) can call an op's body directly instead of going through the
dispatcher. :func:`implementation` maps an op overload back to that body.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["define", "implementation", "NAMESPACE"]

NAMESPACE = "turbocompile"
_BODIES: dict[str, Callable] = {}


def define(name: str, *, mutates_args=()):
    """Decorator: register ``fn`` as the custom op ``name`` ("turbocompile::op") and remember it.

    Returns what ``torch.library.custom_op`` returns (so ``.register_fake`` etc. work unchanged).
    """
    if not name.startswith(NAMESPACE + "::"):
        raise ValueError(f"op name '{name}' must start with '{NAMESPACE}::'")

    def decorate(fn: Callable):
        _BODIES[name] = fn
        return torch.library.custom_op(name, mutates_args=mutates_args)(fn)

    return decorate


def implementation(target) -> Callable | None:
    """The Python body of a ``torch.ops.turbocompile`` op overload, or None for any other target."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != NAMESPACE:
        return None
    return _BODIES.get(target.name())
