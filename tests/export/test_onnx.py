"""ONNX export: onnx.checker, onnxruntime (CPU) vs the PyTorch artifact / op references.

End to end on wan-tiny (float32): the baseline recipe, W8A8 INT8 (block-128, TD's scheme)
+ fuse_norms, which puts every W8A8 and fused-norm op into one graph, and the built-in
``turbo-int8`` stack (per-token x per-channel INT8 + fused norms + SageSLA in standard ops). The remaining modes
(per-token x per-channel INT8, mixed granularities, FP8, sagesla standard/custom) are checked
op by op on small modules, which is much faster than more full-model exports.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import turbocompile  # noqa: E402
from turbocompile.export import ExportError  # noqa: E402
from turbocompile.export import onnx as tco  # noqa: E402
from turbocompile.export.pt2 import ExportedArtifact, example_args  # noqa: E402
from turbocompile.kernels.w8a8.ref import gelu_bound_constants_ref  # noqa: E402
from turbocompile.ops.w8a8 import quantize_weight  # noqa: E402

from tests.export import artifact, program, tmp_root  # noqa: E402

OPS = torch.ops.turbocompile


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, args):
    return sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})


@pytest.mark.parametrize("key", ["baseline", "int8_block_fused", "turbo_int8"])
def test_wan_tiny_onnx_matches_artifact(key):
    out = tmp_root() / f"{key}.onnx"
    info = tco.save_onnx(program(key), out)
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    kinds = {n.op_type for n in proto.graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # standard ops only
    if key != "baseline":
        assert "MatMulInteger" in kinds and "Round" in kinds
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["turbocompile.turbocompile_version"] == turbocompile.__version__
    names = {"baseline": "baseline", "int8_block_fused": "w8a8-int8+fuse_norms", "turbo_int8": "turbo-int8"}
    assert meta["turbocompile.recipe"] == names[key]
    assert json.loads(meta["turbocompile.input_shapes"])["x"] == ["batch", 16, 3, 16, 16]
    assert meta["turbocompile.dynamic_batch"] == "true" and info["dynamic_batch"]
    model = turbocompile.load(artifact(key), device="cpu")
    sess = _session(out)
    for batch, seed in ((1, 11), (3, 12)):  # dynamic batch: neither is the traced batch (2)
        args = example_args(model.manifest, batch, seed=seed)
        want = model(*args).numpy()
        got = _run(sess, args)[0]
        assert got.shape == want.shape
        assert _rel(got, want) < 1e-2, (key, batch, _rel(got, want))


def test_wan_tiny_fp8_bound_norm_onnx_matches_artifact():
    """FP8 wan-tiny whose FFN pre-norms write the GELU GEMM's bound scales: the exported graph holds the bound norm
    and the row-scale GELU GEMM ops (opset 19 picked for FP8) and runs like the artifact."""
    out = tmp_root() / "fp8_bound.onnx"
    ops = {name for name, _ in tco._graph_ops(program("fp8_bound"))}
    assert {"residual_ln_modulate_quant_bound", "w8a8_linear_gelu_quant_rowscale"} <= ops, ops
    assert "w8a8_linear_gelu_quant" not in ops
    info = tco.save_onnx(program("fp8_bound"), out)
    assert info["opset"] == tco.FP8_MIN_OPSET
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    model = turbocompile.load(artifact("fp8_bound"), device="cpu")
    args = example_args(model.manifest, 1, seed=11)
    want = model(*args).numpy()
    got = _run(_session(out), args)[0]
    assert got.shape == want.shape and _rel(got, want) < 1e-2, _rel(got, want)


# ----------------------------------------------------------------------------- op level
def _export_module(mod, args, path, opset=18, attention="standard"):
    prog = torch.onnx.export(mod, args, dynamo=True, custom_translation_table=tco.translation_table(attention),
                             opset_version=opset, optimize=True, verbose=False)
    prog.save(str(path))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


class _Linear(torch.nn.Module):
    def __init__(self, fmt, act, wgt, n=200, k=300, bias=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g)
        w[3, 7] = 40.0  # an outlier column block
        self.qw, self.sw = quantize_weight(w, fmt, wgt)
        self.b = torch.randn(n, generator=g) if bias else None
        self.mode = (fmt, act, wgt)

    def forward(self, x):
        y = OPS.w8a8_linear(x, self.qw, self.sw, self.b, *self.mode, "torch")
        q, s = OPS.quantize_activation(x.reshape(-1, x.shape[-1]), self.mode[0], self.mode[1], "torch")
        return y, q, s


@pytest.mark.parametrize("act,wgt", [("per_token", "per_channel"), ("block128", "per_channel"),
                                     ("per_token", "block128")])
def test_int8_linear_granularities(tmp_path, act, wgt):
    mod = _Linear("int8", act, wgt)
    x = torch.randn(1, 131, 300)  # 131 rows, K = 300: partial 128-blocks in both dims
    x[0, 5] *= 30.0
    path = _export_module(mod, (x,), tmp_path / "lin.onnx")
    y, q, s = (t.numpy() for t in mod(x))
    gy, gq, gs = _session(path).run(None, {"x": x.numpy()})
    assert np.array_equal(gq, q), "INT8 codes must match the quantizer bit for bit"
    np.testing.assert_allclose(gs, s, rtol=1e-6)
    assert _rel(gy, y) < 1e-5


def test_fp8_linear_needs_opset19_and_runs(tmp_path):
    mod = _Linear("fp8", "per_token", "per_channel", bias=False)
    x = torch.randn(2, 20, 300)
    path = _export_module(mod, (x,), tmp_path / "fp8.onnx", opset=19)
    y = mod(x)[0].numpy()
    gy = _session(path).run(None, {"x": x.numpy()})[0]
    assert _rel(gy, y) < 1e-5
    # through the writer: FP8 below opset 19 is a clear one-line error naming the formats
    ep = torch.export.export(mod, (x,))
    fake = ExportedArtifact(ep, {"signature": {"inputs": [{"name": "x", "shape": [2, 20, 300], "dtype": "float32"}],
                                               "output": {"shape": [2, 20, 200], "dtype": "float32"}}},
                            (x,), ["x"], False)
    with pytest.raises(ExportError, match="FP8.*opset >= 19.*INT8"):
        tco.save_onnx(fake, tmp_path / "f.onnx", opset=18)


class _GeluQuantPow2(torch.nn.Module):
    def __init__(self, n=264, k=128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.qw, self.sw = quantize_weight(torch.randn(n, k, generator=g) * 0.1, "fp8", "per_channel")
        self.b = torch.randn(n, generator=g)

    def forward(self, x):
        qx, sx = OPS.quantize_activation(x, "fp8", "per_token", "torch")
        return OPS.w8a8_linear_gelu_quant(qx, sx, self.qw, self.sw, self.b, "fp8", "per_token", "per_channel",
                                          torch.float32, "fp8", "torch", "pow2")


def test_gelu_quant_pow2_scales_and_codes(tmp_path):
    """out_scale="pow2": power-of-two scales and FP8 codes exactly as the torch op computes them."""
    mod = _GeluQuantPow2()
    x = torch.randn(40, 128) * 2
    x[3] = 0.0  # GELU(bias) only
    path = _export_module(mod, (x,), tmp_path / "pow2.onnx", opset=19)
    q, s = mod(x)
    gq, gs = _session(path).run(None, {"x": x.numpy()})
    assert np.array_equal(gs, s.numpy())
    gq = torch.from_numpy(np.ascontiguousarray(gq)).view(torch.float8_e4m3fn)  # ORT hands FP8 out as raw bytes
    assert torch.equal(gq.float(), q.float())


class _GeluQuantBound(_GeluQuantPow2):
    def __init__(self):
        super().__init__()
        self.wb = gelu_bound_constants_ref(self.qw, self.sw, self.b, "per_channel")

    def forward(self, x):
        qx, sx = OPS.quantize_activation(x, "fp8", "per_token", "torch")
        return OPS.w8a8_linear_gelu_quant(qx, sx, self.qw, self.sw, self.b, "fp8", "per_token", "per_channel",
                                          torch.float32, "fp8", "torch", "bound", self.wb)


def test_gelu_quant_bound_scales_and_codes(tmp_path):
    """out_scale="bound": the row scales from the input's norm and the FP8 codes at them, as the torch op."""
    mod = _GeluQuantBound()
    x = torch.randn(40, 128) * 2
    x[3] = 0.0  # the bound is then the bias term alone
    path = _export_module(mod, (x,), tmp_path / "bound.onnx", opset=19)
    q, s = mod(x)
    gq, gs = _session(path).run(None, {"x": x.numpy()})
    assert np.array_equal(gs, s.numpy())  # exponents equal (sums in another order: no boundary hit here)
    gq = torch.from_numpy(np.ascontiguousarray(gq)).view(torch.float8_e4m3fn)
    assert torch.equal(gq.float(), q.float())


