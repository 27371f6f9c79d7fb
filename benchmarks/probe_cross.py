"""Probe (GPU): two candidate changes to Wan's cross-attention, timed before any code is written.

1. Cross-attention core (L queries x 512 text keys, H heads, D 128): cuDNN SDPA in bf16 vs a proxy
   for the SageSLA kernel in dense mode over 512 keys, i.e. the Gluon kernel with 4 key blocks of
   128 per query block (sparse mode at L keys with T = 4), kernel only (its prep runs outside the
   timing: at 512 keys it is tiny).
2. Cross-attention K and V of all 30 blocks: 60 W8A8 FP8 GEMMs of 512 x dim -> dim (each with its
   own activation quantizer, as the graph runs them) vs one quantizer and one GEMM over the
   concatenated weights (N = 60 * dim).

    python benchmarks/probe_cross.py --out $OUT [--shapes 13b,14b]
    python benchmarks/probe_cross.py --out $OUT --keys 512,256,129,65   # only the key-count sweep
    python benchmarks/probe_cross.py --out $OUT --merged 512,256,100   # merge_padding_keys' ops vs cuDNN

Writes ``probe_cross.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from _cuda_graph import graphed  # benchmarks/ is the script's directory (sys.path[0])
from turbocompile.kernels.sagesla.gluon_attn import launch_gluon
from turbocompile.kernels.sagesla.triton_prep import prepare
from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton
from turbocompile.ops.w8a8 import quantize_activation, quantize_weight

# (L, heads, dim, blocks): Wan2.1-1.3B 480p and Wan-14B 720p
SHAPES = {"13b": (32760, 12, 1536, 30), "14b": (75600, 40, 5120, 40)}
TEXT = 512


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=400)


def cross_attention(L, H) -> dict:
    D = 128
    q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
    kt, vt = (torch.randn(1, H, TEXT, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    qt = q.transpose(1, 2)  # the model's SDPA call sees [B, H, L, D] views of [B, L, H, D]
    row = {"shape": f"L{L} H{H} x {TEXT} keys", "ms": {}}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        row["ms"]["sdpa cudnn bf16"] = _bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    # proxy: same L queries, T = 4 key blocks of 128 (= 512 keys) per 64-row query block
    k, v = (torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kb = math.ceil(L / 128)
    prep = prepare(q, k, v, 4.5 / kb, 64, 128, "int8-fp8", False)
    assert prep["T"] == 4, prep["T"]
    out = torch.empty_like(q)
    row["ms"]["sagesla gluon, 4 key blocks (proxy)"] = _bench(lambda: launch_gluon(q, out, prep, 64, 128, None, None, None))
    flops = 4.0 * H * L * TEXT * D
    row["tflops"] = {name: flops / (ms * 1e-3) / 1e12 for name, ms in row["ms"].items()}
    return row


def key_count_sweep(L, H, counts) -> dict:
    """The cross-attention core over fewer keys (a prompt's real tokens plus one merged pad key): SDPA
    without a mask (cuDNN, flash) and with a float [1, 1, 1, n] bias on the keys (which a merged pad key
    needs: its logit gains ln(#pads)), per backend that accepts it."""
    D = 128
    qt = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    row = {"shape": f"L{L} H{H}", "ms": {}}
    for n in counts:
        kt, vt = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        bias = torch.zeros(1, 1, 1, n, device="cuda", dtype=torch.bfloat16)
        bias[..., -1] = math.log(512 - n + 1)
        for name, backend, mask in (("cudnn", SDPBackend.CUDNN_ATTENTION, None),
                                    ("flash", SDPBackend.FLASH_ATTENTION, None),
                                    ("cudnn+bias", SDPBackend.CUDNN_ATTENTION, bias),
                                    ("efficient+bias", SDPBackend.EFFICIENT_ATTENTION, bias)):
            try:
                with sdpa_kernel([backend]):
                    ms = _bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask))
            except RuntimeError as err:  # a backend that refuses the shape or the mask
                ms = f"refused: {str(err).splitlines()[0][:80]}"
            row["ms"][f"{n} keys, {name}"] = ms
    return row


def merged_sweep(L, H, reals) -> dict:
    """Pass merge_padding_keys' ops against cuDNN SDPA over all 512 text keys, for a prompt of ``real``
    tokens padded to 512 (the padding's K/V rows equal, as Wan's zero padding makes them), each replayed
    from a CUDA graph (no host time): the tail-start kernel, the merged attention at every launch config
    of ``attention_configs`` and at the default one, and the error of cuDNN and the merged op against fp32
    SDPA."""
    from turbocompile.kernels.text_attention.triton_tail_merged import attention_configs, tail_merged_attention_triton
    from turbocompile.ops.text_attention import key_tail_start, tail_merged_attention

    D = 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, L, H, D, device="cuda", generator=g).to(torch.bfloat16)
    row = {"shape": f"L{L} H{H} x {TEXT} keys", "ms": {}, "config_ms": {}, "rel_vs_fp32": {}, "tail_start_ok": True}
    configs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in attention_configs()]
    for real in reals:
        k = torch.randn(1, TEXT, H, D, device="cuda", generator=g).to(torch.bfloat16)
        v = torch.randn(1, TEXT, H, D, device="cuda", generator=g).to(torch.bfloat16)
        if real < TEXT:
            k[:, real:] = k[:, real:real + 1].clone()
            v[:, real:] = v[:, real:real + 1].clone()
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            base = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
            row["ms"][f"{real} real, cudnn over {TEXT}"] = _bench(graphed(lambda: F.scaled_dot_product_attention(qt, kt, vt)))
        n = key_tail_start(k, v)
        row["tail_start_ok"] &= bool((n == min(real, TEXT - 1)).all())
        out = tail_merged_attention(q, k, v, n)
        row["ms"][f"{real} real, tail start"] = _bench(graphed(lambda: key_tail_start(k, v)))
        row["ms"][f"{real} real, merged attention (default)"] = _bench(graphed(lambda: tail_merged_attention(q, k, v, n)))
        for cfg in configs:
            name = "{BLOCK_M}x{BLOCK_N} w{num_warps} s{num_stages}".format(**cfg)
            row["config_ms"].setdefault(name, {})[real] = _bench(
                graphed(lambda: tail_merged_attention_triton(q, k, v, n, config=cfg)))
        ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float()).transpose(1, 2)
        for name, o in (("cudnn", base), ("merged", out)):
            row["rel_vs_fp32"][f"{real} real, {name}"] = ((o.float() - ref).norm() / ref.norm()).item()
        del k, v, base, out, ref
    return row


