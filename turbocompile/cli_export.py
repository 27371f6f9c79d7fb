"""``turbocompile export``: an artifact -> ONNX or torch.export ``.pt2`` (the lead wires it into cli.py).

Errors are :class:`~turbocompile.errors.TurboCompileError` subclasses, so the CLI group prints one
line and exits 2; used standalone, this command does the same itself.
"""

from __future__ import annotations

import sys

import click

from turbocompile.errors import TurboCompileError

__all__ = ["export"]


def _run(artifact, fmt, out, attention, opset, overwrite, quiet):
    from turbocompile.export import export_artifact

    log = None if quiet else (lambda line: click.echo(f"[turbocompile] {line}", err=True))
    info = export_artifact(artifact, fmt, out, attention=attention, opset=opset, overwrite=overwrite, log=log)
    shapes = ", ".join(f"{k}{v}" for k, v in info["input_shapes"].items())
    batch = "dynamic batch" if info["dynamic_batch"] else "fixed shapes (recorded in the file's metadata)"
    click.echo(f"wrote {info['out']} ({fmt}, {batch}: {shapes})")
    for note in info["notes"]:
        click.echo(f"note: {note}")


@click.argument("artifact", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["onnx", "pt2"]), required=True,
              help="onnx: standard ONNX ops (onnxruntime; its CPU provider needs a float32 artifact); "
                   "pt2: torch.export.save (load after import turbocompile).")
@click.option("-o", "--out", required=True, type=click.Path(), help="File to write (atomically).")
@click.option("--attention", type=click.Choice(["standard", "custom"]), default="standard", show_default=True,
              help="ONNX: sagesla as standard ops (same function as the op) or as turbocompile.SageSLA nodes.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18; 19 when FP8 ops are present).")
@click.option("--overwrite", is_flag=True, help="Replace an existing FILE.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the result and errors.")
def _export(artifact, fmt, out, attention, opset, overwrite, quiet):
    """Export ARTIFACT (an optimized artifact directory) to ONNX or .pt2."""
    try:
        _run(artifact, fmt, out, attention, opset, overwrite, quiet)
    except TurboCompileError as exc:
        click.echo(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        sys.exit(2)


export = click.command("export")(_export)
