"""torch.export ``.pt2`` of wan-tiny artifacts: round trip bit-exact on CPU, dynamic batch, CLI."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from click.testing import CliRunner

import turbocompile
from turbocompile.export import ExportError, export_artifact
from turbocompile.export.pt2 import example_args, load_pt2, save_pt2

from tests.export import artifact, program, tmp_root


@pytest.mark.parametrize("key", ["baseline", "int8_block_fused", "sagesla", "fp8_bound"])
def test_pt2_round_trip_is_bit_exact(key):
    prog = program(key)
    out = tmp_root() / f"{key}.pt2"
    info = save_pt2(prog, out)
    assert info["dynamic_batch"] is True and info["input_shapes"]["x"][0] == "batch"
    ep, meta = load_pt2(out)
    assert meta["recipe"] == turbocompile.load(artifact(key), device="cpu").manifest["recipe"]["name"]
    # the custom ops survive as opaque nodes (not decomposed into aten)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    if key != "baseline":
        assert any(t.startswith("turbocompile.") for t in targets), targets
    model = turbocompile.load(artifact(key), device="cpu")
    for batch, seed in ((1, 3), (3, 4)):  # a batch other than the traced one (2): dynamic
        args = example_args(model.manifest, batch, seed=seed)
        want = model(*args)
        got = ep.module()(*args)
        assert got.shape == want.shape
        assert torch.equal(got, want), (key, batch, (got - want).abs().max().item())


def test_pt2_plain_torch_export_load_after_import(tmp_path):
    """The documented path: ``torch.export.load`` after ``import turbocompile`` works (values close)."""
    out = tmp_path / "m.pt2"
    save_pt2(program("int8_block_fused"), out)
    ep = torch.export.load(str(out))
    model = turbocompile.load(artifact("int8_block_fused"), device="cpu")
    args = example_args(model.manifest, 2, seed=9)
    want, got = model(*args), ep.module()(*args)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_cli_export_pt2_and_errors(tmp_path):
    from turbocompile.cli_export import export

    out = tmp_path / "b.pt2"
    r = CliRunner().invoke(export, [str(artifact("baseline")), "--format", "pt2", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert "dynamic batch" in r.output and out.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    with zipfile.ZipFile(out) as z:
        meta = json.loads(next(z.read(n) for n in z.namelist() if n.endswith("turbocompile.json")))
    assert meta["model"] == "wan-tiny" and json.loads(meta["input_shapes"])["context"][0] == "batch"
    for argv, needle in (
        ([str(tmp_path / "missing"), "--format", "pt2", "-o", str(tmp_path / "x.pt2")], "does not exist"),
        ([str(artifact("baseline")), "--format", "pt2", "--attention", "custom", "-o", str(tmp_path / "y")],
         "onnx only"),
        ([str(artifact("baseline")), "--format", "onnx", "--opset", "13", "-o", str(tmp_path / "z")], "opset 13"),
    ):
        r = CliRunner().invoke(export, argv)
        assert r.exit_code == 2, r.output
        assert needle in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_load_pt2_refuses_garbage(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ExportError, match="not a readable .pt2"):
        load_pt2(bad)
    with pytest.raises(ExportError, match="unknown export format"):
        export_artifact(artifact("baseline"), "tflite", tmp_path / "m")
