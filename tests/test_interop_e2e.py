"""Issue-2 acceptance: checkpoints in every layout -> optimize -> artifact -> load, vs diffusers."""

import pytest
import torch
from click.testing import CliRunner

import turbocompile
from turbocompile.checkpoints import load_model, save_original, save_turbodiffusion
from turbocompile.cli import cli
from turbocompile.metrics import rel_err

diffusers = pytest.importorskip("diffusers")
from tests.checkpoints.test_diffusers import _dif_config, _dif_forward, _randomize  # noqa: E402


@pytest.fixture(scope="module", params=["t2v", "i2v"])
def saved(request, tmp_path_factory):
    i2v = request.param == "i2v"
    torch.manual_seed(0)
    dif = diffusers.WanTransformer3DModel(**_dif_config(i2v)).eval()
    _randomize(dif, seed=7)
    root = tmp_path_factory.mktemp(f"interop_{request.param}")
    dif.save_pretrained(root / "diffusers")
    g = torch.Generator().manual_seed(1)
    lc = 512 if i2v else 24  # diffusers' I2V splits the context at len - 512
    args = (torch.randn(2, 16, 3, 8, 8, generator=g), torch.tensor([937.0, 120.0]),
            torch.randn(2, lc, 64, generator=g),
            torch.randn(2, 20, 3, 8, 8, generator=g) if i2v else None,
            torch.randn(2, 257, 1280, generator=g) if i2v else None)
    with torch.no_grad():
        ref = _dif_forward(dif, *args)
    recipe = {"version": 1, "name": "baseline-64px",
              "model": {"frames": 9, "size": "64x64", "text_len": lc, "dtype": "float32", "device": "cpu"}}
    return root, args, ref, recipe


def _run(model, args):
    x, t, ctx, y, clip = args
    with torch.no_grad():
        return model(x, t, ctx, y=y, clip_fea=clip)


def test_diffusers_directory_matches_diffusers_after_optimize_and_load(saved):
    root, args, ref, recipe = saved
    turbocompile.optimize(root / "diffusers", recipe, root / "art_dif")
    out = _run(turbocompile.load(root / "art_dif"), args)
    assert rel_err(out, ref) <= 1e-5


def test_original_and_turbodiffusion_layouts_give_the_same_artifact_output(saved):
    root, args, ref, recipe = saved
    model, _ = load_model(root / "diffusers", dtype=torch.float32)
    save_original(model, root / "orig" / "diffusion_pytorch_model.safetensors")
    save_turbodiffusion(model, root / "td.pth", net_prefix=True)
    outs = {}
    for name, src in (("dif", root / "diffusers"), ("orig", root / "orig"), ("td", root / "td.pth")):
        art = root / f"cmp_{name}"
        if not art.exists():
            turbocompile.optimize(src, recipe, art)
        outs[name] = _run(turbocompile.load(art), args)
    assert torch.equal(outs["orig"], outs["dif"]) and torch.equal(outs["td"], outs["dif"])
    assert rel_err(outs["td"], ref) <= 1e-5


def test_bad_checkpoints_exit_2_without_artifact(saved, tmp_path):
    root, _, _, _ = saved
    runner = CliRunner()
    trunc = tmp_path / "broken.safetensors"
    data = (next((root / "diffusers").glob("*.safetensors"))).read_bytes()
    trunc.write_bytes(data[: len(data) // 3])
    wrong = tmp_path / "notes.txt"
    wrong.write_text("not a checkpoint")
    for bad in (trunc, wrong, tmp_path / "missing.safetensors"):
        out = tmp_path / f"out_{bad.stem}"
        res = runner.invoke(cli, ["optimize", str(bad), "baseline", "-o", str(out)])
        assert res.exit_code == 2, res.output
        assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
        assert not out.exists()
