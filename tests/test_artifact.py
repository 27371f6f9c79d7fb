"""Artifacts: exact round trip, atomic writes, and refusal of edited/truncated/newer artifacts."""

import json

import pytest
import torch

import turbocompile
from turbocompile.artifact import FORMAT_VERSION, _manifest_digest
from turbocompile.capture import example_inputs
from turbocompile.errors import ArtifactError, InputError
from turbocompile.model.config import get_preset
from turbocompile.model.wan import WanModel, init_random_


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny"
    turbocompile.optimize("wan-tiny", "baseline", out, dtype="float32", seed=7)
    return out


def test_load_reproduces_eager_exactly(tiny_artifact):
    cfg = get_preset("wan-tiny")
    eager = init_random_(WanModel(cfg), seed=7)
    model = turbocompile.load(tiny_artifact)
    for seed in (0, 1, 2):
        inp = example_inputs(cfg, cfg.video_shape(), seed=seed)
        assert torch.equal(model(inp["x"], inp["timestep"], inp["context"]),
                           eager(inp["x"], inp["timestep"], inp["context"]))
    bf = turbocompile.load(tiny_artifact, dtype="bfloat16")
    inp = example_inputs(cfg, cfg.video_shape(), seed=5)
    eb = eager.to(torch.bfloat16)
    assert torch.equal(bf(inp["x"], inp["timestep"], inp["context"]), eb(inp["x"], inp["timestep"], inp["context"]))


def test_manifest_contents(tiny_artifact):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION
    assert m["model"]["source"]["weights"].startswith("random")
    assert m["recipe"]["name"] == "baseline"
    assert set(m["files"]) >= {"graph.json", "graph.py", "weights-00001-of-00001.safetensors"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert (tiny_artifact / "graph.py").read_text().count("linear") > 10


def test_input_contract_errors(tiny_artifact):
    model = turbocompile.load(tiny_artifact)
    cfg = get_preset("wan-tiny")
    inp = example_inputs(cfg, cfg.video_shape())
    with pytest.raises(InputError, match=r"x has shape \[1, 16, 3, 16, 8\]; this artifact expects"):
        model(inp["x"][..., :8], inp["timestep"], inp["context"])
    with pytest.raises(InputError, match="takes no 'y'"):
        model(inp["x"], inp["timestep"], inp["context"], y=inp["x"])
    with pytest.raises(InputError, match="timestep has shape"):
        model(inp["x"], torch.ones(3), inp["context"])


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_refuses_edits_truncation_and_newer_versions(tiny_artifact, tmp_path):
    a = _copy(tiny_artifact, tmp_path / "a")
    w = a / "weights-00001-of-00001.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        turbocompile.load(a)

    b = _copy(tiny_artifact, tmp_path / "b")
    g = b / "graph.json"
    g.write_bytes(g.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="truncated or edited"):
        turbocompile.load(b)

    c = _copy(tiny_artifact, tmp_path / "c")
    m = json.loads((c / "manifest.json").read_text())
    m["model"]["config"]["dim"] = 512
    (c / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="manifest was edited"):
        turbocompile.load(c)

    d = _copy(tiny_artifact, tmp_path / "d")
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    m["manifest_sha256"] = _manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="newer than this turbocompile supports"):
        turbocompile.load(d)

    with pytest.raises(ArtifactError, match="does not exist"):
        turbocompile.load(tmp_path / "nothing")


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import turbocompile.artifact as art

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(art, "save_file", boom)
    out = tmp_path / "x"
    with pytest.raises(ArtifactError, match=f"cannot write '{out}': disk full"):  # one line, exit 2 in the CLI
        turbocompile.optimize("wan-tiny", "baseline", out, dtype="float32")
    assert list(tmp_path.iterdir()) == []


def test_sharding(tmp_path):
    recipe = {"version": 1, "name": "sharded", "export": {"shard_size_mb": 1}}
    res = turbocompile.optimize("wan-tiny", recipe, tmp_path / "s", dtype="float32")
    shards = sorted(p.name for p in res.artifact.iterdir() if p.suffix == ".safetensors")
    assert len(shards) > 3 and shards[0].endswith(f"of-{len(shards):05d}.safetensors")
    cfg = get_preset("wan-tiny")
    inp = example_inputs(cfg, cfg.video_shape())
    assert torch.equal(turbocompile.load(res.artifact)(*inp.values()), res.graph_module(*inp.values()))