def cross_kv(dim, blocks) -> dict:
    ctx = torch.randn(TEXT, dim, device="cuda", dtype=torch.bfloat16)
    ws = [quantize_weight(torch.randn(dim, dim, device="cuda") * dim ** -0.5, "fp8", "per_channel")
          for _ in range(2 * blocks)]
    bs = [(torch.randn(dim, device="cuda") * 0.1).to(torch.bfloat16) for _ in range(2 * blocks)]
    qw_cat = torch.cat([w for w, _ in ws])
    sw_cat = torch.cat([s for _, s in ws])
    b_cat = torch.cat(bs)

    def separate():
        for (qw, sw), b in zip(ws, bs):
            qx, sx = quantize_activation(ctx, "fp8", "per_token", "triton")
            w8a8_gemm_triton(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16)

    def fused():
        qx, sx = quantize_activation(ctx, "fp8", "per_token", "triton")
        return w8a8_gemm_triton(qx, sx, qw_cat, sw_cat, b_cat, "per_token", "per_channel", torch.bfloat16)

    qx, sx = quantize_activation(ctx, "fp8", "per_token", "triton")
    y = fused()
    same = all(torch.equal(y[:, i * dim:(i + 1) * dim],
                           w8a8_gemm_triton(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16))
               for i, ((qw, sw), b) in enumerate(zip(ws, bs)))
    return {"shape": f"{2 * blocks} x ({TEXT}x{dim}->{dim})", "slices_bit_equal": same,
            "ms": {"separate (quantizer + GEMM each), CUDA graph": _bench(graphed(separate)),
                   "one quantizer + one GEMM, CUDA graph": _bench(graphed(fused))}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default="13b,14b")
    ap.add_argument("--keys", default="", help="comma-separated key counts: time only the key-count sweep")
    ap.add_argument("--merged", default="", help="comma-separated real prompt lengths: time only the merged-key ops")
    args = ap.parse_args()
    for flag, sweep, name in ((args.merged, merged_sweep, "merged"), (args.keys, key_count_sweep, "keys")):
        if flag:  # one sweep only, per shape
            counts = [int(n) for n in flag.split(",")]
            rows = [sweep(*SHAPES[k][:2], counts) for k in args.shapes.split(",")]
            for row in rows:
                print(json.dumps(row))
            with open(os.path.join(args.out, f"probe_cross_{name}.json"), "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": triton.__version__, "rows": rows}, f, indent=2)
            return
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "attention": [], "cross_kv": []}
    for key in args.shapes.split(","):
        L, H, dim, blocks = SHAPES[key]
        for name, fn in (("attention", lambda: cross_attention(L, H)), ("cross_kv", lambda: cross_kv(dim, blocks))):
            row = fn()
            print(json.dumps(row))
            res[name].append(row)
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "probe_cross.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
