"""End-to-end CLI: exit codes, one-line errors, no artifact left behind on failure."""

import json
import os
import subprocess
import sys

import pytest
import torch

import turbocompile
from turbocompile.capture import example_inputs
from turbocompile.model.config import get_preset
from turbocompile.model.wan import WanModel, init_random_

from click.testing import CliRunner

from turbocompile.cli import cli

CLI = [sys.executable, "-m", "turbocompile.cli"]


def run(*args, cwd=None):
    """The real console entry point in a subprocess (exit codes as a user sees them)."""
    env = dict(os.environ, TURBOCOMPILE_DEBUG="")
    return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def run_inproc(*args):
    """Same CLI in-process (fast); stderr and stdout kept apart."""
    res = CliRunner().invoke(cli, list(args))
    res.returncode = res.exit_code
    return res


def test_optimize_inspect_load(tmp_path):
    out = tmp_path / "tiny"
    r = run("optimize", "wan-tiny", "recipes/baseline.yaml", "-o", str(out), "--dtype", "float32", "--verify",
            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr
    assert "random" in r.stdout and "wrote" in r.stdout
    r = run("inspect", str(out), "--json")
    assert r.returncode == 0
    manifest = json.loads(r.stdout)
    assert manifest["model"]["config"]["name"] == "wan-tiny"
    assert run_inproc("inspect", str(out)).stdout.count("float32") >= 1
    cfg = get_preset("wan-tiny")
    inp = example_inputs(cfg, cfg.video_shape(), seed=11)
    eager = init_random_(WanModel(cfg), seed=0)
    assert torch.equal(turbocompile.load(out)(*inp.values()), eager(*inp.values()))


@pytest.mark.parametrize("args,needle", [
    (["optimize", "nope-model", "baseline", "-o", "{out}"], "neither a built-in model"),
    (["optimize", "wan-tiny", "no-such-recipe", "-o", "{out}"], "no recipe file or built-in recipe"),
    (["optimize", "wan-tiny", "{bad}", "-o", "{out}"], "passes[0].options"),
    (["optimize", "wan-tiny", "baseline", "-o", "{out}", "--dtype", "int3"], "Invalid value for '--dtype'"),
    (["optimize", "wan-tiny", "baseline", "-o", "{out}", "--disable-pass", "zzz"], "cannot disable 'zzz'"),
    (["inspect", "{out}"], "does not exist"),
])
def test_user_errors_exit_2_one_line_no_artifact(tmp_path, args, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npasses:\n  - name: baseline_does_not_exist\n")
    if needle.startswith("passes[0]"):
        needle = "passes[0].name: unknown pass"
    out = tmp_path / "out"
    r = run_inproc(*[a.format(out=out, bad=bad) for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_existing_output_is_not_clobbered(tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("data")
    r = run_inproc("optimize", "wan-tiny", "baseline", "-o", str(out), "--dtype", "float32")
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (out / "precious.txt").read_text() == "data"


def test_listings():
    assert "baseline" in run_inproc("recipes").stdout
    assert run_inproc("passes").returncode == 0
    assert "wan2.1-t2v-14b" in run_inproc("models").stdout
