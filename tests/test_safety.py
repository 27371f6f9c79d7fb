"""Nothing is lost or silently ignored: output paths, recipe paths, flags that do not apply (review fixes)."""

import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import turbocompile
from turbocompile.cli import cli
from turbocompile.model.wan import WanModel, init_random_


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_overwrite_only_replaces_artifacts(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("important")
    r = _cli("optimize", "wan-tiny", "baseline", "-o", precious, "--overwrite", "--dtype", "float32")
    assert r.exit_code == 2 and "is not a turbocompile artifact" in r.stderr
    assert (precious / "data.txt").read_text() == "important"
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = _cli("optimize", "wan-tiny", "baseline", "-o", afile, "--overwrite")
    assert r.exit_code == 2 and afile.read_text() == "x"
    r = _cli("optimize", "wan-tiny", "baseline", "-o", afile / "sub")
    assert r.exit_code == 2 and "is not a directory" in r.stderr
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = _cli("optimize", "wan-tiny", "baseline", "-o", ".", "--overwrite")
        assert r.exit_code == 2 and "current directory" in r.stderr
    finally:
        os.chdir(cwd)
    art = tmp_path / "art"
    assert _cli("optimize", "wan-tiny", "baseline", "-o", art, "--dtype", "float32").exit_code == 0
    assert _cli("optimize", "wan-tiny", "baseline", "-o", art, "--dtype", "float32", "--overwrite").exit_code == 0


def test_mistyped_recipe_path_is_an_error_not_the_builtin(tmp_path):
    r = _cli("optimize", "wan-tiny", "nosuch/turbo-int8.yaml", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    bad = tmp_path / "r.yaml"
    bad.write_bytes(b"\xff\xfe version: 1")
    r = _cli("optimize", "wan-tiny", bad, "-o", tmp_path / "y")
    assert r.exit_code == 2 and "UTF-8" in r.stderr


def test_run_and_export_never_overwrite_silently(tmp_path):
    art = tmp_path / "bake"
    turbocompile.optimize("wan-tiny", "rcm-4step", art, dtype="float32")
    ctx = tmp_path / "c.safetensors"
    save_file({"context": torch.randn(1, 24, 64)}, str(ctx))
    out = tmp_path / "lat.safetensors"
    out.write_text("keep")
    r = _cli("run", art, "--context", ctx, "--seed", 0, "-o", out, "-q")
    assert r.exit_code == 2 and "already exists" in r.stderr and out.read_text() == "keep"
    r = _cli("run", art, "--context", ctx, "--seed", 0, "-o", tmp_path / "l2.safetensors", "--mode", "ode", "-q")
    assert r.exit_code == 2 and "baked into this sampler" in r.stderr
    r = _cli("run", art, "--context", ctx, "--seed", 0, "-o", tmp_path / "l3.safetensors", "--guidance", 3, "-q")
    assert r.exit_code == 2 and "teacher" in r.stderr
    r = _cli("run", art, "--context", ctx, "--seed", 10**30, "-o", tmp_path / "l4.safetensors", "-q")
    assert r.exit_code == 2
    dst = tmp_path / "model.pt2"
    dst.write_text("keep")
    r = _cli("export", art, "--format", "pt2", "-o", dst)
    assert r.exit_code == 2 and "already exists" in r.stderr and dst.read_text() == "keep"
    r = _cli("export", art, "--format", "onnx", "-o", tmp_path / "m.onnx", "--opset", 99)
    assert r.exit_code == 2 and "opset 99 is not supported" in r.stderr


def test_load_validates_dtype_and_device_for_every_kind(tmp_path):
    art = tmp_path / "bake"
    turbocompile.optimize("wan-tiny", "rcm-4step", art, dtype="float32")
    with pytest.raises(turbocompile.TurboCompileError, match="dtype 'int4' is not valid"):
        turbocompile.load(art, dtype="int4")
    with pytest.raises(turbocompile.TurboCompileError, match="re-optimize for bfloat16"):
        turbocompile.load(art, dtype="bfloat16")
    with pytest.raises(turbocompile.TurboCompileError, match="device 'tpu' is not valid"):
        turbocompile.load(art, device="tpu")


def test_optimize_does_not_change_the_callers_model():
    model = init_random_(WanModel(turbocompile.get_preset("wan-tiny")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    turbocompile.optimize(model, {"version": 1, "model": {"text_len": 8}}, dtype="bfloat16")
    assert model.config.text_len == 24
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
