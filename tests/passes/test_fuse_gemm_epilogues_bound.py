"""fuse_gemm_epilogues, quant_scale "bound" with bound_in_norm (the default): the FFN pre-norm writes the GELU
GEMM's bound row scales (``residual_ln_modulate_quant_bound``) and the GEMM takes them
(``w8a8_linear_gelu_quant_rowscale``) instead of launching the row-bound kernel. On wan-tiny: the rewrite, the
torch backend bit for bit and the Triton backend (on the GPU where there is one, else in the interpreter)
equal to the unfolded graph, the pass
stats, fuse_residual_epilogues after it, and the saved artifact's round trip."""

from __future__ import annotations

import functools

import pytest
import torch

from tests._env import kernel_device, triton_runs_here
from tests.passes._wan_tiny import count_calls as _count
from tests.passes._wan_tiny import inputs as _inputs
from tests.passes._wan_tiny import recipe as _recipe
from tests.passes._wan_tiny import run as _run
from turbocompile.model.config import get_preset

OPS = torch.ops.turbocompile
BLOCKS = get_preset("wan-tiny").num_layers


def _turbo_fp8(extra=(), device="cpu", **epi_options) -> dict:
    """turbo-fp8 (bf16, on ``device``) with these fuse_gemm_epilogues options, ``extra`` passes inserted right
    after it."""
    from turbocompile.recipe import load_recipe

    passes = []
    for p in load_recipe("turbo-fp8").to_dict()["passes"]:
        if p["name"] == "fuse_gemm_epilogues":
            passes += [{"name": p["name"], "options": {**p["options"], **epi_options}}, *extra]
            continue
        passes.append(p)
    return _recipe(*passes, device=device)


@functools.lru_cache(maxsize=None)
def _torch_run(bound_in_norm: bool, device: str = "cpu"):
    return _run(_turbo_fp8(device=device, backend="torch", bound_in_norm=bound_in_norm), verify=True)


def _epi_record(res) -> dict:
    return next(p for p in res.manifest["passes"] if p["name"] == "fuse_gemm_epilogues")


def test_rewrite_moves_the_bound_into_the_ffn_norm():
    res, _ = _torch_run(True)
    gm = res.graph_module
    rec = _epi_record(res)
    assert rec["options"]["bound_in_norm"] is True
    assert rec["stats"]["gelu_quant"] == rec["stats"]["bound_from_norm"] == BLOCKS
    assert _count(gm, OPS.w8a8_linear_gelu_quant.default) == 0
    assert _count(gm, OPS.w8a8_linear_gelu_quant_rowscale.default) == BLOCKS
    assert _count(gm, OPS.residual_ln_modulate_quant_bound.default) == BLOCKS
    ref_res, _ = _torch_run(False)
    # one FFN norm per block switched: as many quantizing norms as before, BLOCKS of them the bound variant
    assert (_count(gm, OPS.residual_ln_modulate_quant.default) + BLOCKS
            == _count(ref_res.graph_module, OPS.residual_ln_modulate_quant.default))
    for gemm in (n for n in gm.graph.nodes if n.target == OPS.w8a8_linear_gelu_quant_rowscale.default):
        qx, sx, row_scale = gemm.args[0], gemm.args[1], gemm.args[9]
        norm = row_scale.args[0]
        assert norm.target == OPS.residual_ln_modulate_quant_bound.default
        assert (qx.args, sx.args, row_scale.args) == ((norm, 1), (norm, 2), (norm, 3))
        assert norm.args[-2].op == "get_attr" and norm.args[-2].target.endswith("ffn.0.gelu_bound")
        assert norm.args[-4:-2] == ("fp8", "per_token") and norm.meta["tc_from"][-1] == "fuse_gemm_epilogues"
        # ffn.2 reads the GEMM's codes at the norm's bound scales
        (ffn2,) = gemm.users
        assert ffn2.target == OPS.w8a8_linear_prequant.default and ffn2.args[:2] == (gemm, row_scale)
    assert "bound_from_norm" in rec["stats"] and "row-bound" not in " ".join(rec["notes"])


def test_torch_backend_equals_the_unfolded_graph_bit_for_bit():
    """Same codes, same scales: the reference computes ref.row_bound_scale_ref of the same (q, s) either way."""
    res, out = _torch_run(True)
    ref_res, ref_out = _torch_run(False)
    assert _epi_record(ref_res)["stats"]["bound_from_norm"] == 0
    assert _count(ref_res.graph_module, OPS.w8a8_linear_gelu_quant.default) == BLOCKS
    assert torch.equal(out, ref_out)
    assert 25.0 <= _epi_record(res)["verify"]["sqnr_db"]  # --verify: the bound floor, as without the fold


@pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_triton_backend_removes_the_row_bound_launch_same_output(monkeypatch):
    """Triton: no row-bound kernel runs, and the output equals the unfolded graph's (the norm sums the squared
    codes in another order than the row-bound kernel: a row's exponent could differ only at a boundary; on this
    input none does, so the outputs are equal; compiled, within 1e-2 for the same reason as stated)."""
    from tests._bits import COMPILED
    from turbocompile.kernels.w8a8 import triton_bound

    launches = []
    real = triton_bound.row_bound_scale_triton
    monkeypatch.setattr(triton_bound, "row_bound_scale_triton", lambda *a: launches.append(1) or real(*a))
    dev = kernel_device()
    _, folded = _run(_turbo_fp8(device=dev, backend="triton"))
    assert launches == []
    _, unfolded = _run(_turbo_fp8(device=dev, backend="triton", bound_in_norm=False))
    assert len(launches) == BLOCKS
    if COMPILED:
        rel = ((folded.float() - unfolded.float()).norm() / unfolded.float().norm()).item()
        assert rel < 1e-2, rel
    else:
        assert torch.equal(folded, unfolded)
    _, torch_out = _torch_run(True, dev)
    rel = ((folded.float() - torch_out.float()).norm() / torch_out.float().norm()).item()
    assert rel < 1e-2, rel


@pytest.mark.parametrize("bound_in_norm", [True, False])
def test_fuse_residual_epilogues_keeps_the_bound_norm(bound_in_norm):
    """fuse_residual_epilogues after it: the FFN pre-norm's residual moves into the GEMM epilogue and the norm
    becomes ln_modulate_quant_bound, still writing the bound scales; torch backend bit for bit against the graph
    without fuse_residual_epilogues, and against the unfolded graph (FP8 linears, fused norms and GEMM epilogues
    only: the residual pass's own exactness is the point here)."""
    fp8 = {"name": "w8a8_linear", "options": {"format": "fp8", "weight_granularity": "per_channel",
                                               "act_granularity": "per_token"}}

    def epi(fold):
        return {"name": "fuse_gemm_epilogues", "options": {"quant_scale": "bound", "bound_in_norm": fold,
                                                           "backend": "torch"}}

    res_pass = {"name": "fuse_residual_epilogues", "options": {"backend": "torch"}}
    res, out = _run(_recipe(fp8, "fuse_norms", epi(bound_in_norm), res_pass))
    gm = res.graph_module
    assert _count(gm, OPS.residual_ln_modulate_quant_bound.default) == 0
    assert _count(gm, OPS.ln_modulate_quant_bound.default) == (BLOCKS if bound_in_norm else 0)
    rec = res.manifest["passes"][-1]
    assert rec["stats"]["unmatched"] == 0 and rec["stats"]["quantized"] >= BLOCKS
    for gemm in (n for n in gm.graph.nodes if n.target == OPS.w8a8_linear_gelu_quant_rowscale.default):
        assert gemm.args[9].args[0].target == OPS.ln_modulate_quant_bound.default
    _, without = _run(_recipe(fp8, "fuse_norms", epi(bound_in_norm)))
    _, unfolded = _run(_recipe(fp8, "fuse_norms", epi(False), res_pass))
    assert torch.equal(out, without) and torch.equal(out, unfolded)


def test_the_fold_needs_a_fused_norm_and_fp8():
    """Without fuse_norms ffn.0's input comes from quantize_activation: the row-bound kernel stays (a note says
    so); INT8 consumers keep amax scales, nothing to fold."""
    fp8 = {"name": "w8a8_linear", "options": {"format": "fp8", "weight_granularity": "per_channel",
                                               "act_granularity": "per_token"}}
    res, _ = _run(_recipe(fp8, {"name": "fuse_gemm_epilogues", "options": {"quant_scale": "bound"}}))
    rec = _epi_record(res)
    assert rec["stats"]["gelu_quant"] == BLOCKS and rec["stats"]["bound_from_norm"] == 0
    assert any("bound scales take the row-bound kernel" in note for note in rec["notes"])
    assert _count(res.graph_module, OPS.w8a8_linear_gelu_quant.default) == BLOCKS
    w8 = {"name": "w8a8_linear", "options": {"format": "int8", "weight_granularity": "per_channel",
                                              "act_granularity": "per_token"}}
    res, _ = _run(_recipe(w8, "fuse_norms", {"name": "fuse_gemm_epilogues", "options": {"quant_scale": "bound"}}))
    assert _epi_record(res)["stats"]["bound_from_norm"] == 0
    assert _count(res.graph_module, OPS.residual_ln_modulate_quant_bound.default) == 0


def test_artifact_round_trip(tmp_path):
    """The saved artifact (graph.json with the new ops and the gelu_bound buffers) loads and computes the same."""
    import turbocompile

    out_dir = tmp_path / "tiny-fp8"
    res = turbocompile.optimize("wan-tiny", _turbo_fp8(backend="torch"), out_dir, seed=0)
    _, expect = _torch_run(True)
    model = turbocompile.load(out_dir, device="cpu")
    graph = (out_dir / "graph.json").read_text()
    assert "residual_ln_modulate_quant_bound" in graph and "w8a8_linear_gelu_quant_rowscale" in graph
    with torch.no_grad():
        got = model(*_inputs())
    assert res.manifest["passes"][[p["name"] for p in res.manifest["passes"]].index("fuse_gemm_epilogues")][
        "stats"]["bound_from_norm"] == BLOCKS
    assert torch.equal(got, expect)
