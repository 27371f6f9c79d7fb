"""Where does an optimized forward spend its time? torch.profiler over one DiT forward, CUDA time
grouped by kernel family (GEMM, attention, norms, quantizer, elementwise glue, ...).

    python benchmarks/profile_forward.py --model wan2.1-t2v-1.3b --recipe turbo-int8 --out $OUT [--cuda-graph]

``--cuda-graph`` profiles a replay of the captured CUDA graph (what the e2e benchmark times) and
also reports the idle time between kernels: kernel count, the span from the first kernel's start
to the last one's end, the sum of kernel times, and the largest gaps with their neighbours.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import torch
from _host import build_forward  # benchmarks/ is the script's directory
from torch.profiler import ProfilerActivity, profile

import turbocompile

FAMILIES = [  # first match wins (kernel names, lower case)
    # passes merge_padding_keys and fuse_text_attention (its rstd pass and its attention + FP8 codes kernel)
    ("text attention", ("_tail_merged", "_key_tail", "_attn_quant_kernel", "_text_attn_gluon", "_rms_rstd_kernel")),
    ("sagesla attention", ("_attn_fwd", "sagesla", "_sparse", "attn_kernel", "_linear_out")),
    ("sagesla prep", ("_prep", "_pool", "_topk", "_lut", "_linear_stats", "_kv_stats", "_quant_k", "_stats",
                      "_key_means", "_linear_fold", "_sample_bound")),
    ("sdpa (cross-attn)", ("flash", "fmha", "cudnn", "sdpa", "attention")),
    ("w8a8 gemm", ("_w8a8", "gemm", "_scaled_mm", "int_mm")),
    ("fused norms", ("_ln_", "_rms", "layernorm", "layer_norm")),
    ("activation quant", ("_quant",)),
    ("bf16 gemm (cublas)", ("sm90_xmma", "cutlass", "gemm", "ampere", "sm80")),
]


def family(name: str) -> str:
    n = name.lower()
    for fam, keys in FAMILIES:
        if any(k in n for k in keys):
            return fam
    return "elementwise / other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--recipe", default="turbo-int8")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="real prompt tokens; the context rows after them are zero (Wan's padding)")
    a = ap.parse_args()
    res, inp = build_forward(a.model, a.recipe, a.prompt_tokens)
    gm = res.graph_module
    if a.cuda_graph:
        gm = res.cuda_graph(inp)
    with torch.no_grad():
        for _ in range(3):
            gm(*inp)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gm(*inp)
        host_ms = (time.perf_counter() - t0) * 1e3  # launch-side time of one forward (async)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gm(*inp)
            torch.cuda.synchronize()
    fam = collections.Counter()
    per_kernel = collections.Counter()
    calls = collections.Counter()  # launches per kernel name in the profiled forward
    for ev in prof.key_averages():
        t = ev.device_time_total / 1e3  # ms
        if t <= 0:
            continue
        fam[family(ev.key)] += t
        per_kernel[ev.key[:90]] += t
        calls[ev.key[:90]] += ev.count
    total = sum(fam.values())
    gaps = _gaps(prof)
    print(f"{a.model} {a.recipe}: wall {wall_ms:.1f} ms, host launch {host_ms:.1f} ms, GPU kernels {total:.1f} ms")
    for k, v in fam.most_common():
        print(f"  {k:<26} {v:8.2f} ms  {100 * v / total:5.1f}%")
    print("top kernels:")
    for k, v in per_kernel.most_common(18):
        print(f"  {v:8.2f} ms  {calls[k]:4d} calls  {1e3 * v / max(calls[k], 1):8.1f} us/call  {k}")
    print("timeline:", json.dumps({k: v for k, v in gaps.items() if k != "largest"}))
    for g in gaps["largest"][:12]:
        print(f"  gap {g[0]:7.1f} us  after {g[1]}  before {g[2]}")
    tag = ("_cudagraph" if a.cuda_graph else "") + (f"_prompt{a.prompt_tokens}" if a.prompt_tokens is not None else "")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": turbocompile.api._version("triton"), "model": a.model, "recipe": a.recipe,
           "prompt_tokens": a.prompt_tokens, "cuda_graph": a.cuda_graph, "wall_ms": wall_ms, "host_ms": host_ms, "families": dict(fam),
           "kernels": dict(per_kernel.most_common(60)),
           "calls": {k: calls[k] for k, _ in per_kernel.most_common(60)}, "timeline": gaps}
    rname = os.path.splitext(os.path.basename(a.recipe))[0]  # a built-in name or a recipe file's
    stem = os.path.join(a.out, f"profile_{a.model}_{rname}{tag}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=2)
    import charts  # benchmarks/ is the script's directory

    charts.save(res, stem + ".png")


def _gaps(prof) -> dict:
    """Kernel timeline of the profiled forward: count, span, busy time, idle gaps between kernels."""
    ks = sorted(((e.time_range.start, e.time_range.end, e.name[:60]) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start),
                key=lambda k: k[0])
    if not ks:
        return {"kernels": 0, "largest": []}
    gaps, busy_end = [], ks[0][1]
    for prev, cur in zip(ks, ks[1:]):
        busy_end = max(busy_end, prev[1])
        if cur[0] > busy_end:
            gaps.append((cur[0] - busy_end, prev[2], cur[2]))
    span = max(k[1] for k in ks) - ks[0][0]
    idle = sum(g[0] for g in gaps)
    small = [g[0] for g in gaps]
    small.sort()
    return {"kernels": len(ks), "span_ms": span / 1e3, "busy_ms": (span - idle) / 1e3, "idle_ms": idle / 1e3,
            "gaps": len(gaps), "median_gap_us": small[len(small) // 2] if small else 0.0,
            "largest": sorted(gaps, reverse=True)[:30]}


if __name__ == "__main__":
    main()
