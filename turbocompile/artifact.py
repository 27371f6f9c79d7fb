"""Artifacts: a directory holding an optimized graph and its weights.

Layout::

    OUT/
      manifest.json          format version, versions, model config, video shape, recipe, pass log,
                             input/output signature, sha256 + size of every other file,
                             and a sha256 of the manifest's own content
      graph.json             the optimized graph (pickle-free, see graph_io)
      graph.py               its readable code (for humans; not loaded)
      weights-00001-of-0000N.safetensors

Writes are atomic: everything goes to a hidden temporary directory beside OUT, which is
renamed into place only when complete, so an interrupted run never leaves something that
looks valid. Loading checks the format version, the manifest's own hash and every file's
sha256 before anything is used, and never re-runs passes, calibration or quantization.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from turbocompile.errors import ArtifactError
from turbocompile.graph_io import graph_from_json, graph_to_json
from turbocompile.output_paths import check_writable, write_failure

__all__ = ["save_artifact", "check_output_dir", "read_manifest", "load_graph_module", "FORMAT_NAME", "FORMAT_VERSION",
           "graph_tensors"]

FORMAT_NAME = "turbocompile-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def graph_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor a ``get_attr`` node refers to, by its dotted name."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in out:
            obj: Any = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if not isinstance(obj, torch.Tensor):
                raise ArtifactError(f"get_attr '{node.target}' is not a tensor; cannot store it")
            out[node.target] = obj
    return out


def _shards(tensors: dict[str, torch.Tensor], limit_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an artifact output that would lose data or cannot be written (one-line :class:`ArtifactError`).

    A new path is fine if its location can be written. An existing path is replaced only with
    ``overwrite`` and only when it is a previous turbocompile artifact (a directory with an artifact
    manifest) holding nothing but the files its manifest lists: never an arbitrary directory or file,
    never one into which other files were put, never the current directory or one of its parents.
    """
    out = Path(out)
    resolved = out.resolve()
    if resolved == Path(resolved.anchor) or Path.cwd().resolve().is_relative_to(resolved):
        raise ArtifactError(f"output '{out}' is the current directory, one of its parents or the root; "
                            "choose a new directory for the artifact")
    check_writable(out, ArtifactError)
    if not out.exists():
        return out
    if not overwrite:
        raise ArtifactError(f"output '{out}' already exists; choose another path or pass --overwrite")
    if not out.is_dir():
        raise ArtifactError(f"output '{out}' exists and is not a directory; --overwrite only replaces artifacts")
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        listed = set(manifest["files"]) | {MANIFEST} if manifest.get("format") == FORMAT_NAME else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        listed = None
    if listed is None:
        raise ArtifactError(f"output '{out}' exists and is not a turbocompile artifact; --overwrite only replaces "
                            "artifacts (nothing was deleted)")
    extra = sorted(p.name for p in out.iterdir() if p.name not in listed)
    if extra:
        raise ArtifactError(f"output '{out}' is an artifact but also holds files it does not list ({', '.join(extra[:3])}"
                            f"{', ...' if len(extra) > 3 else ''}); move them away or choose another path (nothing "
                            "was deleted)")
    return out


def _json_safe(obj):
    """``obj`` with non-finite floats as the strings "inf", "-inf", "nan" (JSON has no such numbers:
    an exact pass's SQNR is +inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def save_artifact(gm: fx.GraphModule, out: str | Path, manifest: dict, *, shard_size_mb: int = 4096,
                  overwrite: bool = False, progress: bool = False) -> Path:
    """Write ``gm`` and ``manifest`` (extended with file hashes) atomically to directory ``out``."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = graph_tensors(gm)
        shards = _shards(tensors, shard_size_mb * (1 << 20))
        n = len(shards)
        it = range(n)
        if progress and n > 1:
            from tqdm import tqdm

            it = tqdm(it, desc="writing weights", unit="file")
        for i in it:
            data = {k: v.detach().to("cpu").contiguous() for k, v in shards[i].items()}
            save_file(data, str(tmp / f"weights-{i + 1:05d}-of-{n:05d}.safetensors"))
        (tmp / "graph.json").write_text(json.dumps(graph_to_json(gm.graph)))
        (tmp / "graph.py").write_text(
            "# Readable code of the optimized graph (informational; the loader reads graph.json).\n"
            + gm.code
        )
        manifest = _json_safe(dict(manifest))
        manifest["format"] = FORMAT_NAME
        manifest["format_version"] = FORMAT_VERSION
        manifest["tensors"] = _tensor_summary(tensors)
        manifest["files"] = {
            p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir())
        }
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False))
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(out, exc, ArtifactError)
        if failure is not None:
            raise failure from None
        raise
    return out


