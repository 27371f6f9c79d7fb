"""Recipe validation: every error names the YAML path and the valid choices."""

from dataclasses import dataclass

import pytest
import yaml

from turbocompile.errors import RecipeError
from turbocompile.options import choice, number
from turbocompile.passbase import Pass, PassResult, register_pass
from turbocompile.recipe import builtin_recipes, load_recipe, parse_recipe


@register_pass
class _DummyRecipePass(Pass):
    name = "dummy_recipe_pass"
    description = "test-only"

    @dataclass(frozen=True, kw_only=True)
    class Options:
        mode: str = choice("a", ("a", "b"))
        level: int = number(1, min=0, max=3)
        ratio: float = number(0.5, min=0.0, max=1.0)

    def run(self, gm, ctx):
        return PassResult(False)


def test_builtin_recipes_load_and_round_trip():
    shipped = builtin_recipes()
    assert "baseline" in shipped
    for name, path in shipped.items():
        r = load_recipe(path)
        assert load_recipe(name) == r.__class__(**{**r.__dict__})
        again = parse_recipe(yaml.safe_load(yaml.safe_dump(r.to_dict())))
        assert again.to_dict() == r.to_dict()


def test_load_by_name_with_and_without_suffix():
    assert load_recipe("baseline").name == load_recipe("baseline.yaml").name == "baseline"


def test_valid_recipe_with_options_and_overrides():
    r = parse_recipe({"version": 1, "model": {"dtype": "float32", "frames": 5, "size": "96x64"},
                      "passes": [{"name": "dummy_recipe_pass", "options": {"mode": "b", "ratio": 1}}]})
    assert r.model.size_tuple == (96, 64)
    assert r.passes[0].options.mode == "b" and r.passes[0].options.ratio == 1.0
    assert parse_recipe({"version": 1, "passes": ["dummy_recipe_pass"]}).passes[0].options.level == 1


@pytest.mark.parametrize("data,match", [
    ({"version": 2}, r"version: recipe version 2 is not supported"),
    ({}, r"version: missing"),
    ({"version": 1, "bogus": 1}, r"bogus: unknown recipe key; valid keys: version, name"),
    ({"version": 1, "passes": [{"name": "nope"}]}, r"passes\[0\].name: unknown pass 'nope'; registered passes:"),
    ({"version": 1, "passes": [{"name": "dummy_recipe_pass", "options": {"mode": "c"}}]},
     r"passes\[0\].options.mode: 'c' is not valid; choose one of a, b"),
    ({"version": 1, "passes": [{"name": "dummy_recipe_pass", "options": {"level": 9}}]},
     r"passes\[0\].options.level: 9 is out of range \[0, 3\]"),
    ({"version": 1, "passes": [{"name": "dummy_recipe_pass", "options": {"level": "x"}}]},
     r"passes\[0\].options.level: expected an integer"),
    ({"version": 1, "passes": [{"name": "dummy_recipe_pass", "options": {"zzz": 1}}]},
     r"passes\[0\].options: unknown option 'zzz'; valid options: level, mode, ratio"),
    ({"version": 1, "model": {"dtype": "int4"}}, r"model.dtype: 'int4' is not valid; choose one of float32"),
    ({"version": 1, "model": {"size": "big"}}, r"model: size 'big' is not WIDTHxHEIGHT"),
    ({"version": 1, "passes": ["dummy_recipe_pass", "dummy_recipe_pass"]}, r"listed more than once"),
    ({"version": 1, "passes": {"a": 1}}, r"passes: expected a list"),
])
def test_errors_name_the_path_and_choices(data, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="no recipe file or built-in recipe named 'zzz'"):
        load_recipe("zzz")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npasses: [\n")
    with pytest.raises(RecipeError, match="invalid YAML at line"):
        load_recipe(bad)
