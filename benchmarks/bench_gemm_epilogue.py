"""FFN ffn.0 at Wan2.1-1.3B 480p (M=L=32760, K=1536, N=8960): the unfused chain vs the GELU-epilogue GEMM
and its quantizing variants (amax schemes). Correctness on the GPU vs the references, then do_bench medians.

    python benchmarks/bench_gemm_epilogue.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.testing

from turbocompile.kernels.w8a8 import ref
from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton
from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_quant_triton, w8a8_gemm_gelu_triton
from turbocompile.kernels.w8a8.triton_quant import quantize_triton
from turbocompile.ops.w8a8 import quantize_weight


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=32760)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    m, k, n = a.m, 1536, 8960
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}  M={m} K={k} N={n}")
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.03
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
    qx, sx = quantize_triton(x, "int8", "per_token")
    qw, sw = quantize_weight(w, "int8", "per_channel")
    args = (qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16)

    def unfused_bf16():
        return torch.nn.functional.gelu(w8a8_gemm_triton(*args), approximate="tanh")

    def unfused_quant():
        return quantize_triton(unfused_bf16(), "int8", "per_token")

    res = {}
    # correctness on a row slice (fp64 reference)
    ms = 2048
    sl = (qx[:ms], sx[:ms], qw, sw, b, "per_token", "per_channel")
    truth = torch.nn.functional.gelu(ref.w8a8_gemm_ref(*sl, torch.float64), approximate="tanh")
    h, _ = w8a8_gemm_gelu_triton(*sl, torch.bfloat16)
    rel = ((h.double() - truth).norm() / truth.norm()).item()
    hu = unfused_bf16()[:ms]
    rel_u = ((hu.double() - truth).norm() / truth.norm()).item()
    print(f"gelu epilogue rel err vs fp64 {rel:.3e} (unfused chain {rel_u:.3e})")
    res["rel_err_fused"], res["rel_err_unfused"] = rel, rel_u
    for mode in ("partial", "atomic", "none"):
        q, s = w8a8_gemm_gelu_quant_triton(*sl, torch.bfloat16, "int8", amax_mode=mode)
        hh, _ = w8a8_gemm_gelu_triton(*sl, torch.bfloat16)
        q_r, s_r = ref.quantize_ref(hh, "int8", "per_token")
        ok = torch.equal(q, q_r) and torch.equal(s, s_r)
        print(f"gelu+quant[{mode}] codes == quantize_ref(stored h): {ok}")
        res[f"codes_exact_{mode}"] = ok
    times = {
        "gemm only (no GELU)": lambda: w8a8_gemm_triton(*args),
        "unfused: gemm -> gelu (bf16)": unfused_bf16,
        "fused: gemm+gelu (bf16)": lambda: w8a8_gemm_gelu_triton(*args),
        "unfused: gemm -> gelu -> quant": unfused_quant,
        "fused gelu + standalone quant": lambda: w8a8_gemm_gelu_quant_triton(*args, "int8", amax_mode="none"),
        "fused gelu + partial amax + quant": lambda: w8a8_gemm_gelu_quant_triton(*args, "int8", amax_mode="partial"),
        "fused gelu + atomic amax + quant": lambda: w8a8_gemm_gelu_quant_triton(*args, "int8", amax_mode="atomic"),
    }
    res["ms"] = {}
    for name, fn in times.items():
        fn()
        t = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        res["ms"][name] = t
    print(f"{'variant':<38} {'ms':>8}   (per call, x30 blocks per forward)")
    for name, t in res["ms"].items():
        print(f"{name:<38} {t:8.3f}   {30 * t:7.1f}")
    with open(os.path.join(a.out, "gemm_epilogue.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
