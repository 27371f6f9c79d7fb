"""torch.export of an artifact's graph, and the ``.pt2`` format.

The artifact's GraphModule calls ``torch.ops.turbocompile.*`` custom ops; their fake kernels
make ``torch.export.export`` trace them as opaque nodes, so the exported program keeps the
custom ops (and their ``backend`` argument). Reloading needs the ops registered::

    import turbocompile, torch
    ep = torch.export.load("wan-tiny.pt2")      # or turbocompile.export.pt2.load_pt2(...)
    v = ep.module()(x, timestep, context)

The program's inputs are the artifact's signature inputs in order (x, timestep, context[, y,
clip_fea]); the batch dimension is dynamic when the artifact's signature says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from turbocompile.errors import ArtifactError
from turbocompile.export import ExportError, atomic_write

__all__ = ["ExportedArtifact", "export_program", "save_pt2", "load_pt2", "example_args", "METADATA_FILE"]

METADATA_FILE = "turbocompile.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


@dataclass
class ExportedArtifact:
    """An artifact traced by ``torch.export``: the program plus what the writers record."""

    program: torch.export.ExportedProgram
    manifest: dict
    args: tuple
    input_names: list[str]
    dynamic_batch: bool
    notes: list[str] = field(default_factory=list)

    def metadata(self) -> dict:
        """Provenance recorded in the exported file (ONNX metadata_props / .pt2 extra file)."""
        m = self.manifest
        sig = m["signature"]
        shapes = {i["name"]: (["batch"] + list(i["shape"][1:])) if self.dynamic_batch else list(i["shape"])
                  for i in sig["inputs"]}
        return {
            "turbocompile_version": str(m.get("turbocompile_version") or _pkg_version()),
            "recipe": str(m.get("recipe", {}).get("name")),
            "recipe_json": json.dumps(m.get("recipe", {}), sort_keys=True),
            "model": str(m.get("model", {}).get("config", {}).get("name")),
            "input_shapes": json.dumps(shapes),
            "input_dtypes": json.dumps({i["name"]: i["dtype"] for i in sig["inputs"]}),
            "output_shape": json.dumps(list(sig["output"]["shape"])),
            "activation_dtype": str(sig.get("activation_dtype")),
            "dynamic_batch": "true" if self.dynamic_batch else "false",
            "exported_with_torch": torch.__version__,
        }


def _pkg_version() -> str:
    import turbocompile

    return turbocompile.__version__


def example_args(manifest: dict, batch: int, seed: int = 0) -> tuple:
    """Random inputs following the artifact's signature with batch ``batch``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in manifest["signature"]["inputs"]:
        shape = [batch] + list(spec["shape"][1:])
        dt = _DTYPES.get(spec["dtype"])
        if dt is None:
            raise ArtifactError(f"input '{spec['name']}' has unsupported dtype '{spec['dtype']}'")
        if spec["name"] == "timestep":
            out.append((torch.rand(shape, generator=gen) * 1000.0).to(dt))
        else:
            out.append(torch.randn(shape, generator=gen).to(dt))
    return tuple(out)


def export_program(path: str | Path, *, dynamic_batch: bool | None = None,
                   log: Callable[[str], None] | None = None) -> ExportedArtifact:
    """Load the artifact (CPU, checksums verified) and ``torch.export`` its GraphModule."""
    import turbocompile

    module = turbocompile.load(path, device="cpu")
    manifest = module.manifest
    gm = module.graph_module
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    sig_names = [i["name"] for i in manifest["signature"]["inputs"]]
    if names != sig_names:
        raise ArtifactError(f"graph inputs {names} do not match the manifest signature {sig_names}")
    want_dynamic = bool(manifest["signature"].get("dynamic_batch", False)) if dynamic_batch is None \
        else dynamic_batch
    notes: list[str] = []
    if want_dynamic:
        # Trace with batch 2: an example batch of 1 would be specialised (0/1 specialisation).
        args = example_args(manifest, 2)
        batch = torch.export.Dim("batch", min=1, max=1024)
        try:
            if log:
                log("torch.export with a dynamic batch dimension")
            ep = torch.export.export(gm, args, dynamic_shapes=tuple({0: batch} for _ in args), strict=False)
            return ExportedArtifact(ep, manifest, args, names, True, notes)
        except Exception as exc:  # noqa: BLE001 - any specialisation: fall back to the fixed shapes
            if dynamic_batch:
                raise ExportError(f"the graph does not allow a dynamic batch: {str(exc).splitlines()[0]}") \
                    from None
            notes.append("dynamic batch not possible (graph specialises on the batch); fixed shapes exported")
    args = example_args(manifest, int(manifest["signature"]["inputs"][0]["shape"][0]))
    try:
        if log:
            log("torch.export with the captured (fixed) shapes")
        ep = torch.export.export(gm, args, strict=False)
    except Exception as exc:  # noqa: BLE001 - report torch.export failures as one line
        raise ExportError(f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    return ExportedArtifact(ep, manifest, args, names, False, notes)


def save_pt2(prog: ExportedArtifact, out: str | Path, *, overwrite: bool = True,
             log: Callable[[str], None] | None = None) -> dict:
    """Write ``prog`` with ``torch.export.save`` (atomically), provenance in ``turbocompile.json``."""
    meta = prog.metadata()
    atomic_write(out, lambda tmp: torch.export.save(prog.program, str(tmp),
                                                    extra_files={METADATA_FILE: json.dumps(meta)}),
                 overwrite=overwrite)
    if log:
        log(f"wrote {out}")
    return {"out": str(out), "format": "pt2", "dynamic_batch": prog.dynamic_batch,
            "input_shapes": json.loads(meta["input_shapes"]), "notes": list(prog.notes)}


def load_pt2(path: str | Path) -> tuple[torch.export.ExportedProgram, dict]:
    """Load a ``.pt2`` written by :func:`save_pt2`: ``(program, metadata)``.

    Weights are copied into fresh (aligned) allocations: CPU kernels take differently rounded
    SIMD paths on unaligned data, and the artifact loader does the same, so outputs match the
    artifact bit for bit.
    """
    import turbocompile  # noqa: F401  (registers torch.ops.turbocompile.* before deserializing)

    extra = {METADATA_FILE: ""}
    try:
        ep = torch.export.load(str(path), extra_files=extra)
    except FileNotFoundError:
        raise ExportError(f"'{path}' does not exist") from None
    except Exception as exc:  # noqa: BLE001 - corrupt / foreign files: one line
        raise ExportError(f"'{path}' is not a readable .pt2 file: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    with torch.no_grad():
        for name, t in list(ep.state_dict.items()):
            ep.state_dict[name] = t.clone() if not isinstance(t, torch.nn.Parameter) else \
                torch.nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
        for name, t in list(ep.constants.items()):
            if isinstance(t, torch.Tensor):
                ep.constants[name] = t.clone()
    meta = json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}
    return ep, meta
