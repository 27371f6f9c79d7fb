"""Second review round: outputs that would destroy inputs, unwritable locations found before the work,
values YAML or Python callers can slip through (NaN, duplicate keys, wrong types), SIGTERM cleanup."""

import json
import math
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import turbocompile
from turbocompile.cli import cli
from turbocompile.errors import ArtifactError, ModelConfigError, PipelineError, RecipeError
from turbocompile.output_paths import check_writable, refuse_input
from turbocompile.recipe import load_recipe


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    path = tmp_path_factory.mktemp("safety") / "art"
    turbocompile.optimize("wan-tiny", "baseline", path, dtype="float32")
    return path


@pytest.fixture
def ctx(tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({"context": torch.randn(1, 24, 64)}, str(path))
    return path


def test_overwrite_keeps_an_artifact_that_holds_other_files(art, tmp_path):
    mine = tmp_path / "mine"
    turbocompile.optimize("wan-tiny", "baseline", mine, dtype="float32")
    (mine / "notes.txt").write_text("keep")
    r = _cli("optimize", "wan-tiny", "baseline", "-o", mine, "--overwrite", "--dtype", "float32", "-q")
    assert r.exit_code == 2 and "does not list (notes.txt)" in r.stderr
    assert (mine / "notes.txt").read_text() == "keep" and (mine / "manifest.json").exists()


def test_outputs_never_replace_the_commands_own_inputs(art, ctx, tmp_path):
    before = ctx.read_bytes()
    r = _cli("run", art, "--context", ctx, "--seed", 0, "-o", ctx, "--overwrite", "-q")
    assert r.exit_code == 2 and "is the context file" in r.stderr and ctx.read_bytes() == before
    manifest = (art / "manifest.json").read_bytes()
    r = _cli("run", art, "--context", ctx, "--seed", 0, "-o", art / "manifest.json", "--overwrite", "-q")
    assert r.exit_code == 2 and "lies inside the artifact" in r.stderr
    r = _cli("export", art, "--format", "pt2", "-o", art / "manifest.json", "--overwrite", "-q")
    assert r.exit_code == 2 and "lies inside the artifact" in r.stderr
    assert (art / "manifest.json").read_bytes() == manifest
    turbocompile.load(art)  # still intact


def test_unwritable_locations_fail_before_any_work(art, ctx, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args in (("optimize", "wan-tiny", "baseline", "-o", afile / "a" / "b", "-q"),
                 ("run", art, "--context", ctx, "--seed", 0, "-o", afile / "a" / "x.safetensors", "-q"),
                 ("export", art, "--format", "pt2", "-o", afile / "y" / "x.pt2", "-q")):
        r = _cli(*args)
        assert r.exit_code == 2 and f"'{afile}' is not a directory" in r.stderr, r.output
    assert afile.read_text() == "x"


def test_check_writable_probes_the_first_existing_ancestor(tmp_path, monkeypatch):
    check_writable(tmp_path / "new" / "deeper" / "out", ArtifactError)  # creatable: fine, nothing created
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("turbocompile.output_paths.tempfile.mkstemp", refuse)
    with pytest.raises(ArtifactError, match="cannot create files in .*Permission denied"):
        check_writable(tmp_path / "new" / "out", ArtifactError)
    with pytest.raises(ArtifactError, match="is the context file"):
        refuse_input(tmp_path / "c", {"context file": tmp_path / "c"}, ArtifactError)
    refuse_input(tmp_path / "c2", {"context file": tmp_path / "c", "artifact": None}, ArtifactError)


def _write_recipe(tmp_path, body):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize("body, msg", [
    ("version: 1\npasses:\n  - name: w8a8_linear\n    options: {format: fp8, format: int8}\n",
     "'format' is given twice"),
    ("version: 1\nname: a\nname: b\n", "'name' is given twice"),
    ("version: 1\npasses:\n  - name: bake_rcm_sampler\n    options: {boundary: .nan}\n",
     r"passes\[0\].options.boundary: expected a finite number"),
    ("version: 1\npasses:\n  - name: sagesla_attention\n    options: {topk: .nan}\n",
     r"passes\[0\].options.topk: expected a finite number"),
    ("version: 1\npasses:\n  - name: bake_rcm_sampler\n    options: {sigma_max: .inf}\n",
     "expected a finite number"),
    ("version: 1\npasses:\n  - name: bake_rcm_sampler\n    options: {steps: 4, mid_times: [1.5]}\n",
     r"passes\[0\].options: rCM steps=4 needs 3 mid_times"),
    ("version: 1\npasses:\n  - name: fuse_norms\n    options: {quant_granularities: [per_tok]}\n",
     r"passes\[0\].options: quant_granularities: unknown 'per_tok'"),
])
def test_recipe_values_that_used_to_slip_through(tmp_path, body, msg):
    with pytest.raises(RecipeError, match=msg):
        load_recipe(_write_recipe(tmp_path, body))
    r = _cli("recipes", tmp_path / "r.yaml")  # the CLI validates without loading a model
    assert r.exit_code == 2 and r.stderr.count("\n") == 1


def test_recipes_command_shows_a_valid_recipe(tmp_path):
    r = _cli("recipes", "turbo-int8")
    assert r.exit_code == 0 and "turbo-int8: valid" in r.output and "sagesla_attention" in r.output


def test_verify_manifest_is_strict_json(tmp_path):
    out = tmp_path / "v"
    res = turbocompile.optimize("wan-tiny", "fused-norms", out, dtype="float32", verify=True)
    assert any(r.verify and r.verify.get("sqnr_db") == math.inf for r in res.records)  # exact on CPU

    def no_constants(c):
        raise ValueError(f"non-standard JSON constant {c}")

    m = json.loads((out / "manifest.json").read_text(), parse_constant=no_constants)
    assert any(p.get("verify", {}).get("sqnr_db") == "inf" for p in m["passes"])
    turbocompile.load(out)  # the manifest's own checksum still verifies


def test_python_api_arguments(tmp_path):
    res = turbocompile.optimize("wan-tiny", "baseline", device=torch.device("cpu"), dtype=torch.float32,
                                disable=None)
    assert res.manifest["signature"]["activation_dtype"] == "float32"
    res = turbocompile.optimize("wan-tiny", "fused-norms", dtype="float32", disable="fuse_norms")
    assert [r.status for r in res.records] == ["disabled"]
    for kw, err, msg in ((dict(recipe=None), RecipeError, "got NoneType"),
                         (dict(seed="x"), ModelConfigError, "seed 'x' is not valid"),
                         (dict(seed=-1), ModelConfigError, "seed -1 is not valid"),
                         (dict(expert="mid"), ModelConfigError, "choose one of high, low"),
                         (dict(disable=["typo"]), PipelineError, "cannot disable 'typo'"),
                         (dict(device="tpu"), ModelConfigError, "device 'tpu' is not valid")):
        kw = dict(dict(recipe="baseline", out=tmp_path / "never", dtype="float32"), **kw)
        with pytest.raises(err, match=msg):
            turbocompile.optimize("wan-tiny", kw.pop("recipe"), **kw)
    assert not (tmp_path / "never").exists()


def test_device_environment_variable(tmp_path, monkeypatch):
    """TURBOCOMPILE_DEVICE is the default device when neither the call nor the recipe names one; a bad value is
    a one-line error naming the variable (exit 2 from the CLI, nothing written)."""
    def device_of(res):
        return {t.device.type for t in res.graph_module.state_dict().values()}

    monkeypatch.setenv("TURBOCOMPILE_DEVICE", "cpu")
    assert device_of(turbocompile.optimize("wan-tiny", "baseline", dtype="float32")) == {"cpu"}
    monkeypatch.setenv("TURBOCOMPILE_DEVICE", "tpu")
    with pytest.raises(ModelConfigError, match=r"^TURBOCOMPILE_DEVICE 'tpu' is not valid; choose one of cpu, cuda"):
        turbocompile.optimize("wan-tiny", "baseline", dtype="float32")
    # the call's device wins over the variable
    assert device_of(turbocompile.optimize("wan-tiny", "baseline", dtype="float32", device="cpu")) == {"cpu"}
    r = CliRunner().invoke(cli, ["optimize", "wan-tiny", "baseline", "-o", str(tmp_path / "a")])
    assert r.exit_code == 2 and "TURBOCOMPILE_DEVICE 'tpu' is not valid" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "a").exists()
    # so does the recipe's
    in_recipe = {"version": 1, "name": "r", "model": {"device": "cpu"}, "passes": []}
    assert device_of(turbocompile.optimize("wan-tiny", in_recipe, dtype="float32")) == {"cpu"}
    # a GPU index the machine lacks
    monkeypatch.setenv("TURBOCOMPILE_DEVICE", "cuda:99")
    with pytest.raises(ModelConfigError, match=r"^TURBOCOMPILE_DEVICE 'cuda:99' (is not valid|requested but no CUDA)"):
        turbocompile.load(tmp_path / "never")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TURBOCOMPILE_DEVICE", "cuda")
        with pytest.raises(ModelConfigError, match="TURBOCOMPILE_DEVICE 'cuda' requested but no CUDA GPU is available; set TURBOCOMPILE_DEVICE=cpu"):
            turbocompile.optimize("wan-tiny", "baseline", dtype="float32")
    # unset or blank: the GPU when there is one, else the CPU
    auto = {"cuda" if torch.cuda.is_available() else "cpu"}
    for value in (None, "  "):
        if value is None:
            monkeypatch.delenv("TURBOCOMPILE_DEVICE")
        else:
            monkeypatch.setenv("TURBOCOMPILE_DEVICE", value)
        assert device_of(turbocompile.optimize("wan-tiny", "baseline", dtype="float32")) == auto


def test_cli_device_option_is_checked_before_any_work(tmp_path, art):
    """--device takes cpu, cuda or cuda:N; anything else is a one-line error (exit 2) and nothing is written."""
    for bad in ("tpu", "cuda:x", "gpu:0"):
        r = CliRunner().invoke(cli, ["optimize", "wan-tiny", "baseline", "-o", str(tmp_path / "a"), "--device", bad])
        assert r.exit_code == 2 and f"device '{bad}' is not valid; choose one of cpu, cuda (or cuda:N)" in r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
        save_file({"context": torch.randn(1, 24, 64)}, str(tmp_path / "ctx.safetensors"))
        r = CliRunner().invoke(cli, ["run", str(art), "--context", str(tmp_path / "ctx.safetensors"), "--seed", "0",
                                     "-o", str(tmp_path / "lat.safetensors"), "--device", bad])
        assert r.exit_code == 2 and f"device '{bad}' is not valid" in r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "lat.safetensors").exists()


