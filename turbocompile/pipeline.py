"""Order and run passes over a captured graph.

Ordering is a dependency graph (networkx): an edge runs a provider of a capability
before every pass that ``requires`` it (an error if no pass or capture provides it) or
lists it in ``after``; ties keep the recipe's order. Cycles are rejected naming the
passes involved. After each pass the graph is linted and its shapes re-propagated with
fake tensors; with ``verify`` the pass's output is compared numerically with the graph
before it on fixed random inputs.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import networkx as nx
import torch
import torch.fx as fx

from turbocompile.capture import lint, propagate_shapes
from turbocompile.errors import PassError, PipelineError, TurboCompileError
from turbocompile.passbase import BASE_CAPABILITIES, Pass, PassContext
from turbocompile.metrics import compare

__all__ = ["order_passes", "run_pipeline", "PassRecord", "disabled_from_env"]


@dataclass
class PassRecord:
    """One line of the pass log stored in the artifact manifest."""

    name: str
    options: dict
    uuid: str
    status: str  # "ran" | "disabled"
    modified: bool = False
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    verify: dict | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def disabled_from_env() -> tuple[str, ...]:
    """Pass names listed in ``TURBOCOMPILE_DISABLE_PASSES`` (comma separated)."""
    raw = os.environ.get("TURBOCOMPILE_DISABLE_PASSES", "")
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def check_disabled(disabled: Sequence[str], known: Sequence[str]) -> None:
    """One-line :class:`PipelineError` for a pass name to disable that is not in the pipeline."""
    for name in disabled:
        if name not in known:
            raise PipelineError(
                f"cannot disable '{name}': not in this pipeline (passes: {', '.join(sorted(known)) or 'none'})")


def order_passes(passes: Sequence[Pass]) -> list[Pass]:
    """Return ``passes`` in an order that satisfies every dependency (recipe order breaks ties)."""
    names = [p.name for p in passes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PipelineError(f"pass '{dup[0]}' appears more than once in the pipeline")
    providers: dict[str, list[int]] = {}
    for i, p in enumerate(passes):
        for cap in p.provides:
            providers.setdefault(cap, []).append(i)
    g = nx.DiGraph()
    g.add_nodes_from(range(len(passes)))
    for i, p in enumerate(passes):
        for cap in sorted(p.requires):
            if cap in BASE_CAPABILITIES and cap not in providers:
                continue
            if cap not in providers:
                raise PipelineError(
                    f"pass '{p.name}' requires '{cap}', which no pass in the pipeline provides"
                )
            for j in providers[cap]:
                if j != i:
                    g.add_edge(j, i)
        for cap in sorted(p.after):
            for j in providers.get(cap, []):
                if j != i:
                    g.add_edge(j, i)
    try:
        order = list(nx.lexicographical_topological_sort(g, key=lambda n: n))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(g)
        loop = " -> ".join(passes[a].name for a, _ in cycle) + f" -> {passes[cycle[0][0]].name}"
        raise PipelineError(f"pass dependencies form a cycle: {loop}") from None
    return [passes[i] for i in order]


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def _out_signature(gm: fx.GraphModule):
    val = _output_node(gm).args[0]
    val = val.meta.get("val") if isinstance(val, fx.Node) else None
    return None if val is None else (tuple(val.shape), val.dtype)


def run_pipeline(
    gm: fx.GraphModule,
    passes: Sequence[Pass],
    ctx: PassContext,
    *,
    input_specs: dict[str, tuple],
    verify_inputs: dict[str, torch.Tensor] | None = None,
    disabled: Sequence[str] = (),
    log=None,
) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run ``passes`` (ordered by :func:`order_passes`) over ``gm``.

    Args:
        input_specs: name -> (shape, dtype) of the graph inputs, for shape propagation.
        verify_inputs: when given, each pass's result is run on these inputs and compared
            with the graph before it (rel. error, cosine, SQNR recorded in the log).
        disabled: pass names to skip (recorded as ``disabled``), for bisecting.
        log: optional callable taking a line of progress text.
    """
    ordered = order_passes(passes)
    check_disabled(disabled, [p.name for p in ordered])
    records: list[PassRecord] = []
    done: list[str] = []
    before_out = None
    if verify_inputs is not None:
        with torch.no_grad():
            before_out = gm(*verify_inputs.values())
    ref_signature = _out_signature(gm)
    for p in ordered:
        from turbocompile.options import options_to_dict

        rec = PassRecord(name=p.name, options=options_to_dict(p.options), uuid=p.uuid(), status="ran")
        if p.name in disabled:
            rec.status = "disabled"
            records.append(rec)
            continue
        if log:
            log(f"running pass {p.name}")
        t0 = time.perf_counter()
        try:
            result = p.run(gm, ctx)
            gm.graph.eliminate_dead_code()
            gm.recompile()
            lint(gm)
            if ctx.input_specs:
                input_specs = ctx.input_specs
            propagate_shapes(gm, input_specs)
        except PassError:  # already names the pass: not wrapped twice
            raise
        except TurboCompileError as exc:
            raise PassError(p.name, done, str(exc)) from exc
        except Exception as exc:  # wrap with the pass name and what ran before
            raise PassError(p.name, done, f"{type(exc).__name__}: {exc}") from exc
        rec.seconds = round(time.perf_counter() - t0, 4)
        rec.modified = result.modified
        rec.stats = dict(result.stats)
        rec.notes = list(result.notes)
        sig = _out_signature(gm)
        if ref_signature is not None and sig is not None and sig[0][1:] != ref_signature[0][1:]:
            raise PassError(p.name, done, f"changed the output shape from {ref_signature[0]} to {sig[0]}")
        ctx.stats[p.name] = rec.stats
        if verify_inputs is not None and ctx.artifact_kind != "denoiser":
            # the graph's inputs changed (a baked sampler): the denoiser inputs no longer apply; the
            # baked sampler is checked against turbocompile.sampling.rcm_sample by the test suite instead
            rec.verify = {"skipped": f"the graph is now a {ctx.artifact_kind}; --verify compares denoisers only"}
        elif verify_inputs is not None:
            with torch.no_grad():
                out = gm(*verify_inputs.values())
            m = compare(out, before_out)
            rec.verify = m
            floor = p.verify_min_sqnr_db
            bad = not m["finite"] or (m["rel_err"] > 1e-5 if floor is None else m["sqnr_db"] < floor)
            if bad:
                raise PassError(p.name, done, f"--verify failed: {m} (bound: "
                                f"{'rel_err <= 1e-5' if floor is None else f'SQNR >= {floor} dB'})")
            before_out = out
        records.append(rec)
        done.append(p.name)
    return gm, records


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A structural copy sharing the weight tensors (cheap)."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    new.meta = copy.deepcopy(gm.meta)
    return new
