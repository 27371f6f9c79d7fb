"""``turbocompile run``: baked sampler and denoiser artifacts end to end, and its one-line errors."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import turbocompile
from turbocompile.cli import cli
from turbocompile.cli_run import run
from turbocompile.sampling import rcm_sample
from turbocompile.sampling.compiled import generate

if "run" not in cli.commands:  # the lead wires it into cli.py; until then, add it here
    cli.add_command(run)

SMALL = {"frames": 5, "size": "64x64"}


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    den = turbocompile.optimize("wan-tiny", {"version": 1, "model": SMALL, "passes": []}, root / "den",
                                dtype="float32", device="cpu", seed=2)
    smp = turbocompile.optimize("wan-tiny", {"version": 1, "model": SMALL, "passes": [
        {"name": "bake_rcm_sampler", "options": {"steps": 2}}]}, root / "smp", dtype="float32", device="cpu", seed=2)
    g = torch.Generator().manual_seed(1)
    cond = root / "cond.safetensors"
    save_file({"context": torch.randn(1, 24, 64, generator=g),
               "negative_context": torch.randn(1, 24, 64, generator=g)}, str(cond))
    return root, den.artifact, smp.artifact, cond


def _invoke(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def test_run_sampler_artifact(arts):
    root, den, smp, cond = arts
    out = root / "lat.safetensors"
    r = _invoke(smp, "--context", cond, "--seed", 3, "-o", out, "--frames", 5, "--size", "64x64", "-q")
    assert r.exit_code == 0, r.output
    lat = load_file(str(out))["latents"]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["seed"] == "3" and meta["steps"] == "2" and meta["sampler"] == "rcm-baked" and meta["artifact"] == str(smp)
    # same as the Python loop over the denoiser artifact with the same seed (noise and step noise from one generator)
    net = turbocompile.load(den, device="cpu")
    ctx = load_file(str(cond))["context"]
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(lat.shape, generator=g)
    ref = rcm_sample(net, noise, ctx, steps=2, net_dtype=torch.float32, generator=g)
    assert torch.equal(lat, ref)
    # same seed, same file content; Python API gives the same
    r2 = _invoke(smp, "--context", cond, "--seed", 3, "-o", root / "lat2.safetensors", "-q")
    assert r2.exit_code == 0 and torch.equal(load_file(str(root / "lat2.safetensors"))["latents"], lat)
    assert torch.equal(generate(smp, str(cond), seed=3).latents, lat)
    assert not [p for p in root.iterdir() if p.name.startswith(".lat")]   # no temp files left


def test_run_denoiser_rcm_and_teacher(arts):
    root, den, _, cond = arts
    out = root / "den.safetensors"
    r = _invoke(den, "--context", cond, "--seed", 3, "--steps", 2, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    lat = load_file(str(out))["latents"]
    r = _invoke(den, "--context", cond, "--seed", 3, "--teacher", "euler", "--steps", 3, "--guidance", 5,
                "-o", root / "teacher.safetensors", "-q")
    assert r.exit_code == 0, r.output
    teacher = load_file(str(root / "teacher.safetensors"))["latents"]
    assert teacher.shape == lat.shape and teacher.isfinite().all() and not torch.equal(teacher, lat)


@pytest.mark.parametrize("extra, message", [
    (["--steps", "4"], "differs from the 2 steps baked"),
    (["--frames", "9"], "does not match the artifact"),
    (["--size", "128x128"], "does not match the artifact"),
    (["--size", "big"], "WIDTHxHEIGHT"),
    (["--teacher", "unipc"], "needs a denoiser artifact"),
])
def test_run_errors_exit_2(arts, extra, message):
    root, _, smp, cond = arts
    r = _invoke(smp, "--context", cond, "--seed", 0, "-o", root / "x.safetensors", *extra)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1


def test_run_cuda_graph_errors_before_sampling(arts, tmp_path):
    root, den, smp, cond = arts
    out = tmp_path / "o.safetensors"
    r = _invoke(smp, "--context", cond, "--seed", 0, "--cuda-graph", "--device", "cpu", "-o", out)
    assert r.exit_code == 2, r.output
    assert "needs a CUDA GPU" in r.output and len(r.output.strip().splitlines()) == 1 and not out.exists()
    r = _invoke(den, "--context", cond, "--seed", 0, "--cuda-graph", "--teacher", "euler", "--device", "cpu", "-o", out)
    assert r.exit_code == 2 and "does not combine with --teacher euler" in r.output and not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_run_cuda_graph_gives_the_eager_latents_on_cuda(tmp_path):
    recipe = {"version": 1, "model": SMALL, "passes": [{"name": "w8a8_linear", "options": {"format": "fp8"}},
                                                         "sagesla_attention", "fuse_norms"]}
    den = turbocompile.optimize("wan-tiny", recipe, tmp_path / "den", dtype="bfloat16", device="cuda", seed=2).artifact
    recipe["passes"] = [*recipe["passes"], {"name": "bake_rcm_sampler", "options": {"steps": 2}}]
    smp = turbocompile.optimize("wan-tiny", recipe, tmp_path / "smp", dtype="bfloat16", device="cuda", seed=2).artifact
    cond = tmp_path / "cond.safetensors"
    save_file({"context": torch.randn(1, 24, 64, generator=torch.Generator().manual_seed(1))}, str(cond))
    for art in (smp, den):  # the baked sampler's graph; the denoiser's graph under the rCM loop
        eager = generate(art, str(cond), seed=4, steps=2, device="cuda").latents
        graphed = generate(art, str(cond), seed=4, steps=2, device="cuda", cuda_graph=True).latents
        assert eager.isfinite().all() and torch.equal(graphed, eager)
    out = tmp_path / "lat.safetensors"
    r = _invoke(smp, "--context", cond, "--seed", 4, "--cuda-graph", "--device", "cuda", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert torch.equal(load_file(str(out))["latents"], generate(smp, str(cond), seed=4, device="cuda").latents.cpu())


def test_run_input_file_errors(arts, tmp_path):
    root, den, smp, cond = arts
    r = _invoke(smp, "--context", tmp_path / "missing.pt", "--seed", 0, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 2 and "does not exist" in r.output
    bad = tmp_path / "bad.pt"
    torch.save({"prompt": torch.zeros(1)}, bad)
    r = _invoke(smp, "--context", bad, "--seed", 0, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 2 and "no 'context'" in r.output
    wrong = tmp_path / "wrong.pt"
    torch.save({"context": torch.zeros(1, 7, 64)}, wrong)
    r = _invoke(smp, "--context", wrong, "--seed", 0, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 2 and "context has shape" in r.output
    only_pos = tmp_path / "pos.pt"
    torch.save({"context": torch.zeros(1, 24, 64)}, only_pos)
    r = _invoke(den, "--context", only_pos, "--seed", 0, "--teacher", "euler", "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 2 and "negative_context" in r.output
    r = _invoke(tmp_path / "nope", "--context", cond, "--seed", 0, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 2 and "does not exist" in r.output
