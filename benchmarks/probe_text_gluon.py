"""Probe (GPU, sm90): the fused cross-attention's Gluon attention kernel alone at a Wan shape, for ncu.

Builds `bench_text_attention.shape_operands` (z, the weight, K/V with a merged padding tail: ``--prompt-tokens``
real keys of 512) and the RMSNorm statistic, launches `norm_attention_quant_gluon` ``--reps`` times with the chosen
key-block geometry and checks its codes against the Triton op's once (which runs its own rstd pass: rare last-bit differences). Typical use::

    ncu --clock-control none -k regex:_text_attn_gluon -s 2 -c 1 --set full -o $OUT/ncu_text \\
        python3 benchmarks/probe_text_gluon.py --shape 13b
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_text_attention import SHAPES, shape_operands  # benchmarks/ is the script's directory
from turbocompile.kernels.text_attention import triton_norm_attn_quant as fused_mod
from turbocompile.kernels.text_attention.gluon_norm_attn_quant import norm_attention_quant_gluon
from turbocompile.ops.text_attention import value_bound


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="13b", choices=sorted(SHAPES))
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--block-n", type=int, default=64, choices=(64, 128))
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs an sm90 CUDA GPU")
    L, H, D = SHAPES[args.shape]
    z, w, k, v, tail = shape_operands(args.shape, args.prompt_tokens)
    vb = value_bound(v)
    rstd = torch.rsqrt(z.float().square().mean(-1) + 1e-6).reshape(L).contiguous()
    codes = torch.empty(L, D, device="cuda", dtype=torch.float8_e4m3fn)
    scales = torch.empty(L, 1, device="cuda", dtype=torch.float32)
    slots = 2 if args.block_n == 64 else 1
    for _ in range(args.reps):
        norm_attention_quant_gluon(z, w, k, v, vb, tail, H, 1e-6, codes, scales, rstd, None, 2,
                                   block_n=args.block_n, nres=slots)
    tc, ts = fused_mod.norm_attention_quant_triton(z, w, k, v, vb, tail, H, 1e-6, kernel="triton")
    torch.cuda.synchronize()
    print(json.dumps({"shape": args.shape, "block_n": args.block_n, "tail_start": int(tail[0, 0]),
                      "codes_differ_vs_triton": float((codes.float() != tc.float()).float().mean()),
                      "scales_equal": bool(torch.equal(scales, ts))}))


if __name__ == "__main__":
    main()
