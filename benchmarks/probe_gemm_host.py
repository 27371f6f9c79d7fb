"""Is the W8A8 GEMM's eager time at small Wan-1.3B shapes host-bound? (RESULTS.md session 24, known gap 5)

For each shape, FP8 per-token x per-channel, the persistent TMA kernel and the pointer kernel:
* ``eager_ms``: ``triton.testing.do_bench`` median, as ``bench_w8a8.py`` times it (launches from Python);
* ``graph_ms``: one CUDA graph of ``REPS`` back-to-back calls, replay time / REPS (host work left out);
* ``host_us``: Python-side time per call of ``REPS`` launches queued without synchronizing behind a
  long GPU sleep (so the queue never drains and the host never waits on the GPU).
If eager_ms ≈ host_us / 1000 and well above graph_ms, the eager figure measures the host.

    python3 benchmarks/probe_gemm_host.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton
import triton.testing
from _host import per_call_us  # benchmarks/ is the script's directory

from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton
from turbocompile.kernels.w8a8.triton_quant import quantize_triton
from turbocompile.ops.w8a8 import quantize_weight

SHAPES = ((32760, 1536, 1536), (32760, 1536, 8960), (32760, 8960, 1536))
REPS = 50


def graph_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / REPS)
    return sorted(times)[len(times) // 2]


def host_us(fn) -> float:
    """Host µs per call of REPS launches enqueued behind ~1 s of GPU sleep (launches only enqueue)."""
    return per_call_us(fn, REPS, sleep_ms=1000.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "reps": REPS, "rows": []}
    print(res)
    for m, k, n in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        qx, sx = quantize_triton(x, "fp8", "per_token")
        qw, sw = quantize_weight(torch.randn(n, k, device="cuda") * 0.03, "fp8", "per_channel")
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
        for name, tma in (("tma", True), ("pointer", False)):
            def fn(tma=tma):
                return w8a8_gemm_triton(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16, use_tma=tma)

            fn()
            row = {"shape": [m, k, n], "kernel": name,
                   "eager_ms": triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"),
                   "graph_ms": graph_ms(fn), "host_us": host_us(fn)}
            row["tflops_graph"] = 2.0 * m * n * k / (row["graph_ms"] * 1e-3) / 1e12
            res["rows"].append(row)
            print(f"{m}x{k}x{n} {name:<8} eager {row['eager_ms']:.3f} ms  graph {row['graph_ms']:.3f} ms "
                  f"({row['tflops_graph']:.0f} TFLOP/s)  host {row['host_us']:.1f} us/call", flush=True)
    with open(os.path.join(a.out, "probe_gemm_host.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
