"""The persistent TMA GEMM at 128x256 (8 warps, 3 stages) with its epilogue subtiled (two 128-column halves:
the shipped config) or not (one 256-column store), at the Wan GEMM shapes, on a GPU. (Session 28 also timed a
third variant here, the epilogue's scale / bias lines prefetched into L1 at the tile's start: no gain, removed.)

Why: compiled for sm90, the subtiled epilogue loads the per-column weight scales and bias in the split
accumulator's layout, one scattered 4-byte load with its own 64-bit address arithmetic per column and
thread (about 840 of the plain epilogue's 1486 instructions per thread); the whole-tile epilogue loads
them coalesced and spreads them through shared memory (882 instructions).

For each shape and epilogue (plain bf16 out; ffn.0's GELU + FP8 codes at bound row scales): outputs of
every variant compared bit for bit, then all timed in alternating rounds.

    python benchmarks/probe_gemm_subtile.py --out $OUT [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import triton
import triton.testing

from turbocompile.kernels.w8a8 import ref
from turbocompile.kernels.w8a8.triton_bound import row_bound_scale_triton
from turbocompile.kernels.w8a8.triton_gemm_tma import w8a8_gemm_tma
from turbocompile.ops.w8a8 import quantize_weight

# name -> (M, K, N, epilogue)
CASES = {
    "13b_qkv": (32760, 1536, 4608, "plain"), "13b_o": (32760, 1536, 1536, "plain"),
    "13b_ffn2": (32760, 8960, 1536, "plain"), "13b_ffn0_codes": (32760, 1536, 8960, "codes"),
    "14b_o": (75600, 5120, 5120, "plain"), "14b_ffn2": (75600, 13824, 5120, "plain"),
    "14b_ffn0_codes": (75600, 5120, 13824, "codes"),
}


def _cfg(sub: bool) -> dict:
    return {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "EPILOGUE_SUBTILE": sub,
            "num_warps": 8, "num_stages": 3}


def _case(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g) * 2
    w = torch.randn(n, k, device="cuda", generator=g) * (1.5 / k ** 0.5)
    qx, sx = ref.quantize_ref(x, "fp8", "per_token")
    qw, sw = quantize_weight(w, "fp8", "per_channel")
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    return qx, sx, qw, sw, b


# variant -> subtiled epilogue
VARIANTS = {"subtiled": True, "whole": False}


def _runner(ops, epilogue: str, variant: str):
    qx, sx, qw, sw, b = ops
    sub = VARIANTS[variant]

    def gemm(**kw):
        return w8a8_gemm_tma(qx, sx, qw, sw, b, torch.bfloat16, config=_cfg(sub), **kw)

    if epilogue == "plain":
        return gemm
    wb = ref.gelu_bound_constants_ref(qw, sw, b, "per_channel")
    s = row_bound_scale_triton(qx, sx, wb)
    return lambda: gemm(activation="gelu_tanh", amax_mode="rowscale", amax_out=s)


def probe(name: str, rounds: int) -> dict:
    m, k, n, epilogue = CASES[name]
    ops = _case(m, k, n)
    run = {v: _runner(ops, epilogue, v) for v in VARIANTS}
    y = {v: run[v]() for v in VARIANTS}
    y = {v: (o[0] if isinstance(o, tuple) else o).view(torch.uint8) for v, o in y.items()}
    res = {"M": m, "K": k, "N": n, "epilogue": epilogue,
           "outputs_equal": all(torch.equal(y["subtiled"], o) for o in y.values())}
    del y
    t = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v in VARIANTS:
            t[v].append(triton.testing.do_bench(run[v], warmup=25, rep=150, return_mode="median"))
    res["ms"] = {v: statistics.median(x) for v, x in t.items()}
    res["ms_rounds"] = t
    res["gain_pct"] = {v: 100.0 * (res["ms"]["subtiled"] - res["ms"][v]) / res["ms"]["subtiled"] for v in VARIANTS}
    print(name, json.dumps({key: v for key, v in res.items() if key != "ms_rounds"}), flush=True)
    del ops, run
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    args = ap.parse_args()
    cases = args.cases.split(",")
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case {bad[0]!r}; valid: {', '.join(CASES)}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "results": {c: probe(c, args.rounds) for c in cases}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_gemm_subtile.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
