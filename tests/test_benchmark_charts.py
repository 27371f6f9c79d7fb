"""benchmarks/charts.py recognises the stored benchmark JSONs (issue 8: every benchmark has a chart).

The latest result of each benchmark kind must be recognised by :func:`charts.kind_of`, so that
``python benchmarks/charts.py <json>`` redraws it; with matplotlib installed each is also drawn.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# one stored JSON per benchmark script, and the kind it must be read as
LATEST = {
    "e2e_wan2.1-t2v-1.3b_original_prompt100_s24c4_h100.json": "e2e",
    "e2e_wan2.1-t2v-1.3b_eager_ab_prompt100_s25c5_h100.json": "e2e",  # "+dispatch" variants
    "e2e_wan2.1-t2v-1.3b_original_prompt100_s25c7_h200.json": "e2e",
    "e2e_wan2.1-t2v-14b_s24c6_h100.json": "e2e",
    "e2e_wan2.1-t2v-14b_compile_s25c8_h200.json": "e2e",
    "e2e_wan2.1-t2v-1.3b_original_textq_prompt100_s26c4_h100.json": "e2e",
    "e2e_wan2.1-t2v-1.3b_textq_prompt512_s26c4_h100.json": "e2e",  # no eager row
    "text_attention_s26c3_h100.json": "text_attention",
    "text_attention_s27c7_h100.json": "text_attention",  # with the q GEMM (sumsq) rows
    "e2e_wan2.1-t2v-14b_textq_prompt100_s27c8_h100.json": "e2e",
    "e2e_wan2.1-t2v-1.3b_gelushort_prompt100_s28c7_h100.json": "e2e",  # "+gelu_long" variants
    "e2e_wan2.1-t2v-1.3b_s28_all_prompt100_s28c11_h100.json": "e2e",  # "+nofold", "+slaq" variants
    "e2e_wan2.1-t2v-1.3b_s29_prompt100_s29c8_h100.json": "e2e",
    "e2e_wan2.1-t2v-1.3b_headline_prompt100_s33c1_h100.json": "e2e",  # the README's headline chart
    "e2e_wan2.1-t2v-14b_slaq_prompt100_s29c2_h100.json": "e2e",
    "profile_wan2.1-t2v-1.3b_turbo-fp8_cudagraph_prompt100_s29c1_h100.json": "profile",  # with prompt_tokens
    "e2e_wan2.1-t2v-1.3b_textgluon_prompt100_s30c2_h100.json": "e2e",  # "+textk_triton" variants
    "e2e_wan2.1-t2v-14b_textgluon_prompt100_s30c4_h100.json": "e2e",
    "text_attention_s30c11_h100.json": "text_attention",  # Gluon vs Triton kernel rows
    "e2e_wan2.1-t2v-14b_textgluon2_prompt100_s30c13_h100.json": "e2e",  # 14B with "+textk_triton"
    "profile_wan2.1-t2v-1.3b_turbo-fp8_cudagraph_prompt100_s30c5_h100.json": "profile",  # "_text_attn_gluon"
    "profile_wan2.1-t2v-1.3b_turbo-fp8_cudagraph_s24c1_h100.json": "profile",
    "profile_wan2.1-t2v-1.3b_turbo-fp8_cudagraph_s23c1_h200.json": "profile",  # before device/versions were recorded
    "sampler_s24c2_h100.json": "sampler",
    "gemm_epilogue_s24c7_fp8_h100.json": "gemm_epilogue",
    "w8a8_s24c3_h100.json": "w8a8",
    "optimize_wan2.1-t2v-14b_turbo-fp8_s23c6_h200.json": "optimize",
    "norms_s16c1_h100.json": "norms",
    "sagesla_s22c5_h200.json": "sagesla",
}


def _charts():
    spec = importlib.util.spec_from_file_location("charts", ROOT / "benchmarks" / "charts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name,kind", sorted(LATEST.items()))
def test_stored_result_is_recognised(name, kind):
    data = json.loads((RESULTS / name).read_text())
    assert _charts().kind_of(data) == kind


def test_unknown_json_is_not_drawn(tmp_path, capsys):
    assert _charts().save({"something": 1}, str(tmp_path / "x.png")) is None
    assert "unknown benchmark JSON" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name", sorted(LATEST))
def test_stored_result_is_drawn(name, tmp_path):
    pytest.importorskip("matplotlib")
    data = json.loads((RESULTS / name).read_text())
    png = tmp_path / "chart.png"
    assert _charts().save(data, str(png)) == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_e2e_labels_read_as_the_recipes():
    label = _charts()._e2e_label
    full = "w8a8_fp8+norms+sagesla+epi+pool+siblings+bound+merge+textq+slaq"
    assert label(full) == "turbo-fp8"
    assert label(full + "+cudagraph") == "turbo-fp8, CUDA graph"
    assert label(full.replace("w8a8_", "rcm4_", 1) + "+cudagraph") == "turbo-fp8 4-step rCM sampler, CUDA graph"
    assert label(full + "+textk_triton+cudagraph") == "turbo-fp8, textk_triton, CUDA graph"  # unknown token kept
    assert label("w8a8_fp8+norms+sagesla") == "W8A8 FP8 + fused norms + SageSLA"
    assert label("compile") == "torch.compile bf16" and label("original") == "original: 50 steps × CFG"
    assert label("w8a8_fp8+norms+sagesla+epi") == "W8A8 FP8 + fused norms + SageSLA + epi"  # not the full stack
    assert label("turbo-int8+cudagraph") == "turbo-int8 + CUDA graph"  # a shipped recipe by its name
    assert label("rcm4:turbo-int8+cudagraph") == "turbo-int8 4-step rCM sampler + CUDA graph"
