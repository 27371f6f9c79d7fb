"""Property-based hardening of the artifact loader (hypothesis).

Malformed manifests (random JSON values, missing/extra keys, wrong types) with a *consistent*
manifest checksum, so the schema checks themselves are exercised; truncated and bit-flipped
weight files; malformed graph.json with consistent checksums, so the graph parser is fuzzed.
Every outcome of ``turbocompile.load`` and ``turbocompile inspect`` must be a correct load or
a one-line ArtifactError (CLI: exit 2) — never a traceback, never a silent load of bad data.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import turbocompile
from turbocompile.artifact import _manifest_digest
from turbocompile.cli import cli
from turbocompile.errors import ArtifactError, TurboCompileError
from turbocompile.export.pt2 import example_args

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                       HealthCheck.too_slow], derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    art = root / "art"
    turbocompile.optimize("wan-tiny", "baseline", art, dtype="float32", device="cpu")
    model = turbocompile.load(art, device="cpu")
    args = example_args(model.manifest, 1, seed=2)
    return art, args, model(*args), json.loads((art / "manifest.json").read_text())


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _write_manifest(art: Path, manifest: dict) -> None:
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))


def _rehash(art: Path, manifest: dict, name: str) -> None:
    data = (art / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _write_manifest(art, manifest)


def _check_outcome(art: Path, args, ref, *, semantic_edit: bool = False) -> str:
    """load + inspect: a correct load or a one-line ArtifactError / exit 2."""
    try:
        model = turbocompile.load(art, device="cpu")
    except ArtifactError as exc:
        assert str(exc) and "\n" not in str(exc)
        outcome = "refused"
    else:
        outcome = "loaded"
        if not semantic_edit:
            try:
                out = model(*args)
            except TurboCompileError as exc:  # e.g. an edited signature refuses the inputs: one line
                assert "\n" not in str(exc)
            else:
                assert torch.equal(out, ref), "a load that computes something else is a silent corruption"
    r = CliRunner().invoke(cli, ["inspect", str(art)])
    assert r.exit_code in (0, 2), r.output
    assert "Traceback" not in r.output and "internal error" not in r.output
    if r.exit_code == 2:
        assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
    return outcome


def _paths(d, prefix=()):
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            if k not in ("manifest_sha256",):
                yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=50, **SETTINGS)
@given(data=st.data())
def test_fuzzed_manifest(base, tmp_path, data):
    art0, args, ref, manifest0 = base
    paths = [p for p in _paths(manifest0) if p]
    manifest = copy.deepcopy(manifest0)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = manifest
        try:
            for k in path[:-1]:
                parent = parent[k]
            action = data.draw(st.sampled_from(["replace", "delete", "extra"]))
            if action == "replace":
                parent[path[-1]] = data.draw(json_values)
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[data.draw(st.text(min_size=1, max_size=8))] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed the path
    art = _copy(art0, tmp_path / "m")
    _write_manifest(art, manifest)
    _check_outcome(art, args, ref)


@settings(max_examples=30, **SETTINGS)
@given(which=st.sampled_from(["weights", "graph.json", "manifest.json"]), mode=st.sampled_from(["truncate", "flip"]),
       frac=st.floats(0.0, 0.999), bit=st.integers(0, 7))
def test_truncated_or_flipped_files_are_refused(base, tmp_path, which, mode, frac, bit):
    art0, args, ref, _ = base
    art = _copy(art0, tmp_path / "f")
    name = next(p.name for p in art.iterdir() if p.suffix == ".safetensors") if which == "weights" else which
    data = bytearray((art / name).read_bytes())
    pos = int(frac * len(data))
    if mode == "truncate":
        data = data[:pos]
    else:
        data[pos] ^= 1 << bit
    (art / name).write_bytes(bytes(data))
    assert _check_outcome(art, args, ref) == "refused"


graph_mutations = st.sampled_from(["drop_key", "set_field", "swap_arg", "dup_name", "delete_node", "dunder"])


@settings(max_examples=40, **SETTINGS)
@given(data=st.data(), kind=graph_mutations)
def test_fuzzed_graph_json_with_consistent_checksums(base, tmp_path, data, kind):
    art0, args, ref, manifest0 = base
    graph = json.loads((art0 / "graph.json").read_text())
    nodes = graph["nodes"]
    i = data.draw(st.integers(0, len(nodes) - 1))
    node = nodes[i]
    if kind == "drop_key":
        del node[data.draw(st.sampled_from(sorted(node)))]
    elif kind == "set_field":
        node[data.draw(st.sampled_from(["name", "op", "target", "args", "kwargs"]))] = data.draw(json_values)
    elif kind == "swap_arg":
        node["args"] = data.draw(st.sampled_from([{"node": "nope"}, {"dtype": "complex1"}, {"device": "warp:9"},
                                                  {"memory_format": "load"}, {"float": 3}, {"slice": [1, 2, 3, 4]},
                                                  {"tuple": 5}, {"a": 1, "b": 2}, [{"node": nodes[-1]["name"]}]]))
    elif kind == "dup_name":
        node["name"] = nodes[max(0, i - 1)]["name"] if i else "x; import os"
    elif kind == "delete_node":
        del nodes[i]
    else:  # code-injection shaped names and targets must never reach the generated code
        field, value = data.draw(st.sampled_from([
            ("target", "torch.load"), ("target", "torch.nn.functional.torch.load"), ("target", "_operator.call"),
            ("target", "torch.hub.load"), ("target", 'a.b")+__import__("os").getcwd()+("'),
            ("target", "x=__import__('os')"), ("target", "builtins.eval"), ("name", "__import__")]))
        node[field] = value
    art = _copy(art0, tmp_path / "g")
    (art / "graph.json").write_text(json.dumps(graph))
    manifest = copy.deepcopy(manifest0)
    _rehash(art, manifest, "graph.json")
    _check_outcome(art, args, ref, semantic_edit=True)


def test_newer_format_version_is_refused_clearly(base, tmp_path):
    art0, args, ref, manifest0 = base
    art = _copy(art0, tmp_path / "v")
    manifest = copy.deepcopy(manifest0)
    manifest["format_version"] = 99
    _write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match="format version 99 is newer"):
        turbocompile.load(art, device="cpu")
