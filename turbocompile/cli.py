"""``turbocompile`` command line (click). A thin shell over the Python API.

Exit codes: 0 success; 2 user error (one-line message, no traceback); 1 internal error
(set ``TURBOCOMPILE_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import click

from turbocompile.errors import TurboCompileError

__all__ = ["main", "cli"]


def _fail_user(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Maps turbocompile errors to exit 2 and anything unexpected to exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TurboCompileError as exc:
            _fail_user(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (`turbocompile recipes | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except Exception as exc:  # noqa: BLE001 - the internal-error boundary
            if os.environ.get("TURBOCOMPILE_DEBUG"):
                traceback.print_exc()
            click.echo(f"internal error: {type(exc).__name__}: {exc} (set TURBOCOMPILE_DEBUG=1 for a traceback)",
                       err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="turbocompile")
def cli():
    """turbocompile: a graph compiler for Wan video diffusion transformers."""


@cli.command()
@click.argument("model")
@click.argument("recipe")
@click.option("-o", "--out", required=True, type=click.Path(), help="Artifact directory to write.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Activation/weight dtype (default: the recipe's, else bfloat16).")
@click.option("--device", metavar="cpu|cuda|cuda:N", default=None,
              help="Device to optimize on (default: the recipe's, else $TURBOCOMPILE_DEVICE, else cuda when available).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 2), default=0, show_default=True,
              help="Seed of built-in random weights.")
@click.option("--verify", is_flag=True, help="Check each pass numerically against the graph before it.")
@click.option("--disable-pass", "disable", multiple=True, help="Skip a pass by name (repeatable).")
@click.option("--expert", type=click.Choice(["high", "low"]), default=None,
              help="Expert of a Wan2.2 A14B checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact at OUT.")
@click.option("--strict", is_flag=True, help="Turn skipped rewrites into errors.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def optimize(model, recipe, out, dtype, device, seed, verify, disable, expert, overwrite, strict, quiet):
    """Optimize MODEL with RECIPE and write an artifact to OUT.

    MODEL is a built-in model name (random weights; see `turbocompile models`) or a checkpoint
    file/directory (original Wan, TurboDiffusion or diffusers layout). RECIPE is a YAML file
    or a built-in recipe name (see `turbocompile recipes`).
    """
    from turbocompile.api import optimize as run

    log = None if quiet else (lambda line: click.echo(f"[turbocompile] {line}", err=True))
    res = run(model, recipe, out, dtype=dtype, device=device, seed=seed, verify=verify, disable=disable,
              overwrite=overwrite, strict=strict, expert=expert, progress=not quiet, log=log)
    if not quiet:
        for r in res.records:
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
            if r.verify and "rel_err" in r.verify:
                ver = f" verify: rel_err={r.verify['rel_err']:.2e} sqnr={r.verify['sqnr_db']:.1f}dB"
            else:
                ver = f" verify: skipped ({r.verify['skipped']})" if r.verify else ""
            click.echo(f"  {r.name:<22} {r.status:<8} {r.seconds:7.3f}s  {stats}{ver}")
        src = res.manifest["model"]["source"]
        if src.get("kind") == "builtin":
            click.echo(f"note: {src['name']} uses {src['weights']}")
        click.echo(f"wrote {res.artifact}")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.option("--no-checksums", is_flag=True, help="Skip sha256 verification (faster on big artifacts).")
def inspect(artifact, as_json, no_checksums):
    """Show an artifact's model config, recipe, per-pass stats and weights."""
    from turbocompile.artifact import read_manifest

    m = read_manifest(artifact, verify_checksums=not no_checksums)
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    try:
        lines = _describe(artifact, m)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        from turbocompile.errors import ArtifactError

        raise ArtifactError(f"{artifact}: manifest has a missing or malformed field ({type(exc).__name__}: {exc})") \
            from None
    for line in lines:
        click.echo(line)