def _tensor_summary(tensors: dict[str, torch.Tensor]) -> dict:
    by_dtype: dict[str, dict] = {}
    for t in tensors.values():
        key = str(t.dtype).split(".")[-1]
        entry = by_dtype.setdefault(key, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += t.numel() * t.element_size()
    total = sum(e["bytes"] for e in by_dtype.values())
    return {"count": len(tensors), "bytes": total, "by_dtype": by_dtype}


def read_manifest(path: str | Path, *, verify_checksums: bool = True) -> dict:
    """Read and validate ``path/manifest.json`` (and, by default, every file's sha256)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact '{path}' does not exist")
    if not path.is_dir():
        raise ArtifactError(f"artifact '{path}' is not a directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"'{path}' is not a turbocompile artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ArtifactError(f"{mpath}: not valid JSON (truncated or edited?)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{mpath}: not a turbocompile artifact manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{mpath}: format_version missing or not an integer")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {version} is newer than this turbocompile supports "
                            f"({FORMAT_VERSION}); upgrade turbocompile")
    if version < 1:
        raise ArtifactError(f"artifact format version {version} is not supported")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise ArtifactError(f"{mpath}: content does not match its checksum (the manifest was edited)")
    files = manifest.get("files")
    if not isinstance(files, dict) or "graph.json" not in files:
        raise ArtifactError(f"{mpath}: file list missing or without graph.json")
    for name, info in files.items():
        if not _FILE_NAME.fullmatch(name) or not isinstance(info, dict) or \
                not isinstance(info.get("sha256"), str) or type(info.get("bytes")) is not int:
            raise ArtifactError(f"{mpath}: invalid file entry '{name[:100]}'")
        fpath = path / name
        if not fpath.is_file():
            raise ArtifactError(f"artifact file '{name}' is missing")
        if fpath.stat().st_size != info.get("bytes"):
            raise ArtifactError(f"artifact file '{name}' has {fpath.stat().st_size} bytes, expected "
                                f"{info.get('bytes')} (truncated or edited)")
        if verify_checksums and _sha256(fpath) != info.get("sha256"):
            raise ArtifactError(f"artifact file '{name}' does not match its sha256 (corrupted or edited)")
    _check_schema(manifest, mpath)
    return manifest


_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
_DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64", "int64", "int32")


def _need(cond: bool, mpath: Path, what: str) -> None:
    if not cond:
        raise ArtifactError(f"{mpath}: {what} is missing or malformed")


def _is_int(v, lo: int = 0) -> bool:
    return type(v) is int and v >= lo


def _is_num(v) -> bool:
    return type(v) in (int, float)


def _check_schema(m: dict, mpath: Path) -> None:
    """Every manifest entry that ``load`` and ``inspect`` read has the right type (else one-line error)."""
    model = m.get("model")
    _need(isinstance(model, dict), mpath, "'model'")
    _need(isinstance(model.get("config"), dict), mpath, "'model.config'")
    _need(isinstance(model.get("source"), dict), mpath, "'model.source'")
    vs = model.get("video_shape")
    _need(isinstance(vs, dict) and all(_is_int(vs.get(k), 1) for k in ("width", "height", "frames", "seq_len",
                                                                           "batch"))
          and isinstance(vs.get("grid"), list) and all(_is_int(g, 1) for g in vs["grid"]), mpath,
          "'model.video_shape'")
    try:
        from turbocompile.model.config import WanConfig

        cfg = WanConfig.from_dict(model["config"])
    except Exception as exc:  # noqa: BLE001 - any invalid config is a malformed manifest
        raise ArtifactError(f"{mpath}: 'model.config' is invalid: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    for key in ("name", "model_type"):
        _need(isinstance(getattr(cfg, key, None), str), mpath, f"'model.config.{key}'")
    for key in ("dim", "num_layers", "num_heads"):
        _need(_is_int(getattr(cfg, key, None), 1), mpath, f"'model.config.{key}'")
    rec = m.get("recipe")
    _need(isinstance(rec, dict) and isinstance(rec.get("name"), str)
          and isinstance(rec.get("description", ""), str), mpath, "'recipe'")
    passes = m.get("passes")
    _need(isinstance(passes, list) and all(
        isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("status"), str)
        and isinstance(p.get("stats", {}), dict) and _is_num(p.get("seconds", 0)) for p in passes), mpath, "'passes'")
    t = m.get("tensors")
    _need(isinstance(t, dict) and _is_int(t.get("count")) and _is_int(t.get("bytes"))
          and isinstance(t.get("by_dtype"), dict) and all(
              isinstance(e, dict) and _is_int(e.get("count")) and _is_int(e.get("bytes"))
              for e in t["by_dtype"].values()), mpath, "'tensors'")
    sig = m.get("signature")
    _need(isinstance(sig, dict) and isinstance(sig.get("inputs"), list) and sig["inputs"], mpath, "'signature'")
    names = []
    for i in sig["inputs"]:
        _need(isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("shape"), list)
              and len(i["shape"]) >= 1 and all(_is_int(d, 1) for d in i["shape"])
              and i.get("dtype") in _DTYPE_NAMES, mpath, "'signature.inputs'")
        names.append(i["name"])
    _need(len(set(names)) == len(names), mpath, "'signature.inputs' (duplicate names)")
    out = sig.get("output")
    _need(isinstance(out, dict) and isinstance(out.get("shape"), list) and all(_is_int(d, 1) for d in out["shape"])
          and out.get("dtype") in _DTYPE_NAMES, mpath, "'signature.output'")
    _need(sig.get("activation_dtype") in ("float32", "bfloat16", "float16"), mpath, "'signature.activation_dtype'")
    _need(isinstance(sig.get("dynamic_batch", False), bool), mpath, "'signature.dynamic_batch'")
    _need(isinstance(m.get("kind", "denoiser"), str), mpath, "'kind'")


def load_graph_module(path: str | Path, manifest: dict, device: str | torch.device = "cpu") -> fx.GraphModule:
    """Rebuild the GraphModule of a validated artifact with its weights on ``device``."""
    path = Path(path)
    try:
        graph = graph_from_json(json.loads((path / "graph.json").read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError("graph.json is not valid JSON") from None
    except RecursionError:
        raise ArtifactError("graph.json is nested too deeply") from None
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(manifest["files"]):
        if name.endswith(".safetensors"):
            try:
                part = load_file(str(path / name), device=str(device))
            except (SafetensorError, OSError, ValueError) as exc:
                raise ArtifactError(f"artifact file '{name}' cannot be read: {exc}") from None
            if torch.device(device).type == "cpu":
                # Tensors read from a safetensors file are only 8-byte aligned; CPU kernels take
                # different (differently rounded) SIMD paths on unaligned data, so copy them into
                # fresh allocations to reproduce the in-memory model bit for bit.
                part = {k: v.clone() for k, v in part.items()}
            tensors.update(part)
    needed = {n.target for n in graph.nodes if n.op == "get_attr"}
    missing = sorted(needed - set(tensors))
    if missing:
        raise ArtifactError(f"artifact weights lack {len(missing)} tensors the graph uses, e.g. '{missing[0]}'")
    try:
        gm = fx.GraphModule({k: tensors[k] for k in needed}, graph, class_name="WanGraph")
    except Exception as exc:  # noqa: BLE001 - clashing attribute paths, codegen failures: a malformed file
        raise ArtifactError(f"graph.json cannot be rebuilt into a module: {type(exc).__name__}") from None
    return gm
