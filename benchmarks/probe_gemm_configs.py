"""Probe (GPU): the FP8 TMA W8A8 GEMM at the Wan forward's shapes, every autotune config timed on its
own next to the autotuner's pick, so a mis-pick shows. Correctness of each config vs the pointer
kernel first (bit-equal expected).

    python benchmarks/probe_gemm_configs.py --out $OUT [--shapes 13b,14b]

(Branch ``exp/gemm-ws-pingpong`` adds ``--ws``: a warp-specialized ping-pong Gluon kernel timed next
to these; session 9 in RESULTS.md.)

Shapes (M x K -> N, epilogue): Wan2.1-1.3B 480p M=32760: 1536->1536, 1536->8960 GELU, 8960->1536;
Wan-14B 720p M=75600: 5120->5120, 5120->13824 GELU, 13824->5120.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.testing

from turbocompile.kernels.w8a8 import triton_gemm_tma as TMA
from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton
from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_triton
from turbocompile.ops.w8a8 import quantize_activation, quantize_weight

SHAPES = {
    "13b": [(32760, 1536, 1536, None), (32760, 1536, 8960, "gelu_tanh"), (32760, 8960, 1536, None)],
    "14b": [(75600, 5120, 5120, None), (75600, 5120, 13824, "gelu_tanh"), (75600, 13824, 5120, None)],
}


def _cfg_dict(c) -> dict:
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _name(c: dict) -> str:
    return (f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}"
            f"{' sub' if c['EPILOGUE_SUBTILE'] else ''}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default="13b,14b")
    args = ap.parse_args()
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shapes": []}
    for group in args.shapes.split(","):
        for m, k, n, act in SHAPES[group]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda") * k ** -0.5
            bias = (torch.randn(n, device="cuda") * 0.1).to(torch.bfloat16)
            qw, sw = quantize_weight(w, "fp8", "per_channel")
            qx, sx = quantize_activation(x, "fp8", "per_token", "triton")
            del x, w

            def run(cfg=None, tma=True):
                if act:
                    return w8a8_gemm_gelu_triton(qx, sx, qw, sw, bias, "per_token", "per_channel", torch.bfloat16,
                                                 amax_mode="none", use_tma=tma, tma_config=cfg)[0]
                return w8a8_gemm_triton(qx, sx, qw, sw, bias, "per_token", "per_channel", torch.bfloat16,
                                        use_tma=tma, tma_config=cfg)

            row = {"shape": f"{m}x{k}->{n}" + (f" {act}" if act else ""), "ms": {}, "check": {}}
            ref = run(tma=False)
            auto = run()
            row["check"]["autotuned_equal_pointer"] = bool(torch.equal(auto, ref))
            row["ms"]["autotuned"] = triton.testing.do_bench(lambda: run(), warmup=50, rep=400)
            pick = TMA.tuned_tma_config()
            row["autotune_pick"] = None if pick is None else _name(_cfg_dict(pick))
            for c in TMA.tma_configs():
                cd = _cfg_dict(c)
                nm = _name(cd)
                try:
                    out = run(cd)
                    row["check"][nm] = bool(torch.equal(out, ref))
                    row["ms"][nm] = triton.testing.do_bench(lambda: run(cd), warmup=50, rep=400)
                except Exception as exc:  # a config that does not fit: recorded, the sweep goes on
                    row["ms"][nm] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
            row["ms"]["autotuned (again)"] = triton.testing.do_bench(lambda: run(), warmup=50, rep=400)
            flops = 2.0 * m * k * n
            row["best"] = min((v, kk) for kk, v in row["ms"].items() if isinstance(v, float))
            row["pflops_best"] = flops / row["best"][0] / 1e12
            print(json.dumps(row), flush=True)
            res["shapes"].append(row)
            del qx, sx, qw, sw, ref, auto
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_gemm_configs.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