def test_load_refuses_float32_for_a_bf16_sagesla_artifact(tmp_path):
    out = tmp_path / "sla"
    turbocompile.optimize("wan-tiny", "sagesla", out, dtype="bfloat16")
    with pytest.raises(ArtifactError, match="re-optimize with dtype float32"):
        turbocompile.load(out, dtype="float32")
    assert turbocompile.load(out, dtype=torch.float16).activation_dtype == torch.float16


def test_run_rejects_bad_conditioning_and_guidance(art, tmp_path):
    cases = {
        "nan": ({"context": torch.full((1, 24, 64), float("nan"))}, (), "'context' has NaN or inf"),
        "2d": ({"context": torch.randn(24, 64)}, (), "expected [B, Lc, text_dim]"),
        "neg": ({"context": torch.randn(1, 24, 64), "negative_context": torch.randn(1, 24, 32)},
                ("--teacher", "euler", "--steps", 2), "negative_context has shape [1, 24, 32]"),
        "guid": ({"context": torch.randn(1, 24, 64), "negative_context": torch.randn(1, 24, 64)},
                 ("--teacher", "euler", "--steps", 2, "--guidance", "nan"), "guidance must be a finite number"),
    }
    for name, (tensors, extra, msg) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        r = _cli("run", art, "--context", path, "--seed", 0, "-o", tmp_path / f"{name}-out.safetensors", "-q",
                 *extra)
        assert r.exit_code == 2 and msg in r.stderr, (name, r.output)
        assert not (tmp_path / f"{name}-out.safetensors").exists()


@pytest.mark.parametrize("kw, msg", [
    (dict(topk=None), "topk must be a number"),
    (dict(topk="0.1"), "topk must be a number"),
    (dict(topk=0.1, block_q=64.5), "block_q must be an integer"),
    (dict(topk=0.1, block_k=None), "block_k must be an integer"),
])
def test_sagesla_argument_types(kw, msg):
    q = torch.randn(1, 70, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=msg):
        turbocompile.ops.sagesla(q, q, q, **kw)
    with pytest.raises(ValueError, match="q must be a tensor"):
        turbocompile.ops.sagesla(None, q, q, topk=0.1)


def test_sigterm_while_writing_leaves_nothing_behind(tmp_path):
    """SIGTERM becomes SystemExit, so the artifact writer removes its temporary directory."""
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        import turbocompile.artifact as a
        def slow(*args, **kw):
            pathlib.Path({str(marker)!r}).touch()
            time.sleep(60)
        a.save_file = slow
        from turbocompile.cli import main
        main(["optimize", "wan-tiny", "baseline", "-o", {str(tmp_path / "out")!r}, "--dtype", "float32", "-q"])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "terminated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["writing"]