def _describe(artifact, m: dict) -> list[str]:
    """Human-readable summary lines of a validated manifest."""
    cfg = m["model"]["config"]
    vs = m["model"]["video_shape"]
    out = [
        f"artifact     {artifact}  (format v{m['format_version']}, {m.get('kind', 'denoiser')}, turbocompile "
        f"{m.get('turbocompile_version')}, torch {m.get('torch_version')})",
        f"model        {cfg['name']}: dim {cfg['dim']}, {cfg['num_layers']} layers, {cfg['num_heads']} heads, "
        f"{cfg['model_type']}; source {m['model']['source']}",
        f"video        {vs['width']}x{vs['height']}, {vs['frames']} frames, grid {vs['grid']}, "
        f"L={vs['seq_len']}, batch {vs['batch']}",
        f"recipe       {m['recipe']['name']}: {m['recipe'].get('description', '')}",
    ]
    for p in m["passes"]:
        stats = ", ".join(f"{k}={v}" for k, v in p.get("stats", {}).items())
        out.append(f"  pass {p['name']:<22} {p['status']:<8} {p.get('seconds', 0):7.3f}s  {stats}")
    t = m["tensors"]
    out.append(f"weights      {t['count']} tensors, {_fmt_bytes(t['bytes'])}")
    for dt, e in sorted(t["by_dtype"].items()):
        out.append(f"  {dt:<14} {e['count']:5d} tensors  {_fmt_bytes(e['bytes'])}")
    sig = m["signature"]
    ins = ", ".join(f"{i['name']}{i['shape']}" for i in sig["inputs"])
    out.append(f"signature    ({ins}) -> {sig['output']['dtype']}{sig['output']['shape']}")
    return out


@cli.command()
@click.argument("recipe", nargs=-1)
def recipes(recipe):
    """List the built-in recipes, or validate and show RECIPE (a YAML file or a built-in name).

    A recipe given here is checked as `optimize` checks it (keys, pass names, option types and
    ranges), without loading a model.
    """
    import yaml

    from turbocompile.recipe import builtin_recipes, load_recipe

    if not recipe:
        for name, path in builtin_recipes().items():
            r = load_recipe(path)
            click.echo(f"{name:<20} {r.description}")
        return
    for text in recipe:
        r = load_recipe(text)
        click.echo(f"# {text}: valid")
        click.echo(yaml.safe_dump(r.to_dict(), sort_keys=False, default_flow_style=None).rstrip())


@cli.command()
def passes():
    """List the registered passes and their options."""
    from turbocompile.passbase import registered_passes

    found = registered_passes()
    if not found:
        click.echo("(no passes registered)")
    for name, cls in found.items():
        req = ", ".join(sorted(cls.requires)) or "-"
        prov = ", ".join(sorted(cls.provides)) or "-"
        click.echo(f"{name}: {cls.description}  [requires: {req}; provides: {prov}]")
        for opt, doc in cls.option_docs().items():
            click.echo(f"    {opt}: {doc}")


@cli.command()
def models():
    """List the built-in models (random weights; for checkpoints pass a path)."""
    from turbocompile.model.config import PRESETS

    for name, c in sorted(PRESETS.items()):
        click.echo(f"{name:<18} {c.model_type:<5} dim {c.dim:<5} layers {c.num_layers:<3} heads {c.num_heads:<3} "
                   f"default {c.default_size[0]}x{c.default_size[1]}, {c.default_frames} frames")


def _register_subcommands() -> None:
    from turbocompile.cli_run import run

    cli.add_command(run)
    try:
        from turbocompile.cli_export import export
    except ImportError:  # pragma: no cover - export support not installed
        return
    cli.add_command(export)


_register_subcommands()


def _terminated(signum, frame):
    """SIGTERM as an exception, so that the writers' cleanup (temporary files and directories) runs."""
    click.echo("terminated", err=True)
    raise SystemExit(128 + signum)


def main(argv=None):
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(args=argv, prog_name="turbocompile", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        sys.exit(code)


if __name__ == "__main__":
    main()