class _GeluQuantRowscale(_GeluQuantPow2):
    def forward(self, x, row_scale):
        qx, sx = OPS.quantize_activation(x, "fp8", "per_token", "torch")
        return OPS.w8a8_linear_gelu_quant_rowscale(qx, sx, self.qw, self.sw, self.b, "fp8", "per_token", "per_channel",
                                                   torch.float32, row_scale, "torch")


def test_gelu_quant_rowscale_codes(tmp_path):
    """w8a8_linear_gelu_quant_rowscale: the FP8 codes at the given row scales (an input here), as the torch op."""
    from turbocompile.kernels.w8a8.ref import quantize_ref, row_bound_scale_ref

    mod = _GeluQuantRowscale()
    x = torch.randn(40, 128) * 2
    x[3] = 0.0
    qx, sx = quantize_ref(x, "fp8", "per_token")
    rs = row_bound_scale_ref(qx, sx, gelu_bound_constants_ref(mod.qw, mod.sw, mod.b, "per_channel"))
    path = _export_module(mod, (x, rs), tmp_path / "rowscale.onnx", opset=19)
    q = mod(x, rs)
    (gq,) = _session(path).run(None, {"x": x.numpy(), "row_scale": rs.numpy()})
    gq = torch.from_numpy(np.ascontiguousarray(gq)).view(torch.float8_e4m3fn)  # ORT hands FP8 out as raw bytes
    assert torch.equal(gq.float(), q.float())


