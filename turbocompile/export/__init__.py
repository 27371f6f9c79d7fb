"""Deployment exports of a turbocompile artifact: ONNX (onnxruntime) and torch.export ``.pt2``.

::

    from turbocompile.export import export_artifact
    export_artifact("out/wan-tiny", "onnx", "wan-tiny.onnx")             # standard ONNX ops only
    export_artifact("out/wan-tiny", "onnx", "m.onnx", attention="custom")  # turbocompile.SageSLA nodes
    export_artifact("out/wan-tiny", "pt2", "wan-tiny.pt2")               # torch.export.load after import turbocompile

Both formats start from the artifact's GraphModule (loaded with checksums verified) and one
``torch.export.export`` of it, with a dynamic batch dimension when the artifact allows it.
The output file is written atomically (temporary file beside it, fsync, rename).
Importing this package does not import onnx/onnxscript; the ONNX path imports them lazily.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

from turbocompile.errors import TurboCompileError
from turbocompile.output_paths import check_writable, refuse_input, write_failure

__all__ = ["export_artifact", "ExportError", "FORMATS", "ATTENTION_MODES", "DEFAULT_OPSET"]

FORMATS = ("onnx", "pt2")
ATTENTION_MODES = ("standard", "custom")
DEFAULT_OPSET = 18


class ExportError(TurboCompileError):
    """An artifact cannot be exported in the requested format (names the reason and the choices)."""


def check_output_file(out: str | Path, overwrite: bool, *, artifact: str | Path | None = None) -> Path:
    """One-line :class:`ExportError` unless ``out`` can be written without losing data: not a
    directory, a writable location, not inside the ``artifact`` being exported, an existing file
    only with ``overwrite``."""
    out = Path(out)
    if out.exists() and out.is_dir():
        raise ExportError(f"output '{out}' is a directory; give a file path")
    refuse_input(out, {"artifact": artifact}, ExportError)
    check_writable(out, ExportError)
    if out.exists() and not overwrite:
        raise ExportError(f"output '{out}' already exists; choose another path or pass --overwrite")
    return out


def atomic_write(out: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call ``write(tmp)`` for a temporary path beside ``out``, fsync it, then rename it to ``out``."""
    out = check_output_file(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.stem}.tmp-{uuid.uuid4().hex[:8]}{out.suffix}"  # keeps the suffix (.pt2)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        failure = write_failure(out, exc, ExportError)
        if failure is not None:
            raise failure from None
        raise
    return out


def export_artifact(path: str | Path, format: str, out: str | Path, *, attention: str = "standard",
                    opset: int | None = None, overwrite: bool = False, dynamic_batch: bool | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
    """Export the artifact at ``path`` to ``out`` as ``format`` ("onnx" | "pt2").

    Args:
        path: artifact directory (checksums are verified).
        format: "onnx" (standard ONNX ops, runs in onnxruntime) or "pt2" (``torch.export.save``).
        out: file to write (atomically).
        attention: ONNX only. "standard" = ``turbocompile::sagesla`` as standard ONNX ops that
            compute the op's reference function; "custom" = one ``turbocompile.SageSLA`` node of
            the custom domain ``turbocompile`` (a runtime must provide it).
        opset: ONNX opset (default 18, or 19 when the graph has FP8 W8A8 ops).
        overwrite: replace an existing ``out``.
        dynamic_batch: force (True) or disable (False) a dynamic batch dimension; default: the
            artifact's signature decides, falling back to the captured shapes if the graph
            specializes on the batch.
        log: callback for progress lines.

    Returns:
        A summary dict (``out``, ``format``, ``dynamic_batch``, ``input_shapes``, ``notes`` ...).
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format '{format}'; valid choices: {', '.join(FORMATS)}")
    if attention not in ATTENTION_MODES:
        raise ExportError(f"unknown attention mode '{attention}'; valid choices: {', '.join(ATTENTION_MODES)}")
    if format == "pt2" and (attention != "standard" or opset is not None):
        raise ExportError("--attention and --opset apply to --format onnx only")
    if opset is not None:
        try:
            import onnx

            newest = onnx.defs.onnx_opset_version()
        except ImportError:
            newest = DEFAULT_OPSET
        if type(opset) is not int or not DEFAULT_OPSET <= opset <= newest:
            raise ExportError(f"opset {opset} is not supported; choose {DEFAULT_OPSET} to {newest}")
    check_output_file(out, overwrite, artifact=path)  # before the (slow) export: nothing is lost or wasted
    from turbocompile.export.pt2 import export_program, save_pt2

    prog = export_program(path, dynamic_batch=dynamic_batch, log=log)
    if format == "pt2":
        return save_pt2(prog, out, overwrite=overwrite, log=log)
    try:
        from turbocompile.export.onnx import save_onnx
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx and onnxscript (pip install 'turbocompile[export]'): "
                          f"{exc}") from None
    return save_onnx(prog, out, attention=attention, opset=opset, overwrite=overwrite, log=log)
