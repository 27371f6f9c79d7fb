"""benchmarks/bench_e2e.py: shipped recipes are variants under their own names, and their rCM samplers are
timed against the original run (CPU smoke run on wan-tiny)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from turbocompile.recipe import builtin_recipes, load_recipe

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_e2e():
    sys.path.insert(0, str(BENCH))  # bench_e2e imports its sibling helpers by plain name
    try:
        spec = importlib.util.spec_from_file_location("bench_e2e_under_test", BENCH / "bench_e2e.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def test_recipe_variants_are_the_recipes_passes(bench_e2e):
    v = bench_e2e.VARIANTS
    for name in ("turbo-int8", "turbo-fp8", "w8a8-int8"):
        passes = load_recipe(builtin_recipes()[name]).to_dict()["passes"]
        assert v[name] == passes
        assert v["rcm4:" + name][:-1] == passes
        assert v["rcm4:" + name][-1]["name"] == "bake_rcm_sampler"
    # sampler recipes are not forward variants, and older tags keep their meaning
    assert "turbo-int8-rcm" not in v and "rcm-4step" not in v and "rcm4:turbo-int8-rcm" not in v
    assert v["baseline"] == []


def test_recipe_sampler_is_timed_against_the_original(bench_e2e, tmp_path):
    bench_e2e.main(["--model", "wan-tiny", "--device", "cpu", "--variants", "eager,rcm4:w8a8-int8",
                    "--reps", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "e2e_wan-tiny.json").read_text())
    eager, smp = data["variants"]["eager"], data["variants"]["rcm4:w8a8-int8"]
    assert smp["speedup_vs_eager"] is None
    assert smp["speedup_vs_original"] == pytest.approx(100 * eager["ms"] / smp["ms"])
    with pytest.raises(SystemExit, match="unknown variant rcm4:turbo-int8-rcm"):
        bench_e2e.main(["--model", "wan-tiny", "--device", "cpu", "--variants", "rcm4:turbo-int8-rcm",
                        "--out", str(tmp_path)])


FAKE_SMI = """#!/usr/bin/env python3
import sys, time
for _ in range(30000):  # like "-lms 50 --format=csv,noheader,nounits", faster; stopped by the sampler
    print("1410, 650.25", flush=True)
    time.sleep(0.002)
"""


def test_clocks_are_sampled_while_each_variant_is_timed(bench_e2e, tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    bench_e2e.main(["--model", "wan-tiny", "--device", "cpu", "--variants", "eager", "--reps", "10", "--clocks",
                    "--out", str(tmp_path)])
    clocks = json.loads((tmp_path / "e2e_wan-tiny.json").read_text())["variants"]["eager"]["clocks"]
    assert clocks["sm_mhz_median"] == 1410 and clocks["power_w_median"] == 650.25 and clocks["samples"] >= 1


def test_clocks_without_nvidia_smi_are_none(bench_e2e, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi here
    bench_e2e.main(["--model", "wan-tiny", "--device", "cpu", "--variants", "eager", "--reps", "1", "--clocks",
                    "--out", str(tmp_path)])
    assert json.loads((tmp_path / "e2e_wan-tiny.json").read_text())["variants"]["eager"]["clocks"] is None
