"""SageSLA's output as the o projection's FP8 input (the ``fp8_out`` epilogue of the Triton kernel, run in the
CPU interpreter on CPU, and the per-sample bound kernel) against ``ref.sagesla_quant_ref`` / ``output_bound_ref``.

Per case: the scales are the reference's (bound / 448, per sample); the codes are exactly the per-token
quantizer's formula applied, at the kernel's bound, to the output the same kernel writes without fp8_out
(the epilogue rounds like the store); the dequantized codes are close to the reference's; the bound holds
(no output exceeds it); and the error vs the fp32 attention output is about that of per-token scales.
"""

from __future__ import annotations

import pytest
import torch

from tests._bits import assert_same_codes
from tests._env import kernel_device, triton_runs_here
from turbocompile.kernels.sagesla import ref
from turbocompile.kernels.w8a8.ref import codes_at_amax_ref, dequant_scale_ref

DEV = kernel_device()
pytestmark = pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _inputs(B, L, H, D, case, seed=0):
    """bf16 q, k, v [B, L, H, D] on DEV; ``case`` shapes v: "scales" (sample 1's values 100x sample 0's),
    "zeros" (sample 0's values all zero, a zero channel in the others), "outlier" (one value 300x the rest)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, D, generator=g) for _ in range(3))
    if case == "scales":
        v[1] *= 100.0
    elif case == "zeros":
        v[0] = 0.0
        v[:, :, :, 3] = 0.0
    elif case == "outlier":
        v[0, min(7, L - 1), H - 1, 5] = 300.0
    return [t.to(DEV, torch.bfloat16) for t in (q, k, v)]


def _proj(D, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(D, D, generator=g) / 8).to(DEV), (torch.randn(D, generator=g) / 4).to(DEV)


# (B, L, H, D, topk, proj_l, v case): L off the 64/128 block sizes, tiny L, two samples of very different
# magnitude, zero values, an outlier, dense (topk 1.0) and sparse, with and without the linear branch
CASES = [
    (1, 200, 2, 64, 0.5, False, "random"),
    (2, 200, 2, 64, 0.5, True, "scales"),
    (1, 5, 1, 64, 1.0, True, "random"),
    (2, 130, 3, 64, 1.0, True, "zeros"),
    (1, 300, 2, 128, 0.3, True, "outlier"),
    (2, 64, 2, 64, 1.0, False, "scales"),
]


def _run(q, k, v, topk, pw, pb):
    """(unfused output, codes, scales, the kernel's bounds [B]) from one preparation."""
    from turbocompile.kernels.sagesla.quant_out import sample_bound
    from turbocompile.kernels.sagesla.triton_attn import launch_attn
    from turbocompile.kernels.sagesla.triton_prep import prepare

    prep = prepare(q, k, v, topk, 64, 128, "int8-fp8", pw is not None)
    out = launch_attn(q, k, v, prep, pw, pb, 64, 128)
    codes, scales = launch_attn(q, k, v, prep, pw, pb, 64, 128, fp8_out=True)
    return out, codes, scales, sample_bound(prep["vscale"], q.shape[0], pw, pb)[0]


@pytest.mark.parametrize("B,L,H,D,topk,proj,case", CASES)
def test_fp8_out_matches_the_reference(B, L, H, D, topk, proj, case):
    q, k, v = _inputs(B, L, H, D, case)
    pw, pb = _proj(D) if proj else (None, None)
    out, codes, scales, bound = _run(q, k, v, topk, pw, pb)
    assert codes.shape == (B * L, H * D) and codes.dtype == torch.float8_e4m3fn
    assert scales.shape == (B * L, 1) and scales.dtype == torch.float32
    # the bounds: the reference's (R's row sums in another fp32 order: an ulp at most), one per sample
    want_bound = ref.output_bound_ref(v, pw, pb)
    torch.testing.assert_close(bound, want_bound, rtol=1e-6, atol=0)
    a = bound.repeat_interleave(L).unsqueeze(1)
    assert torch.equal(scales, dequant_scale_ref(a, "fp8"))
    # the epilogue's codes are the quantizer's formula on the output the kernel stores without fp8_out (exact in
    # the interpreter; compiled, the two variants of the kernel may contract the output's FMAs differently)
    want = codes_at_amax_ref(out.reshape(B * L, H * D).float(), a, "fp8")
    assert_same_codes(codes, want, max_share=1e-3, what="fp8_out")
    # against the reference op (attention arithmetic in another order: P's e4m3 roundings may differ)
    rc, rs = ref.sagesla_quant_ref(q, k, v, topk, pw, pb, 64, 128, "int8-fp8")
    torch.testing.assert_close(scales, rs, rtol=1e-6, atol=0)
    dq, dr = codes.float() * scales, rc.float() * rs
    if dr.abs().max() > 0:
        assert _rel(dq, dr) < 3e-2, _rel(dq, dr)
    else:  # all-zero values: zero output, zero codes
        assert dq.abs().max() == 0
    # the bound holds for the fp32 output; rounded to bf16 it may pass it by that rounding (2^-9, e.g. an
    # output that is the bias alone), far below the 29/28 at which the saturating cast would decide a code
    o32 = ref.sagesla_ref(q.float(), k.float(), v.float(), topk, pw, pb, 64, 128, "int8-fp8").reshape(B, -1)
    assert (o32.abs().amax(1) <= bound).all(), (o32.abs().amax(1), bound)
    assert (out.float().reshape(B, -1).abs().amax(1) <= bound * (1 + 2.0 ** -9)).all()


def test_samples_keep_their_own_scale():
    """Two samples whose values differ 100x: each sample's tokens get their own bound (a batch-wide one would
    push sample 0's outputs 100x down into e4m3's subnormals), and sample 0's error is that of sample 1."""
    B, L, H, D = 2, 200, 2, 64
    q, k, v = _inputs(B, L, H, D, "scales")
    out, codes, scales, bound = _run(q, k, v, 0.5, None, None)
    assert scales[:L].max() * 50 < scales[L:].min()
    dq = (codes.float() * scales).view(B, -1)
    o = out.float().view(B, -1)
    e0, e1 = _rel(dq[0], o[0]), _rel(dq[1], o[1])
    assert e0 < 0.04 and e1 < 0.04 and abs(e0 - e1) < 0.01, (e0, e1)


@pytest.mark.parametrize("proj", [False, True])
def test_error_vs_fp32_is_about_that_of_per_token_scales(proj):
    """The per-sample scale is up to ~50x a token's abs-max here (with proj_l's R), yet e4m3 keeps the relative
    precision: the dequantized codes' error vs the fp32 attention output is within 10% of the error of
    per-token scales on the same bf16 output."""
    B, L, H, D = 1, 256, 2, 64
    q, k, v = _inputs(B, L, H, D, "random", seed=3)
    pw, pb = _proj(D) if proj else (None, None)
    out, codes, scales, _ = _run(q, k, v, 0.5, pw, pb)
    o32 = ref.sagesla_ref(q.float(), k.float(), v.float(), 0.5, pw, pb, 64, 128, "int8-fp8").reshape(B * L, -1)
    x = out.reshape(B * L, -1).float()
    amax = x.abs().amax(1, keepdim=True).clamp_min(1e-8)
    per_token = codes_at_amax_ref(x, amax, "fp8").float() * dequant_scale_ref(amax, "fp8")
    err_bound, err_token = _rel(codes.float() * scales, o32), _rel(per_token, o32)
    assert (scales * 448 / amax).median() > (20 if proj else 3)  # the bound is well above the abs-max
    assert err_bound < 1.1 * err_token, (err_bound, err_token)


@pytest.mark.parametrize("H,D,dtype", [(1, 64, torch.float32), (3, 128, torch.bfloat16), (20, 64, torch.float32),
                                       (40, 128, torch.bfloat16)])
@pytest.mark.parametrize("proj", ["none", "weight", "both"])
def test_sample_bound_kernel_matches_reference(H, D, dtype, proj):
    """`sample_bound` from the V scales and proj_l equals `output_bound_ref` from v (heads walked in chunks of 16;
    proj_l in the model dtype or float32, transposed strides)."""
    from turbocompile.kernels.sagesla.quant_out import sample_bound

    B, L = 2, 33
    g = torch.Generator().manual_seed(H)
    v = (torch.randn(B, L, H, D, generator=g) * torch.rand(B, 1, H, D, generator=g) * 10).to(DEV, torch.bfloat16)
    vmax = v.abs().amax(1).float()  # [B, H, D]
    vscale = (vmax / torch.full_like(vmax, 448.0) + 1e-7).reshape(B * H, D).contiguous()
    w = (torch.randn(D, D, generator=g) / 8).to(DEV, dtype).t() if proj != "none" else None  # strided
    b = (torch.randn(D, generator=g)).to(DEV, dtype) if proj == "both" else None
    got, inv, scale = sample_bound(vscale, B, w, b)
    torch.testing.assert_close(got, ref.output_bound_ref(v, w, b), rtol=1e-6, atol=0)
    qmax = torch.full_like(got, 448.0)
    assert torch.equal(inv, qmax / got) and torch.equal(scale, got / qmax)  # correctly rounded quotients
    if proj == "none":
        assert torch.equal(got, vscale.view(B, -1).amax(1) * 448.0 * (1 + 2.0 ** -4))
