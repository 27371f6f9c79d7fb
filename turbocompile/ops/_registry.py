"""How the ``torch.ops.turbocompile`` ops are defined, and where their Python bodies are kept.

:func:`define` is ``torch.library.custom_op`` plus a record of the decorated function, so the eager
runner (:mod:`turbocompile.eager`) can call an op's body directly instead of going through the
dispatcher. :func:`implementation` maps an op overload back to that body.

Every body is registered (and recorded) wrapped in :func:`turbocompile.device_scope.on_tensor_device`,
so an op whose tensors live on ``cuda:N`` launches its kernels there whichever device is current.
"""

from __future__ import annotations

from typing import Callable

import torch

from turbocompile.device_scope import on_tensor_device

__all__ = ["define", "implementation", "NAMESPACE"]

NAMESPACE = "turbocompile"
_BODIES: dict[str, Callable] = {}


def define(name: str, *, mutates_args=()):
    """Decorator: register ``fn`` as the custom op ``name`` ("turbocompile::op") and remember it.

    Returns what ``torch.library.custom_op`` returns (so ``.register_fake`` etc. work unchanged). The
    registered and recorded body is ``fn`` run on its first tensor argument's CUDA device.
    """
    if not name.startswith(NAMESPACE + "::"):
        raise ValueError(f"op name '{name}' must start with '{NAMESPACE}::'")

    def decorate(fn: Callable):
        body = on_tensor_device(fn)
        _BODIES[name] = body
        # the schema comes from fn itself: its string annotations resolve in fn's module, not the wrapper's
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
        return torch.library.custom_op(name, mutates_args=mutates_args, schema=schema)(body)

    return decorate


def implementation(target) -> Callable | None:
    """The Python body of a ``torch.ops.turbocompile`` op overload, or None for any other target."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != NAMESPACE:
        return None
    return _BODIES.get(target.name())