class _NormsBound(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wb = torch.tensor([0.8, 0.25])

    def forward(self, x, y, g, sh, sc):
        q, s, sb = OPS.ln_modulate_quant_bound(x, None, None, sh, sc, 1e-6, "fp8", "per_token", self.wb, "torch")
        xn, q2, s2, sb2 = OPS.residual_ln_modulate_quant_bound(x, y, g, None, None, sh, sc, 1e-6, "fp8", "per_token",
                                                               self.wb, "torch")
        return q, s, sb, xn, q2, s2, sb2


def test_norm_bound_ops_decomposed(tmp_path):
    """*_ln_modulate_quant_bound: the quant norms' outputs, and bound scales equal to ref.row_bound_scale_ref of
    the exported codes (up to the boundary caveat) and to the op's."""
    from tests.kernels.test_norms_bound import assert_bound_scales

    B, L, D = 2, 10, 64
    sc = torch.randn(B, 1, D)
    sc[..., 0] = 40.0  # rows' norms spread over binades
    args = (torch.randn(B, L, D) * 3 + 1, torch.randn(B, L, D), torch.randn(B, 1, D), torch.randn(B, 1, D), sc)
    mod = _NormsBound()
    path = _export_module(mod, args, tmp_path / "norms_bound.onnx", opset=19)
    want = mod(*args)
    got = _run(_session(path), args)
    codes = {0, 4}
    got = [torch.from_numpy(np.ascontiguousarray(g)).view(torch.float8_e4m3fn) if i in codes else torch.from_numpy(g)
           for i, g in enumerate(got)]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, i
        if i in codes:  # allow a rare one-step difference from a last-ulp LayerNorm difference
            assert (g.float() != w.float()).float().mean() < 0.01, i
        elif i in (2, 6):  # bound scales: powers of two, the op's on (nearly) every row
            assert (g != w).float().mean() < 0.05, i
        else:
            assert _rel(g, w) < 1e-5, (i, _rel(g, w))
    assert_bound_scales(got[2], got[0], got[1], mod.wb, "ln")
    assert_bound_scales(got[6], got[4], got[5], mod.wb, "residual")


class _Norms(torch.nn.Module):
    def forward(self, x, y, g, sh, sc, w, cos, sin):
        h = OPS.ln_modulate(x, None, None, sh, sc, 1e-6, None, "torch")
        xn, h2 = OPS.residual_ln_modulate(x, y, g, w, w, sh, sc, 1e-6, torch.float32, "torch")
        r = OPS.rmsnorm_rope(x, w, cos, sin, 4, 1e-6, "torch")
        r0 = OPS.rmsnorm_rope(x, w, None, None, 4, 1e-6, "torch")
        q, s = OPS.ln_modulate_quant(x, w, None, sh, sc, 1e-6, "int8", "block128", "torch")
        xq, q2, s2 = OPS.residual_ln_modulate_quant(x, y, g, None, None, sh, sc, 1e-6, "int8", "per_token", "torch")
        return h, xn, h2, r, r0, q, s, xq, q2, s2


def test_norm_ops_decomposed(tmp_path):
    B, L, D = 2, 10, 64
    args = (torch.randn(B, L, D) * 3 + 1, torch.randn(B, L, D), torch.randn(B, 1, D), torch.randn(B, 1, D),
            torch.randn(B, 1, D), torch.randn(D), torch.rand(L, D // 8), torch.rand(L, D // 8))
    path = _export_module(_Norms(), args, tmp_path / "norms.onnx")
    want = [t.numpy() for t in _Norms()(*args)]
    got = _run(_session(path), args)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, i
        if w.dtype == np.int8:  # codes: allow a rare off-by-one from a last-ulp LayerNorm difference
            assert np.abs(g.astype(int) - w.astype(int)).max() <= 1 and (g != w).mean() < 0.01, i
        else:
            assert _rel(g, w) < 1e-5, (i, _rel(g, w))


class _PoolNorms(torch.nn.Module):
    def forward(self, x, v, w, cos, sin):
        o, p, m = OPS.rmsnorm_rope_pool(x, w, cos, sin, 4, 1e-6, 4, True, v, "torch")  # L=10: a partial block
        o2, p2, m2 = OPS.rmsnorm_rope_pool(x, w, None, None, 4, 1e-6, 8, False, None, "torch")
        return o, p, m, o2, p2, m2


def test_rmsnorm_rope_pool_decomposed(tmp_path):
    """rmsnorm_rope_pool: out, the per-head block means / sums and |v| maxima, and the empty vmax without v."""
    B, L, D = 2, 10, 64
    args = (torch.randn(B, L, D), torch.randn(B, L, D), torch.randn(D), torch.rand(L, D // 8), torch.rand(L, D // 8))
    path = _export_module(_PoolNorms(), args, tmp_path / "pool.onnx")
    want = [t.numpy() for t in _PoolNorms()(*args)]
    got = _run(_session(path), args)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, i
        assert w.size == 0 or _rel(g, w) < 1e-6, (i, _rel(g, w))


class _Attn(torch.nn.Module):
    def __init__(self, quant, proj):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.pw = torch.randn(64, 64, generator=g) * 0.1 if proj else None
        self.pb = torch.randn(64, generator=g) * 0.1 if proj else None
        self.quant = quant

    def forward(self, q, k, v):
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        return OPS.sagesla(q, k, v, 0.3, self.pw, self.pb, 16, 32, self.quant, "torch").float()


@pytest.mark.parametrize("quant,proj", [("int8-fp8", True), ("none", False), ("int8-fp16", True)])
def test_sagesla_standard_ops_compute_the_op(tmp_path, quant, proj):
    """Not dense attention: the same block map, top-k, sparse softmax and linear branch as the op."""
    q, k, v = (torch.randn(2, 100, 2, 64) for _ in range(3))  # L=100: partial blocks
    mod = _Attn(quant, proj)
    path = _export_module(mod, (q, k, v), tmp_path / "sla.onnx")
    kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"TopK", "ScatterElements", "Where", "Softmax"} <= kinds
    want = mod(q, k, v).numpy()
    got = _run(_session(path), (q, k, v))[0]
    assert _rel(got, want) < 1e-2, _rel(got, want)
    # and it is measurably different from dense attention at topk 0.3
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert _rel(got, dense.numpy()) > 5 * _rel(got, want)


def test_sagesla_custom_node(tmp_path):
    q, k, v = (torch.randn(1, 40, 2, 64) for _ in range(3))
    path = _export_module(_Attn("int8-fp8", True), (q, k, v), tmp_path / "c.onnx", attention="custom")
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.domain == tco.CUSTOM_DOMAIN]
    assert len(nodes) == 1 and nodes[0].op_type == "SageSLA" and len(nodes[0].input) == 5
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["quant"] == b"int8-fp8" and attrs["block_q"] == 16 and attrs["block_k"] == 32
    assert abs(attrs["topk"] - 0.3) < 1e-6
    assert any(o.domain == tco.CUSTOM_DOMAIN and o.version == 1 for o in proto.opset_import)


class _AttnQuant(torch.nn.Module):
    def __init__(self, proj):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.pw = torch.randn(64, 64, generator=g) * 0.1 if proj else None
        self.pb = torch.randn(64, generator=g) * 0.1 if proj else None

    def forward(self, q, k, v):
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        return OPS.sagesla_quant(q, k, v, 0.3, self.pw, self.pb, 16, 32, "int8-fp8", "torch")


@pytest.mark.parametrize("proj", [True, False])
def test_sagesla_quant_standard_ops(tmp_path, proj):
    """sagesla_quant as sagesla's standard-ops translation plus the per-sample bound and FP8 codes (opset 19):
    the op's scales (two samples of very different magnitude) and its codes but for rare one-step roundings."""
    q, k, v = (torch.randn(2, 100, 2, 64) for _ in range(3))
    v[1] *= 20.0
    mod = _AttnQuant(proj)
    path = _export_module(mod, (q, k, v), tmp_path / "slaq.onnx", opset=19)
    codes, scales = mod(q, k, v)
    got_codes, got_scales = _run(_session(path), (q, k, v))
    np.testing.assert_allclose(got_scales, scales.numpy(), rtol=1e-6)
    assert got_scales[0, 0] * 10 < got_scales[-1, 0]  # one scale per sample
    gc = torch.from_numpy(np.ascontiguousarray(got_codes)).view(torch.float8_e4m3fn).float()
    assert (gc != codes.float()).float().mean() < 0.02  # float32 attention sums in another order
    assert _rel(gc * torch.from_numpy(got_scales), codes.float() * scales) < 2e-2
    assert tco._uses_fp8([("sagesla_quant", ())])  # the exporter picks opset 19 for it


def test_sagesla_quant_custom_node(tmp_path):
    """With attention="custom": one turbocompile.SageSLA node, then the bound and the codes in standard ops."""
    q, k, v = (torch.randn(1, 40, 2, 64) for _ in range(3))
    path = _export_module(_AttnQuant(True), (q, k, v), tmp_path / "cq.onnx", opset=19, attention="custom")
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.domain == tco.CUSTOM_DOMAIN]
    assert len(nodes) == 1 and nodes[0].op_type == "SageSLA" and len(nodes[0].input) == 5
    kinds = {n.op_type for n in proto.graph.node}
    assert {"ReduceMax", "Cast", "Clip"} <= kinds  # (proj_l's row sums, constants, are folded)


class _TailMerged(torch.nn.Module):
    def forward(self, q, k, v):
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        n = OPS.key_tail_start(k, v, "torch")
        return n, OPS.tail_merged_attention(q, k, v, n, "torch").float()


def test_merged_padding_keys_decomposed(tmp_path):
    """key_tail_start (per batch and head) and the merged attention as standard ops, on a padded prompt
    whose tail starts differ per batch element (and one head with no repeated rows)."""
    q, k, v = torch.randn(2, 13, 2, 32), torch.randn(2, 20, 2, 32), torch.randn(2, 20, 2, 32)
    for b, n in ((0, 6), (1, 0)):
        k[b, n:], v[b, n:] = k[b, n:n + 1].clone(), v[b, n:n + 1].clone()
    v[1, 19, 1, 0] += 1.0  # batch 1, head 1: the last row differs -> tail of one (19)
    path = _export_module(_TailMerged(), (q, k, v), tmp_path / "tail.onnx")
    (n_want, want), (n_got, got) = _TailMerged()(q, k, v), _run(_session(path), (q, k, v))
    assert n_got.dtype == np.int32 and n_got.tolist() == n_want.tolist() == [[6, 6], [0, 19]]
    assert _rel(got, want.numpy()) < 1e-5


class _NormAttentionQuant(torch.nn.Module):
    def forward(self, z, w, k, v):
        z, w, k, v = (t.to(torch.bfloat16) for t in (z, w, k, v))
        n = OPS.key_tail_start(k, v, "torch")
        b = OPS.value_bound(v)
        merged = OPS.norm_attention_quant(z, w, k, v, b, n, 2, 1e-6, "torch")
        every = OPS.norm_attention_quant(z, w, k, v, b, None, 2, 1e-6, "torch")
        return b, merged[0], merged[1], every[0], every[1]


def test_fused_text_attention_decomposed(tmp_path):
    """value_bound and norm_attention_quant (with a merged tail and over every key) as standard ops: the same
    bounds and scales as the torch ops, and codes equal but for rare one-step rounding differences."""
    z, w = torch.randn(2, 11, 64) * 3, torch.rand(64) + 0.5
    k, v = torch.randn(2, 15, 2, 32), torch.randn(2, 15, 2, 32)
    k[:, 6:], v[:, 6:] = k[:, 6:7].clone(), v[:, 6:7].clone()
    v[1, 2, 0, 5] = -9.0  # sample 1's bound
    path = _export_module(_NormAttentionQuant(), (z, w, k, v), tmp_path / "naq.onnx", opset=19)
    want = _NormAttentionQuant()(z, w, k, v)
    got = _run(_session(path), (z, w, k, v))
    assert np.array_equal(got[0], want[0].numpy()) and got[0][1] == 9.0
    for i in (1, 3):
        codes = torch.from_numpy(np.ascontiguousarray(got[i])).view(torch.float8_e4m3fn).float()
        assert np.array_equal(got[i + 1], want[i + 1].numpy())
        assert (codes != want[i].float()).float().mean() < 0.02  # float32 attention sums in another order
        assert _rel(codes * torch.from_numpy(got[i + 1]), want[i].float() * want[i + 1]) < 1e-2


class _QGemmSumsqNorm(torch.nn.Module):
    """The cross-attention chain of fuse_text_attention with sumsq_from_gemm: the q GEMM writing z's granule sums
    of squares, and norm_attention_quant reading them."""

    def __init__(self, fmt, n=192, k=144):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        w = torch.randn(n, k, generator=g) * 0.2
        w[5] *= 30.0  # an outlier channel
        self.qw, self.sw = quantize_weight(w, fmt, "per_channel")
        self.b = (torch.randn(n, generator=g) * 0.3).to(torch.bfloat16)
        self.fmt = fmt

    def forward(self, x, w, k, v):
        B, L, _ = x.shape
        w, k, v = (t.to(torch.bfloat16) for t in (w, k, v))
        qx, sx = OPS.quantize_activation(x.reshape(B * L, -1), self.fmt, "per_token", "torch")
        y, ss = OPS.w8a8_linear_prequant_sumsq(qx, sx, self.qw, self.sw, self.b, self.fmt, "per_token", "per_channel",
                                               torch.bfloat16, "torch")
        z = y.reshape(B, L, -1)
        b = OPS.value_bound(v)
        c, s = OPS.norm_attention_quant(z, w, k, v, b, None, 3, 1e-6, "torch", ss)
        return y.float(), ss, c, s


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_q_gemm_sumsq_and_norm_attention_with_sumsq(tmp_path, fmt):
    """w8a8_linear_prequant_sumsq as the GEMM plus ReduceSum of squares per 128 columns (D = 192: a partial
    granule), and norm_attention_quant given those sums (its translation takes the statistic from z): y as the
    op's, the sums within fp32 summation order, the codes equal but for rare one-step roundings."""
    x = torch.randn(2, 13, 144) * 2
    x[1, 4] = 0  # a zero row: z is the bias
    w, k, v = torch.rand(192) + 0.5, torch.randn(2, 9, 3, 64), torch.randn(2, 9, 3, 64)
    mod = _QGemmSumsqNorm(fmt)
    path = _export_module(mod, (x, w, k, v), tmp_path / "qss.onnx", opset=19)
    kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "ReduceSum" in kinds
    want = [t.numpy() if t.dtype != torch.float8_e4m3fn else t for t in mod(x, w, k, v)]
    got = _run(_session(path), (x, w, k, v))
    assert np.array_equal(got[0], want[0])  # the GEMM in float64 then bf16, as the reference
    assert got[1].shape == (26, 2) and np.allclose(got[1], want[1], rtol=1e-5, atol=0)
    row = want[0][17].astype(np.float64) ** 2  # the zero input row (sample 1, token 4): the bias's squares
    assert np.allclose(got[1][17], [row[:128].sum(), row[128:].sum()], rtol=1e-5)
    codes = torch.from_numpy(np.ascontiguousarray(got[2])).view(torch.float8_e4m3fn).float()
    assert np.array_equal(got[3], want[3])
    assert (codes != want[2].float()).float().mean() < 0.02
    assert _rel(codes * torch.from_numpy(got[3]), want[2].float() * torch.from_numpy(want[3])) < 1e-2
