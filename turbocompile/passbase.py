"""The pass protocol and registry.

A pass is a small class::

    @register_pass
    class MyPass(Pass):
        name = "my_pass"                   # snake_case, verb first
        requires = frozenset({"shapes"})   # capabilities that must hold before it runs
        provides = frozenset({"my_thing"}) # capabilities it establishes
        after = frozenset()                # soft: run after providers of these, if present

        @dataclass(frozen=True, kw_only=True)
        class Options: ...

        def run(self, gm, ctx) -> PassResult: ...

Passes rewrite the graph to ``torch.ops.turbocompile.*`` ops by name and never import
kernels. Nodes they create carry ``meta["tc_from"]`` (provenance).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from turbocompile.errors import RecipeError, TurboCompileError
from turbocompile.options import options_to_dict

__all__ = ["Pass", "PassResult", "PassContext", "register_pass", "get_pass", "registered_passes",
           "leave_site", "BASE_CAPABILITIES"]

#: What capture establishes before any pass runs.
BASE_CAPABILITIES = frozenset({"captured", "shapes"})


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, counters for the report, notes."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def leave_site(ctx: "PassContext", stats: dict, notes: list, msg: str) -> None:
    """A site a pass matched but cannot rewrite: counted in ``stats["unmatched"]``; a
    :class:`TurboCompileError` under ``--strict``, else a note in the pass report."""
    stats["unmatched"] += 1
    if ctx.strict:
        raise TurboCompileError(msg)
    notes.append(msg)


@dataclass
class PassContext:
    """Shared state handed to every pass of one pipeline run.

    Attributes:
        model_config: the WanConfig of the captured model.
        video_shape: the static geometry the graph is captured for.
        dtype: activation dtype; device: where weights live.
        extras: what the checkpoint carried beyond the canonical model (e.g. ``proj_l``,
            TurboDiffusion ``int8`` linears), for passes that consume it.
        strict: turn skipped rewrites into errors.
        progress: show progress bars.
        input_specs: name -> (shape, dtype) of the graph's placeholders; a pass that changes
            the graph's inputs (e.g. baking a sampler) must update it.
        artifact_kind: "denoiser" (the Wan call contract) or "sampler" (set by sampler passes).
        dynamic_batch: whether the graph accepts another batch size than the captured one.
    """

    model_config: Any
    video_shape: Any
    dtype: torch.dtype
    device: torch.device
    extras: dict = field(default_factory=dict)
    strict: bool = False
    progress: bool = False
    stats: dict[str, dict] = field(default_factory=dict)
    input_specs: dict = field(default_factory=dict)
    artifact_kind: str = "denoiser"
    dynamic_batch: bool = True
    manifest_extra: dict = field(default_factory=dict)


class Pass:
    """Base class of graph passes (see module docstring)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    after: ClassVar[frozenset[str]] = frozenset()
    #: minimum SQNR (dB) vs the previous graph under --verify; None = must be exact-ish (rel ≤ 1e-5).
    verify_min_sqnr_db: ClassVar[float | None] = None

    @dataclass(frozen=True, kw_only=True)
    class Options:
        pass

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_config(self, cfg) -> None:
        """Raise if the options cannot apply to a model of WanConfig ``cfg`` (e.g. a layer index past its
        depth). `optimize` calls it before loading weights where the config is known up front (built-in
        models) and before capture otherwise, so a bad option fails before the slow work."""

    def uuid(self) -> str:
        """Hash of the pass's source file and its options (cache key)."""
        src = inspect.getsource(type(self))
        payload = json.dumps(options_to_dict(self.options), sort_keys=True)
        return hashlib.sha256((src + payload).encode()).hexdigest()[:16]

    @classmethod
    def option_docs(cls) -> dict[str, str]:
        out = {}
        for f in dataclasses.fields(cls.Options):
            meta = dict(f.metadata)
            desc = meta.get("doc", "")
            if "choices" in meta:
                desc += f" (one of: {', '.join(meta['choices'])})"
            out[f.name] = f"{desc} [default: {f.default!r}]".strip()
        return out


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry; a duplicate name raises."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a pass named '{cls.name}' is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_passes() -> None:
    import turbocompile.passes  # noqa: F401  (registers the built-in passes)


def registered_passes() -> dict[str, type[Pass]]:
    """Name -> pass class of every registered pass (built-ins are loaded on first call)."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str, path: str = "pass") -> type[Pass]:
    """Look a pass up by name; the error lists the registered passes."""
    passes = registered_passes()
    if name not in passes:
        raise RecipeError(f"{path}: unknown pass '{name}'; registered passes: {', '.join(passes) or '(none)'}")
    return passes[name]
