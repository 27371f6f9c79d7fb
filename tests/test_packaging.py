"""Packaging: lean import, package list complete, recipes shipped as package data."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_lean():
    code = ("import sys, turbocompile, torch; "
            "print('triton' in sys.modules, torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_pyproject_lists_every_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for pkg, folder in mapping.items():
        for dirpath, _, files in os.walk(ROOT / folder):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = Path(dirpath).relative_to(ROOT / folder)
                sub = pkg if str(rel) == "." else pkg + "." + ".".join(rel.parts)
                if sub.split(".")[1:2] and sub.split(".")[1] in mapping and pkg == "turbocompile":
                    continue
                found.add(sub)
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_recipes_are_package_data():
    from turbocompile.recipe import builtin_recipes

    shipped = builtin_recipes()
    on_disk = {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert set(shipped) == on_disk
