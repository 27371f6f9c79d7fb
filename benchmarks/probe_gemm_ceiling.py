"""Probe (GPU): how close the shipped FP8 W8A8 GEMM is to the vendor's FP8 GEMMs at the Wan forward's shapes.

Issue 8's sampling targets are missed by the stage that takes most of the forward, the W8A8 GEMMs. This probe
asks whether a faster GEMM exists on this GPU by timing, at every GEMM shape of the Wan2.1-1.3B 480p and
Wan-14B 720p forwards, in the same process and interleaved round by round:

* ``ours``: the shipped per-token x per-channel FP8 TMA kernel (``w8a8_gemm_triton``, autotuned), bf16 out + bias;
* ``cublas_rowwise``: ``torch._scaled_mm`` with the same per-row / per-column scales and bias (same math);
* ``cublas_tensorwise``: ``torch._scaled_mm`` with one scale per operand and no bias, cuBLAS's plainest FP8
  kernel (the least epilogue work any FP8 GEMM can do: an upper bound for the mainloop);
* ``bf16``: ``F.linear`` in bf16 (cuBLAS).

Each variant runs ``--calls`` back-to-back GEMMs inside one CUDA graph (host launch cost out); a round replays
every variant's graph once in turn; the figure is the median over ``--rounds`` rounds. The SM clock and board
power are sampled by ``nvidia-smi`` while the rounds run (the rates below are bound by the clock the GPU holds
under load, not by the datasheet's boost clock). Correctness: ``ours`` vs ``cublas_rowwise`` (same
quantized operands and scales) and both vs an fp32 GEMM of the dequantized operands.

    python3 benchmarks/probe_gemm_ceiling.py --out $OUT [--shapes 13b,14b] [--rounds 7] [--calls 10]

Writes ``probe_gemm_ceiling.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton

from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton
from turbocompile.ops.w8a8 import quantize_activation, quantize_weight

# (name, M, K, N) of every distinct GEMM in one forward; per forward count in brackets in the docstring of
# each group. 1.3B (dim 1536, ffn 8960, 30 blocks, L 32760): fused q|k|v, o / cross q / cross o, ffn.0, ffn.2.
# 14B (dim 5120, ffn 13824, 40 blocks, L 75600): q, k, v, o, cross q, cross o (5120->5120), ffn.0, ffn.2.
SHAPES = {
    "13b": [("1.3B qkv", 32760, 1536, 4608, 30), ("1.3B o/cross-q/cross-o", 32760, 1536, 1536, 90),
            ("1.3B ffn.0", 32760, 1536, 8960, 30), ("1.3B ffn.2", 32760, 8960, 1536, 30)],
    "14b": [("14B q/k/v/o/cross-q/cross-o", 75600, 5120, 5120, 240), ("14B ffn.0", 75600, 5120, 13824, 40),
            ("14B ffn.2", 75600, 13824, 5120, 40)],
}


class ClockSampler:
    """``nvidia-smi`` sampling SM clock (MHz) and power (W) every 100 ms while open; None where it is missing."""

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
        return self

    def __exit__(self, *exc):
        self.samples = []
        if self.proc is None:
            return
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        for line in out.splitlines():
            try:
                mhz, watts = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((mhz, watts))

    def summary(self) -> dict | None:
        if not getattr(self, "samples", None):
            return None
        busy = [s for s in self.samples if s[1] > 200.0] or self.samples  # under load, not between rounds
        return {"sm_mhz_median": statistics.median(s[0] for s in busy),
                "power_w_median": statistics.median(s[1] for s in busy), "samples": len(self.samples)}


def _graph(fn, calls: int):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g


def _replay_ms(g, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def probe_shape(name, m, k, n, per_forward, rounds, calls) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5
    bias = (torch.randn(n, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
    qw, sw = quantize_weight(w, "fp8", "per_channel")  # [N, K] e4m3, [N, 1]
    qx, sx = quantize_activation(x, "fp8", "per_token", "triton")  # [M, K] e4m3, [M, 1]
    w_bf16 = w.to(torch.bfloat16)
    one = torch.ones((), device="cuda")
    sw_row = sw.reshape(1, n).contiguous()

    variants = {
        "ours": lambda: w8a8_gemm_triton(qx, sx, qw, sw, bias, "per_token", "per_channel", torch.bfloat16,
                                         use_tma=True),
        "cublas_rowwise": lambda: torch._scaled_mm(qx, qw.t(), sx, sw_row, bias=bias, out_dtype=torch.bfloat16),
        "cublas_tensorwise": lambda: torch._scaled_mm(qx, qw.t(), one, one, out_dtype=torch.bfloat16),
        "bf16": lambda: F.linear(x, w_bf16, bias),
    }
    row = {"name": name, "m": m, "k": k, "n": n, "per_forward": per_forward, "ms": {}, "tflops": {}, "check": {}}

    ref = (qx.float() * sx) @ (qw.float() * sw).t() + bias.float()  # fp32 GEMM of the dequantized operands
    ours, rowwise = variants["ours"](), variants["cublas_rowwise"]()
    row["check"] = {"ours_vs_fp32": _rel(ours, ref), "cublas_rowwise_vs_fp32": _rel(rowwise, ref),
                    "ours_vs_cublas_rowwise": _rel(ours, rowwise), "finite": bool(torch.isfinite(ours).all())}
    del ref, ours, rowwise

    graphs, errors = {}, {}
    for vname, fn in variants.items():
        try:
            graphs[vname] = _graph(fn, calls)
        except Exception as exc:  # noqa: BLE001 - a library kernel missing here is reported, not fatal
            errors[vname] = f"{type(exc).__name__}: {str(exc)[:200]}"
    times = {v: [] for v in graphs}
    with ClockSampler() as clocks:
        for _ in range(rounds):
            for vname, g in graphs.items():
                times[vname].append(_replay_ms(g, calls))
    flop = 2.0 * m * k * n
    for vname, ts in times.items():
        ms = statistics.median(ts)
        row["ms"][vname] = ms
        row["tflops"][vname] = flop / (ms * 1e-3) / 1e12
    row["ms_rounds"] = times
    row["errors"] = errors
    row["clocks"] = clocks.summary()
    print(f"{name:<30} {m}x{k}->{n}  " + "  ".join(f"{v} {row['ms'][v]:.3f} ms ({row['tflops'][v]:.0f} TF/s)"
                                                  for v in row["ms"])
          + f"  | ours vs rowwise rel {row['check']['ours_vs_cublas_rowwise']:.2e}"
          + (f"  | SM {row['clocks']['sm_mhz_median']:.0f} MHz {row['clocks']['power_w_median']:.0f} W"
             if row["clocks"] else ""), flush=True)
    del graphs
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default="13b,14b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10, help="GEMMs per CUDA-graph replay")
    args = ap.parse_args(argv)
    groups = args.shapes.split(",")
    bad = [g for g in groups if g not in SHAPES]
    if bad:
        raise SystemExit(f"--shapes: unknown {bad}; choose from {', '.join(SHAPES)}")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "command": "python3 benchmarks/probe_gemm_ceiling.py " + " ".join(argv if argv is not None else
                                                                             sys.argv[1:]),
           "rounds": args.rounds, "calls": args.calls, "rows": []}
    for grp in groups:
        for name, m, k, n, per_fwd in SHAPES[grp]:
            res["rows"].append(probe_shape(name, m, k, n, per_fwd, args.rounds, args.calls))
        # per forward: the GEMM time each variant would give the whole forward (same shapes and counts)
        rows = [r for r in res["rows"] if r["name"].startswith("1.3B" if grp == "13b" else "14B")]
        tot = {v: sum(r["ms"].get(v, float("nan")) * r["per_forward"] for r in rows) for v in rows[0]["ms"]}
        res.setdefault("per_forward_ms", {})[grp] = tot
        print(f"{grp}: GEMM ms per forward at these rates: "
              + ", ".join(f"{v} {t:.2f}" for v, t in tot.items()), flush=True)
    path = os.path.join(args.out, "probe_gemm_ceiling.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
