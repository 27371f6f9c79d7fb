"""ffn.0's GELU GEMM writing ffn.2's FP8 codes at the "bound" row scales (``turbo-fp8``): the short GELU
codes epilogue (``triton_gemm_tma.GELU_CODES_SHORT``, the default) against the long form it replaces, at the
Wan-1.3B and Wan-14B shapes, on a GPU.

For each shape: the codes of both forms compared bit for bit with each other and with the reference
(``ref.quantize_at_scale_ref`` of the bf16 h that the GELU GEMM stores without codes), then the op timed in
alternating rounds (short, long, short, long, ...) so that clock drift does not favour one form; the plain
GEMM (bf16 out, no GELU) and the GELU GEMM with bf16 h are timed beside them for scale.

    python benchmarks/probe_gelu_codes.py --out $OUT [--rounds 4]

``--only short|long|bf16h`` runs one variant three times at one shape with the autotuner's usual pick
(128x256, 8 warps, 3 stages, subtiled) as a fixed config, as a target for ncu:

    ncu --clock-control none -k regex:_w8a8_gemm_tma -s 1 -c 1 --set full --import-source no -o $OUT/rep \
        python benchmarks/probe_gelu_codes.py --only short --shapes 13b
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
from turbocompile.kernels.w8a8 import triton_gemm_tma as TMA
from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton
from turbocompile.kernels.w8a8.triton_gemm_epilogue import w8a8_gemm_gelu_quant_triton, w8a8_gemm_gelu_triton
from turbocompile.ops.w8a8 import quantize_weight

SHAPES = {"13b": (32760, 1536, 8960), "14b": (75600, 5120, 13824)}
FIXED = {"BLOCK_M": 128, "BLOCK_N": 256, "EPILOGUE_SUBTILE": True, "num_warps": 8, "num_stages": 3}


def _operands(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g) * 2
    w = torch.randn(n, k, device="cuda", generator=g) * (1.5 / k ** 0.5)
    qx, sx = ref.quantize_ref(x, "fp8", "per_token")
    qw, sw = quantize_weight(w, "fp8", "per_channel")
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    return qx, sx, qw, sw, b


def _codes(ops, short: bool):
    TMA.GELU_CODES_SHORT = short
    return w8a8_gemm_gelu_quant_triton(*ops, "per_token", "per_channel", torch.bfloat16, "fp8", out_scale="bound",
                                       use_tma=True)


def _time(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def probe(name: str, rounds: int) -> dict:
    m, k, n = SHAPES[name]
    ops = _operands(m, k, n)
    q_s, s_s = _codes(ops, True)
    q_l, s_l = _codes(ops, False)
    h = w8a8_gemm_gelu_triton(*ops, "per_token", "per_channel", torch.bfloat16, amax_mode="none", use_tma=True)[0]
    q_r = ref.quantize_at_scale_ref(h, s_s)
    res = {"shape": {"M": m, "K": k, "N": n},
           "scales_equal": bool(torch.equal(s_s, s_l)),
           "code_diffs_short_vs_long": int((q_s.view(torch.uint8) != q_l.view(torch.uint8)).sum()),
           "code_diffs_short_vs_ref": int((q_s.float() != q_r.float()).sum()),
           "code_diffs_long_vs_ref": int((q_l.float() != q_r.float()).sum()),
           "codes": m * n}
    del q_s, q_l, h, q_r
    times = {"short": [], "long": []}
    for _ in range(rounds):
        for short, key in ((True, "short"), (False, "long")):
            TMA.GELU_CODES_SHORT = short
            times[key].append(_time(lambda: w8a8_gemm_gelu_quant_triton(
                *ops, "per_token", "per_channel", torch.bfloat16, "fp8", out_scale="bound", use_tma=True)))
    TMA.GELU_CODES_SHORT = True
    res["ms"] = {key: statistics.median(v) for key, v in times.items()}
    res["ms_rounds"] = times
    res["ms"]["gelu_bf16_h"] = _time(lambda: w8a8_gemm_gelu_triton(*ops, "per_token", "per_channel", torch.bfloat16,
                                                                   amax_mode="none", use_tma=True))
    res["ms"]["gemm_bf16"] = _time(lambda: w8a8_gemm_triton(*ops, "per_token", "per_channel", torch.bfloat16))
    res["gain_pct"] = 100.0 * (res["ms"]["long"] - res["ms"]["short"]) / res["ms"]["long"]
    res["tflops_short"] = 2.0 * m * k * n / res["ms"]["short"] / 1e9
    print(name, json.dumps({key: res[key] for key in res if key != "ms_rounds"}), flush=True)
    del ops
    torch.cuda.empty_cache()
    return res


def only(variant: str, name: str) -> None:
    """One variant, three launches (ncu target)."""
    ops = _operands(*SHAPES[name])
    TMA.GELU_CODES_SHORT = variant == "short"
    for _ in range(3):
        if variant == "bf16h":
            w8a8_gemm_gelu_triton(*ops, "per_token", "per_channel", torch.bfloat16, amax_mode="none", use_tma=True,
                                  tma_config=FIXED)
        else:
            w8a8_gemm_gelu_quant_triton(*ops, "per_token", "per_channel", torch.bfloat16, "fp8", out_scale="bound",
                                        use_tma=True, tma_config=FIXED)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--shapes", default="13b,14b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--only", choices=("short", "long", "bf16h"), help="run one variant (an ncu target)")
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        ap.error(f"unknown shape {bad[0]!r}; valid: {', '.join(SHAPES)}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    if args.only:
        only(args.only, shapes[0])
        return
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "results": {s: probe(s, args.rounds) for s in shapes}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_gelu_codes.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
