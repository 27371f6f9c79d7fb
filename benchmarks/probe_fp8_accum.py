"""How much Hopper's FP8 accumulation costs the W8A8 GEMM, against the reduction length K.

    source benchmarks/gpu_env.sh; python3 benchmarks/probe_fp8_accum.py --out $OUT

An FP8 wgmma adds its products into an accumulator of reduced precision (the DeepSeek-V3 report measures
~14 mantissa bits), and Triton on sm90 lets a whole K loop accumulate that way. INT8 accumulates exactly
in int32. For Wan's reduction lengths (1536 .. 13824) this prints, per K: the relative L2 error of the
production `w8a8_linear_prequant` (fp32 output, per-token × per-channel and block128 × block128) against an
fp64 GEMM of the same codes and scales; the same for a minimal FP8 Triton GEMM with and without
`max_num_imprecise_acc` (promotion to fp32 every BLOCK_K, as DeepSeek-V3 does), and the production kernel
with that promotion (`triton_gemm_tma.FP8_PROMOTE`); and, for scale, the quantization error itself (the fp8
GEMM vs the bf16 GEMM of the unquantized operands). Then the promotion's cost: Wan's GEMM shapes timed with
FP8_PROMOTE off and on, next to INT8 and bf16 F.linear (``--time``).
JSON: $OUT/probe_fp8_accum.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

from turbocompile.kernels.w8a8 import triton_gemm_tma
from turbocompile.ops import w8a8

# Wan's W8A8 GEMMs (M tokens, K, N): 1.3B 480p (L 32760, dim 1536, FFN 8960), 14B 720p (L 75600, 5120, 13824)
TIMED = {"1.3B qkv": (32760, 1536, 4608), "1.3B ffn-up": (32760, 1536, 8960), "1.3B ffn-down": (32760, 8960, 1536),
         "14B qkv": (75600, 5120, 15360), "14B ffn-up": (75600, 5120, 13824), "14B ffn-down": (75600, 13824, 5120)}


@triton.jit
def _fp8_gemm(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              PROMOTE: tl.constexpr):
    """C [M, N] fp32 = A [M, K] e4m3 · B [N, K]ᵀ e4m3 (pointer loads; M, N, K multiples of the tiles)."""
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(b_ptr + rn[:, None] * K + (k0 + rk)[None, :])
        if PROMOTE:
            acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=BK)
        else:
            acc = tl.dot(a, b.T, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ks", default="256,1536,5120,8960,13824")
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test under TRITON_INTERPRET=1")
    ap.add_argument("--time", default=",".join(TIMED), help=f"GEMMs to time (CUDA), of {list(TIMED)}; '' for none")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
           "m": args.m, "n": args.n, "rows": []}
    print(res["device"], res["torch"], "triton", res["triton"], flush=True)
    for K in (int(k) for k in args.ks.split(",")):
        x = torch.randn(args.m, K, device=args.device) * (1 + torch.rand(1, K, device=args.device))  # channel spread
        w = torch.randn(args.n, K, device=args.device) / K ** 0.5
        row = {"K": K}
        for fmt in ("fp8", "int8"):
            for ag, wg in (("per_token", "per_channel"), ("block128", "block128")):
                qw, sw = w8a8.quantize_weight(w, fmt, wg)
                qx, sx = w8a8.quantize_activation(x, fmt, ag)
                got = w8a8.w8a8_linear_prequant(qx, sx, qw, sw, None, fmt, ag, wg, out_dtype=torch.float32,
                                                backend="triton")
                exact = _fp64_gemm(qx, sx, qw, sw, ag)
                row[f"{fmt} {ag}x{wg} acc_rel"] = rel(got, exact)
                if fmt == "fp8" and ag == "per_token":  # the TMA kernel's FP8_PROMOTE knob
                    triton_gemm_tma.FP8_PROMOTE = True
                    got = w8a8.w8a8_linear_prequant(qx, sx, qw, sw, None, fmt, ag, wg, out_dtype=torch.float32,
                                                    backend="triton")
                    triton_gemm_tma.FP8_PROMOTE = False
                    row[f"{fmt} {ag}x{wg} FP8_PROMOTE acc_rel"] = rel(got, exact)
                row[f"{fmt} {ag}x{wg} quant_rel_vs_bf16"] = rel(got, x.bfloat16().float() @ w.bfloat16().float().t())
        a8, b8 = x.to(torch.float8_e4m3fn), w.mul(K ** 0.5).to(torch.float8_e4m3fn)
        exact = a8.double() @ b8.double().t()
        for promote in (False, True):
            c = torch.empty(args.m, args.n, device=args.device)
            _fp8_gemm[(args.m // 128, args.n // 128)](a8, b8, c, args.m, args.n, K, BM=128, BN=128, BK=128,
                                                       PROMOTE=promote, num_warps=8)
            row[f"raw fp8 gemm promote={promote} rel"] = rel(c, exact)
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
    if args.device == "cuda" and args.time:
        res["timing"] = time_promotion([n for n in args.time.split(",") if n], args.reps)
    with open(os.path.join(args.out, "probe_fp8_accum.json"), "w") as f:
        json.dump(res, f, indent=1)


def time_promotion(names, reps):
    """ms of the FP8 per-token × per-channel GEMM (bf16 out, autotuned TMA kernel) with FP8_PROMOTE off / on,
    median of ``reps`` interleaved rounds of triton.testing.do_bench, next to the INT8 GEMM and bf16 F.linear."""
    out = []
    for name in names:
        m, k, n = TIMED[name]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        runs = {}
        for fmt in ("fp8", "int8"):
            qw, sw = w8a8.quantize_weight(w, fmt, "per_channel")
            qx, sx = w8a8.quantize_activation(x, fmt, "per_token")
            runs[fmt] = (lambda qx=qx, sx=sx, qw=qw, sw=sw, fmt=fmt: w8a8.w8a8_linear_prequant(
                qx, sx, qw, sw, None, fmt, "per_token", "per_channel", out_dtype=torch.bfloat16, backend="triton"))
        times = {"fp8": [], "fp8 promoted": [], "int8": [], "bf16 F.linear": []}
        for _ in range(reps):
            for label in times:
                triton_gemm_tma.FP8_PROMOTE = label == "fp8 promoted"
                fn = runs["fp8" if label.startswith("fp8") else "int8"] if label != "bf16 F.linear" else (
                    lambda: torch.nn.functional.linear(x, w))
                fn()  # compile / autotune outside the timing
                times[label].append(triton.testing.do_bench(fn, warmup=25, rep=100))
        triton_gemm_tma.FP8_PROMOTE = False
        row = {"name": name, "shape": [m, k, n], **{k2: sorted(v)[len(v) // 2] for k2, v in times.items()}}
        row["promotion cost"] = row["fp8 promoted"] / row["fp8"] - 1
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def _fp64_gemm(qx, sx, qw, sw, ag):
    """fp64 Σ_k sA·sW·qA·qW over the scale groups (codes are exact in fp64)."""
    a, b = qx.double(), qw.double()
    M, K = a.shape
    N = b.shape[0]
    if ag == "per_token":
        return (a @ b.t()) * sx.double().reshape(M, 1) * sw.double().reshape(1, N)
    out = torch.zeros(M, N, dtype=torch.float64, device=a.device)
    for kb in range(0, K, 128):
        part = a[:, kb:kb + 128] @ b[:, kb:kb + 128].t()
        sa = sx.double()[:, kb // 128].repeat_interleave(128)[:M].reshape(M, 1)  # 128×128 tiles
        swb = sw.double()[:, kb // 128].repeat_interleave(128)[:N].reshape(1, N)
        out += part * sa * swb
    return out


if __name__ == "__main__":
    main()
