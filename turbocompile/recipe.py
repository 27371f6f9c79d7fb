"""YAML recipes: validated into typed, frozen configs.

A recipe::

    version: 1
    name: w8a8-int8
    description: INT8 W8A8 linears
    model:                 # optional overrides of the model's defaults
      dtype: bfloat16      # float32 | bfloat16 | float16
      device: cuda         # cpu | cuda
      frames: 81           # video frames (1 + 4k)
      size: 832x480        # width x height in pixels
      batch: 1
      text_len: 512        # padded prompt tokens the graph is traced for
    passes:                # run in this order unless dependencies say otherwise
      - name: w8a8_linear
        options: {format: int8}
      - fuse_norms         # shorthand: a pass with default options
    export:
      shard_size_mb: 4096  # weights are split into safetensors files of at most this size

Every error names the YAML path (``passes[1].options.format``) and the valid choices.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from turbocompile.errors import RecipeError
from turbocompile.options import build_options, choice, number, options_to_dict
from turbocompile.passbase import Pass, get_pass

__all__ = ["Recipe", "ModelOverrides", "PassSpec", "ExportOptions", "load_recipe", "parse_recipe",
           "builtin_recipes", "RECIPE_VERSION", "DTYPES", "DEVICES"]

RECIPE_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True, kw_only=True)
class ModelOverrides:
    """Optional overrides of the model's defaults (None = keep the default)."""

    dtype: str | None = choice(None, DTYPES, "activation/weight dtype")
    device: str | None = choice(None, DEVICES, "device the model is optimized on")
    frames: int | None = number(None, min=1, max=1001, doc="video frames (1 + 4k)")
    size: str | None = dataclasses.field(default=None, metadata={"doc": "WIDTHxHEIGHT in pixels"})
    batch: int = number(1, min=1, max=64, doc="batch size the graph is captured for")
    text_len: int | None = number(None, min=1, max=4096, doc="padded prompt length")

    def __post_init__(self):
        if self.size is not None:
            parse_size(self.size)

    @property
    def size_tuple(self) -> tuple[int, int] | None:
        return None if self.size is None else parse_size(self.size)


def parse_size(text: str) -> tuple[int, int]:
    """'832x480' -> (832, 480)."""
    try:
        w, h = (int(p) for p in str(text).lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
        return w, h
    except ValueError:
        raise ValueError(f"size '{text}' is not WIDTHxHEIGHT (e.g. 832x480)") from None


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    shard_size_mb: int = number(4096, min=1, max=1 << 20, doc="largest safetensors file, MiB")


@dataclass(frozen=True)
class PassSpec:
    """One pipeline entry: a registered pass name and its validated options."""

    name: str
    options: Any

    def instantiate(self) -> Pass:
        return get_pass(self.name)(self.options)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A validated recipe (see module docstring)."""

    version: int = RECIPE_VERSION
    name: str = "unnamed"
    description: str = ""
    model: ModelOverrides = ModelOverrides()
    passes: tuple[PassSpec, ...] = ()
    export: ExportOptions = ExportOptions()
    source: str | None = None

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "model": {k: v for k, v in options_to_dict(self.model).items() if v is not None},
            "passes": [{"name": p.name, "options": options_to_dict(p.options)} for p in self.passes],
            "export": options_to_dict(self.export),
        }

    def instantiate_passes(self) -> list[Pass]:
        return [spec.instantiate() for spec in self.passes]


_TOP_KEYS = ("version", "name", "description", "model", "passes", "export")


def parse_recipe(data: Any, source: str | None = None) -> Recipe:
    """Validate a recipe given as already-parsed YAML data."""
    if not isinstance(data, dict):
        raise RecipeError(f"recipe{f' {source}' if source else ''}: expected a mapping at the top level")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise RecipeError(f"{unknown[0]}: unknown recipe key; valid keys: {', '.join(_TOP_KEYS)}")
    version = data.get("version")
    if version is None:
        raise RecipeError("version: missing; this turbocompile reads recipe version 1")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RecipeError(f"version: expected an integer, got {version!r}")
    if version != RECIPE_VERSION:
        raise RecipeError(f"version: recipe version {version} is not supported; this turbocompile reads version "
                          f"{RECIPE_VERSION}")
    name = data.get("name", Path(source).stem if source else "unnamed")
    if not isinstance(name, str):
        raise RecipeError(f"name: expected a string, got {name!r}")
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise RecipeError(f"description: expected a string, got {desc!r}")
    model = build_options(ModelOverrides, data.get("model"), "model")
    export = build_options(ExportOptions, data.get("export"), "export")
    raw_passes = data.get("passes", [])
    if raw_passes is None:
        raw_passes = []
    if not isinstance(raw_passes, list):
        raise RecipeError("passes: expected a list of passes")
    specs = []
    for i, entry in enumerate(raw_passes):
        path = f"passes[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise RecipeError(f"{path}: expected a pass name or a mapping with 'name' and 'options'")
        extra = sorted(set(entry) - {"name", "options"})
        if extra:
            raise RecipeError(f"{path}.{extra[0]}: unknown key; valid keys: name, options")
        pname = entry.get("name")
        if not isinstance(pname, str):
            raise RecipeError(f"{path}.name: missing or not a string")
        cls = get_pass(pname, f"{path}.name")
        specs.append(PassSpec(pname, build_options(cls.Options, entry.get("options"), f"{path}.options")))
    names = [s.name for s in specs]
    for n in names:
        if names.count(n) > 1:
            raise RecipeError(f"passes: pass '{n}' is listed more than once")
    return Recipe(version=version, name=name, description=desc, model=model, passes=tuple(specs),
                  export=export, source=source)


def builtin_recipes() -> dict[str, Path]:
    """Name -> path of the recipes shipped with turbocompile."""
    root = importlib.resources.files("turbocompile.recipes")
    out = {}
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(out.items()))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise RecipeError(f"'{key}' is given twice in one mapping (line {key_node.start_mark.line + 1}); "
                                  "keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except RecipeError as exc:
        raise RecipeError(f"recipe {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe {path}: invalid YAML{where}") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise RecipeError(f"recipe {path}: cannot be read as UTF-8 text ({type(exc).__name__})") from None


def load_recipe(recipe: "str | Path | Recipe | dict") -> Recipe:
    """Load a recipe from a YAML file path, a built-in recipe name, a dict, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    if not isinstance(recipe, (str, Path)):
        raise RecipeError(f"recipe: expected a built-in name, a YAML path, a dict or a Recipe, got "
                          f"{type(recipe).__name__}; built-in recipes: {', '.join(builtin_recipes())}")
    text_path = Path(recipe)
    text = str(recipe)
    if text_path.is_file():
        path = text_path
    else:
        shipped = builtin_recipes()
        looks_like_path = "/" in text or "\\" in text or text.endswith((".yaml", ".yml")) and text_path.name != text
        if looks_like_path or text.endswith(".yml"):
            # a path that does not exist is an error, never silently the built-in of the same name
            raise RecipeError(f"recipe file '{recipe}' does not exist; built-in recipes: {', '.join(shipped)}")
        key = text[:-5] if text.endswith(".yaml") else text
        if key not in shipped:
            raise RecipeError(f"no recipe file or built-in recipe named '{recipe}'; built-in recipes: "
                              f"{', '.join(shipped)}")
        path = shipped[key]
    return parse_recipe(_parse_yaml(path), source=str(path))
