"""Probe (GPU): two changes to the W8A8 GEMMs of a Wan block, each checked, then timed in one run.

1. GELU epilogue forms (``_epilogue_math.GELU_NATIVE_FORM``, ``--forms``): "ex2_rcp" (two MUFU ops per
   element), "tanh" (one ``tanh.approx.f32``; session 13 timed a packed-fp16 form this way, not kept), at
   the FFN's ffn.0 shapes, next to the same GEMM without GELU (the floor); each form also through the
   quantizing path of ``turbo-fp8`` (GELU GEMM writing FP8 codes at power-of-two scales + requantization).
   Accuracy of each form vs the fp64 GELU of the same fp64 GEMM (rows subsampled), and vs "tanh".
2. Horizontal fusion (pass ``fuse_sibling_gemms``): q, k, v as three dim-wide GEMMs vs one GEMM
   over the concatenated weights; each slice of the fused output must equal its own GEMM bit for bit.

    python benchmarks/probe_gelu_qkv.py --out $OUT [--shapes 13b,14b] [--forms ex2_rcp,tanh]
        [--sections gelu,qkv]

Writes ``probe_gelu_qkv.json``. All FP8 e4m3, per-token x per-channel, the TMA kernel (autotuned).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import triton
import triton.testing

from turbocompile.kernels.w8a8 import _epilogue_math as EM
from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton
from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_quant_triton, w8a8_gemm_gelu_triton
from turbocompile.ops.w8a8 import quantize_activation, quantize_weight

# (M, dim, ffn_dim): Wan2.1-1.3B 480p and Wan-14B 720p
SHAPES = {"13b": (32760, 1536, 8960), "14b": (75600, 5120, 13824)}


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=400)


def _gelu64(y: torch.Tensor) -> torch.Tensor:
    return 0.5 * y * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y ** 3)))


def _quant_w(n, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * k ** -0.5
    return quantize_weight(w, "fp8", "per_channel")


def gelu_forms(m, k, n, forms) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qx, sx = quantize_activation(x, "fp8", "per_token", "triton")
    del x
    qw, sw = _quant_w(n, k, 1)
    bias = (torch.randn(n, device="cuda") * 0.1).to(torch.bfloat16)
    rows = torch.arange(0, m, 16, device="cuda")  # every 16th row for the fp64 reference
    y64 = (qx[rows].double() @ qw.double().T) * sx[rows].double() * sw.double().T + bias.double()
    ref = _gelu64(y64)
    del y64
    row = {"shape": f"{m}x{k}->{n} gelu_tanh", "ms": {}, "acc": {}}
    row["ms"]["no GELU (floor)"] = _bench(lambda: w8a8_gemm_triton(qx, sx, qw, sw, bias, "per_token", "per_channel",
                                                                   torch.bfloat16))
    outs = {}
    saved = EM.GELU_NATIVE_FORM
    try:
        for form in [*forms, *(f"{f} (again)" for f in forms)]:
            EM.GELU_NATIVE_FORM = form.split()[0]

            def run():
                return w8a8_gemm_gelu_triton(qx, sx, qw, sw, bias, "per_token", "per_channel", torch.bfloat16,
                                             amax_mode="none")[0]

            def run_pow2():
                return w8a8_gemm_gelu_quant_triton(qx, sx, qw, sw, bias, "per_token", "per_channel", torch.bfloat16,
                                                   "fp8", out_scale="pow2")

            h = run()
            row["ms"][form] = _bench(run)
            row["ms"][f"{form}, FP8 pow2 codes (turbo-fp8 path)"] = _bench(run_pow2)
            if "again" not in form:
                err = h[rows].double() - ref
                neg = ref < 0
                row["acc"][form] = {
                    "rel_l2_vs_fp64": (err.norm() / ref.norm()).item(),
                    "max_abs_vs_fp64": err.abs().max().item(),
                    "max_abs_where_y<0": err[neg].abs().max().item() if neg.any() else 0.0,
                    "finite": bool(torch.isfinite(h).all()),
                }
                q, sq = run_pow2()
                hq = q[rows].double() * sq[rows].double()
                row["acc"][form]["fp8_pow2_rel_l2_vs_fp64"] = ((hq - ref).norm() / ref.norm()).item()
                outs[form] = h
    finally:
        EM.GELU_NATIVE_FORM = saved
    base = outs.get("tanh")
    for form, h in outs.items():
        if base is not None and form != "tanh":
            a, b = base.float(), h.float()
            row["acc"][f"{form}_vs_tanh"] = {"rel_l2": ((a - b).norm() / a.norm()).item(),
                                             "differing_values": int((base != h).sum()), "of": a.numel()}
    # bf16 rounding alone, for scale: the fp64 GELU rounded to bf16 vs fp64
    r16 = ref.to(torch.bfloat16).double()
    row["acc"]["bf16_rounding_only_rel_l2"] = ((r16 - ref).norm() / ref.norm()).item()
    row["tflops"] = {kk: 2.0 * m * k * n / v / 1e9 for kk, v in row["ms"].items()}
    return row


def qkv(m, k) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qx, sx = quantize_activation(x, "fp8", "per_token", "triton")
    del x
    ws = [_quant_w(k, k, 10 + i) for i in range(3)]
    bs = [(torch.randn(k, device="cuda") * 0.1).to(torch.bfloat16) for _ in range(3)]
    qw = torch.cat([w[0] for w in ws]).contiguous()
    sw = torch.cat([w[1] for w in ws]).contiguous()
    bias = torch.cat(bs)

    def three():
        return [w8a8_gemm_triton(qx, sx, w[0], w[1], b, "per_token", "per_channel", torch.bfloat16)
                for w, b in zip(ws, bs)]

    def fused():
        return w8a8_gemm_triton(qx, sx, qw, sw, bias, "per_token", "per_channel", torch.bfloat16)

    sep, one = three(), fused()
    row = {"shape": f"{m}x{k}->3x{k}", "ms": {},
           "slices_equal": [bool(torch.equal(one[:, i * k:(i + 1) * k], s)) for i, s in enumerate(sep)]}
    for name, fn in (("three GEMMs", three), ("one fused GEMM", fused), ("three GEMMs (again)", three),
                     ("one fused GEMM (again)", fused)):
        row["ms"][name] = _bench(fn)
    row["tflops"] = {kk: 2.0 * m * k * 3 * k / v / 1e9 for kk, v in row["ms"].items()}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default="13b,14b")
    ap.add_argument("--forms", default=",".join(EM.GELU_NATIVE_FORMS))
    ap.add_argument("--sections", default="gelu,qkv")
    args = ap.parse_args()
    forms = args.forms.split(",")
    for form in forms:
        if form not in EM.GELU_NATIVE_FORMS:
            raise SystemExit(f"unknown GELU form {form!r}; valid: {', '.join(EM.GELU_NATIVE_FORMS)}")
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "gelu": [], "qkv": []}
    for key in args.shapes.split(","):
        m, dim, ffn = SHAPES[key]
        for section, fn, fargs in (("qkv", qkv, (m, dim)), ("gelu", gelu_forms, (m, dim, ffn, forms))):
            if section not in args.sections.split(","):
                continue
            r = fn(*fargs)
            print(json.dumps(r), flush=True)
            res[section].append(r)
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_gelu_qkv.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
