"""Benchmark (GPU): Wan's cross-attention between the q and o projections, unfused vs ``norm_attention_quant``.

What ``fuse_text_attention`` replaces, timed as CUDA-graph replays at the real shapes (Wan2.1-1.3B 480p and
Wan-14B 720p, 512 text keys, a prompt of ``--prompt-tokens`` real tokens zero-padded to 512):

* unfused, as ``turbo-fp8`` runs it: ``rmsnorm_rope`` (no RoPE) -> cuDNN SDPA over all 512 keys ->
  ``quantize_activation`` per token (FP8);
* unfused with ``merge_padding_keys``: the same with ``tail_merged_attention``;
* fused: ``norm_attention_quant`` (FP8 codes at the per-sample scale max|v| / 448) over all keys and over the
  merged keys, plus a sweep of its launch configs; the parts (rstd pass, attention + quantization) alone.

Checks at full size (same run): the fused op against its reference (``norm_attention_quant_ref``: dequantized
relative error, scales equal), and both paths' dequantized codes against the unquantized fp32 attention output
(what the bound scale costs against per-token abs-max scales). Reports the HBM traffic floor of the fused op
(read z twice, write codes and scales) against a device copy measured in the same run.

    python3 benchmarks/bench_text_attention.py --out $OUT [--shapes 13b,14b] [--prompt-tokens 100] [--sweep]

Writes ``text_attention.json`` and ``text_attention.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import charts  # benchmarks/ is the script's directory (sys.path[0])
from _cuda_graph import graphed
from turbocompile.kernels.text_attention import ref as text_ref
from turbocompile.kernels.norms.ref import rmsnorm_rope_ref
from turbocompile.kernels.text_attention import triton_norm_attn_quant as fused_mod
from turbocompile.ops.norms import rmsnorm_rope
from turbocompile.ops.text_attention import key_tail_start, tail_merged_attention, value_bound
from turbocompile.ops.w8a8 import quantize_activation

# (L, heads, dim): Wan2.1-1.3B 480p x 81 frames and Wan-14B 720p x 81 frames
SHAPES = {"13b": (32760, 12, 1536), "14b": (75600, 40, 5120)}
TEXT = 512
SWEEP = [  # launch configs of the fused op (DEFAULT_CONFIG is timed as "fused, merged keys")
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"RSTD_ROWS": 16, "RSTD_COLS": 512, "RSTD_WARPS": 4},
    {"RSTD_ROWS": 4, "RSTD_COLS": 1024, "RSTD_WARPS": 4},
    {"RSTD_ROWS": 32, "RSTD_COLS": 256, "RSTD_WARPS": 8},
]


def _bench(fn) -> float:
    return triton.testing.do_bench(graphed(fn), warmup=25, rep=200)


def _copy_gbps() -> float:
    x = torch.empty(1 << 29, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=100)
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def _rel(codes, scales, r) -> float:
    a = codes.float() * scales
    return ((a - r).norm() / r.norm()).item()


def run_shape(name: str, prompt: int, sweep: bool) -> dict:
    L, H, D = SHAPES[name]
    d = D // H
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(1, L, D, device="cuda", generator=g).mul_(3).to(torch.bfloat16)
    w = (torch.rand(D, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    k = torch.randn(1, TEXT, H, d, device="cuda", generator=g).mul_(1.5).to(torch.bfloat16)
    v = torch.randn(1, TEXT, H, d, device="cuda", generator=g).add_(0.3).to(torch.bfloat16)
    k[:, prompt:] = k[:, -1:].clone()  # the padding's equal K/V rows
    v[:, prompt:] = v[:, -1:].clone()
    tail = key_tail_start(k, v)
    row = {"shape": f"L{L} H{H} D{D}", "prompt_tokens": prompt, "tail_start": int(tail[0, 0]), "ms": {}, "check": {}}

    def unfused(merged: bool):
        qn = rmsnorm_rope(z, w, None, None, num_heads=H, eps=1e-6).unflatten(-1, (H, d))
        if merged:
            o = tail_merged_attention(qn, k, v, tail)
        else:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                o = F.scaled_dot_product_attention(qn.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            o = o.transpose(1, 2)
        return quantize_activation(o.flatten(2).reshape(L, D), "fp8", "per_token")

    vb = value_bound(v)

    def fused(merged: bool, cfg=None):
        return fused_mod.norm_attention_quant_triton(z, w, k, v, vb, tail if merged else None, H, 1e-6, config=cfg)

    # checks: the fused op vs its reference; both paths vs the unquantized fp32 attention output
    for merged in (False, True):
        tag = "merged" if merged else "all keys"
        t = tail if merged else torch.full((1, H), TEXT, dtype=torch.int32, device="cuda")
        rc, rs = text_ref.norm_attention_quant_ref(z, w, k, v, vb, t, H, 1e-6)
        fc, fs = fused(merged)
        row["check"][f"fused vs its reference, {tag}"] = {"rel": _rel(fc, fs, rc.float() * rs),
                                                          "scales_equal": bool(torch.equal(fs, rs))}
        del rc, rs
        qn = rmsnorm_rope_ref(z, w, None, None, H, 1e-6).unflatten(-1, (H, d))
        o32 = text_ref.tail_merged_attention_ref(qn.float(), k.float(), v.float(), t).reshape(L, D)
        del qn
        row["check"][f"error vs fp32 output, fused (bound scale), {tag}"] = _rel(fc, fs, o32)
        row["check"][f"error vs fp32 output, unfused (per-token scale), {tag}"] = _rel(*unfused(merged), o32)
        del o32, fc, fs
        torch.cuda.empty_cache()
    row["ms"]["unfused: rmsnorm + cuDNN SDPA (512 keys) + quantizer"] = _bench(lambda: unfused(False))
    row["ms"]["unfused: rmsnorm + tail-merged attention + quantizer"] = _bench(lambda: unfused(True))
    row["ms"]["fused, all 512 keys"] = _bench(lambda: fused(False))
    row["ms"]["fused, merged keys"] = _bench(lambda: fused(True))
    # the parts alone, to see where the time goes
    qn = rmsnorm_rope(z, w, None, None, num_heads=H, eps=1e-6)
    o = tail_merged_attention(qn.unflatten(-1, (H, d)), k, v, tail)
    row["ms"]["part: rmsnorm"] = _bench(lambda: rmsnorm_rope(z, w, None, None, num_heads=H, eps=1e-6))
    row["ms"]["part: tail-merged attention"] = _bench(lambda: tail_merged_attention(qn.unflatten(-1, (H, d)), k, v, tail))
    row["ms"]["part: quantizer"] = _bench(lambda: quantize_activation(o.flatten(2).reshape(L, D), "fp8", "per_token"))
    rstd = torch.empty(L, device="cuda", dtype=torch.float32)
    cfg0 = fused_mod.DEFAULT_CONFIG
    row["ms"]["part: fused op's rstd pass"] = _bench(lambda: fused_mod._rms_rstd_kernel[(triton.cdiv(L, cfg0["RSTD_ROWS"]),)](
        z, rstd, L, L, D, 1e-6, z.stride(0), z.stride(1), BLOCK_R=cfg0["RSTD_ROWS"], BLOCK_D=cfg0["RSTD_COLS"],
        num_warps=cfg0["RSTD_WARPS"]))
    if sweep:
        for cfg in SWEEP:
            label = "fused merged " + " ".join(f"{k}={v}" for k, v in cfg.items())
            try:
                row["ms"][label] = _bench(lambda cfg=cfg: fused(True, cfg))
            except Exception as exc:  # a config the compiler cannot fit (shared memory, registers)
                row["ms"][label] = None
                row.setdefault("errors", {})[label] = f"{type(exc).__name__}: {str(exc)[:200]}"
    floor_bytes = 2 * L * D * 2 + L * D + L * 4  # z twice (rstd pass, attention), codes, scales
    row["floor_bytes"] = floor_bytes
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default="13b,14b")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--sweep", action="store_true", help="also time the fused op's launch configs")
    args = ap.parse_args()
    bad = [s for s in args.shapes.split(",") if s not in SHAPES]
    if bad:
        raise SystemExit(f"unknown shape {bad[0]!r}; choose from {', '.join(SHAPES)}")
    if not 1 <= args.prompt_tokens <= TEXT:
        raise SystemExit(f"--prompt-tokens must be in 1..{TEXT}, got {args.prompt_tokens}")
    os.makedirs(args.out, exist_ok=True)
    copy = _copy_gbps()
    data = {"info": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                     "date": time.strftime("%Y-%m-%d"), "copy_GBps_measured": copy,
                     "command": "python3 benchmarks/bench_text_attention.py " + " ".join(os.sys.argv[1:])},
            "text_attention": []}
    for name in args.shapes.split(","):
        row = run_shape(name, args.prompt_tokens, args.sweep)
        fused_ms = row["ms"]["fused, merged keys"]
        row["fused_merged_pct_of_copy"] = 100 * row["floor_bytes"] / (fused_ms * 1e-3) / 1e9 / copy
        data["text_attention"].append(row)
        print(json.dumps(row, indent=1), flush=True)
        torch.cuda.empty_cache()
    path = os.path.join(args.out, "text_attention.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print("wrote", path, charts.save(data, os.path.join(args.out, "text_attention.png")))


if __name__ == "__main__":
    main()
