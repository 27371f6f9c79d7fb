"""``turbocompile run``: sample latents from an artifact (the lead adds it with ``cli.add_command(run)``).

A baked sampler artifact runs its baked rCM loop (one graph call); a denoiser artifact runs
the Python rCM loop, or with ``--teacher euler|unipc`` the Wan teacher with CFG. The Python
equivalent is :func:`turbocompile.sampling.compiled.generate`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import click

from turbocompile.errors import InputError
from turbocompile.output_paths import check_writable, refuse_input, write_failure

__all__ = ["run", "write_latents"]


def check_latents_path(path: str | Path, overwrite: bool, *, inputs: dict | None = None) -> Path:
    """One-line :class:`InputError` unless latents can be written to ``path`` without losing data:
    not a directory, a writable location, not one of ``inputs`` (name -> path: the context file, or
    inside the artifact), an existing file only with ``overwrite``."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise InputError(f"output '{path}' is a directory; give a .safetensors file name")
    refuse_input(path, inputs or {}, InputError)
    check_writable(path, InputError)
    if path.exists() and not overwrite:
        raise InputError(f"output '{path}' already exists; choose another path or pass --overwrite")
    return path


def write_latents(path: str | Path, latents, metadata: dict[str, str], *, overwrite: bool = False) -> Path:
    """Write ``{"latents": latents}`` with string metadata to ``path`` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = check_latents_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_file({"latents": latents.contiguous()}, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        failure = write_failure(path, exc, InputError)
        if failure is not None:
            raise failure from None
        raise
    return path


def _parse_size(text):
    if text is None:
        return None
    from turbocompile.recipe import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise InputError(str(exc)) from None


@click.command(name="run")
@click.argument("artifact", type=click.Path())
@click.option("--context", "context", required=True, type=click.Path(), help="Conditioning tensors file.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), required=True, help="Seed of the initial and SDE noise.")
@click.option("--steps", type=int, default=None, help="Sampler steps (sampler artifacts: the baked value).")
@click.option("--frames", type=int, default=None, help="Check: video frames the artifact is built for.")
@click.option("--size", default=None, help="Check: WIDTHxHEIGHT the artifact is built for.")
@click.option("--teacher", type=click.Choice(["euler", "unipc"]), default=None,
              help="Teacher sampler with CFG (denoiser artifacts).")
@click.option("--guidance", type=float, default=None, help="Teacher CFG scale (with --teacher; default 5).")
@click.option("--shift", type=float, default=None, help="Teacher schedule shift (with --teacher; default 5).")
@click.option("--mode", type=click.Choice(["sde", "ode"]), default=None,
              help="rCM mode for denoiser artifacts (default sde; a baked sampler's mode is fixed).")
@click.option("--device", metavar="cpu|cuda|cuda:N", default=None,
              help="Where to run (default: $TURBOCOMPILE_DEVICE, else cuda when available).")
@click.option("--cuda-graph", "cuda_graph", is_flag=True,
              help="Replay a CUDA graph captured at load (CUDA only; the artifact's batch; not with --teacher).")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output .safetensors file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def run(artifact, context, seed, steps, frames, size, teacher, guidance, shift, mode, device, cuda_graph, out,
        overwrite, quiet):
    """Sample latents from ARTIFACT (baked sampler or denoiser) into a safetensors file.

    --context is a .safetensors/.pt file holding 'context' [B, Lc, text_dim] and optionally
    'y', 'clip_fea', 'negative_context'. A sampler artifact's step count is baked (--steps must
    match it); a denoiser artifact runs rCM (default 4 steps) or, with --teacher, the Wan
    teacher with CFG (default 50 steps). --frames/--size must match the artifact's geometry.
    --cuda-graph captures the graph once at load and replays it (same latents; no per-kernel
    launch cost on the host). Writes {'latents'} plus metadata (seed, steps, sampler, artifact),
    atomically.
    """
    from turbocompile.sampling.compiled import generate

    # before sampling: nothing is lost (not even the inputs), nothing is wasted
    check_latents_path(out, overwrite, inputs={"context file": context, "artifact": artifact})
    res = generate(artifact, context, seed=seed, steps=steps, frames=frames, size=_parse_size(size),
                   teacher=teacher, guidance=guidance, shift=shift, mode=mode, device=device,
                   progress=not quiet, cuda_graph=cuda_graph)
    meta = dict(res.metadata, artifact=str(artifact))
    write_latents(out, res.latents, meta, overwrite=overwrite)
    if not quiet:
        click.echo(f"wrote {out}: latents {list(res.latents.shape)} ({meta['sampler']}, {meta['steps']} steps, "
                   f"seed {seed})")
