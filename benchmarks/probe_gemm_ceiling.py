"""Probe (GPU): how close the shipped FP8 W8A8 GEMM is to the vendor's FP8 GEMMs at the Wan forward's shapes.

Issue 8's sampling targets are missed by the stage that takes most of the forward, the W8A8 GEMMs. This probe
asks whether a faster GEMM exists on this GPU by timing, at every GEMM shape of the Wan2.1-1.3B 480p and
Wan-14B 720p forwards, in the same process and interleaved round by round:

* ``ours``: the shipped per-token x per-channel FP8 TMA kernel (``w8a8_gemm_triton``, autotuned), bf16 out + bias;
* ``cublas_rowwise``: ``torch._scaled_mm`` with the same per-row / per-column scales and bias (same math);
* ``cublas_tensorwise``: ``torch._scaled_mm`` with one scale per operand and no bias, cuBLAS's plainest FP8
  kernel (the least epilogue work an FP8 GEMM can do: the vendor's speed for the mainloop alone);
* ``bf16``: ``F.linear`` in bf16 (cuBLAS).

Each variant runs ``--calls`` back-to-back GEMMs inside one CUDA graph (host launch cost out). A round replays
each variant's graph back to back for ``--sustain-s`` seconds in turn, as a forward keeps the GPU busy; the figure
is the median replay over ``--rounds`` rounds. ``nvidia-smi`` samples the SM clock and board power every 50 ms,
and each variant gets the samples of its own windows, with the dense 8-bit tensor-core peak at that clock: under
a sustained load the GPU's power limit, not its boost clock, sets what any GEMM can reach.

Correctness: ``ours`` against ``cublas_rowwise`` (same quantized operands and scales), and both against an fp32
GEMM of the dequantized operands.

    python3 benchmarks/probe_gemm_ceiling.py --out $OUT [--shapes 13b,14b] [--rounds 3] [--sustain-s 0.5] [--calls 10]

Writes ``probe_gemm_ceiling.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton
from turbocompile.ops.w8a8 import quantize_activation, quantize_weight

from _clocks import FP8_FLOP_PER_CLK_SM, ClockSampler  # noqa: E402  (benchmarks/ is the script's directory)
from _cuda_graph import graphed  # noqa: E402

# (name, M, K, N) of every distinct GEMM in one forward; per forward count in brackets in the docstring of
# each group. 1.3B (dim 1536, ffn 8960, 30 blocks, L 32760): fused q|k|v, o / cross q / cross o, ffn.0, ffn.2.
# 14B (dim 5120, ffn 13824, 40 blocks, L 75600): q, k, v, o, cross q, cross o (5120->5120), ffn.0, ffn.2.
SHAPES = {
    "13b": [("1.3B qkv", 32760, 1536, 4608, 30), ("1.3B o/cross-q/cross-o", 32760, 1536, 1536, 90),
            ("1.3B ffn.0", 32760, 1536, 8960, 30), ("1.3B ffn.2", 32760, 8960, 1536, 30)],
    "14b": [("14B q/k/v/o/cross-q/cross-o", 75600, 5120, 5120, 240), ("14B ffn.0", 75600, 5120, 13824, 40),
            ("14B ffn.2", 75600, 13824, 5120, 40)],
}




def _graph(fn, calls: int):
    """The replay of ``calls`` back-to-back calls of ``fn`` captured in one CUDA graph (outputs not kept)."""
    def many():
        for _ in range(calls):
            fn()
    return graphed(many)


def _replay_ms(replay, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def probe_shape(name, m, k, n, per_forward, rounds, calls, sustain_s, clocks) -> dict:
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
    row = {"name": name, "m": m, "k": k, "n": n, "per_forward": per_forward, "ms": {}, "tflops": {}, "check": {},
           "clocks": {}}

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
    # each round: every variant replays its graph back to back for ``sustain_s`` (as a forward keeps the GPU
    # busy), so the clock sampled in its windows is the clock it holds under load
    times = {v: [] for v in graphs}
    windows = {v: [] for v in graphs}
    for _ in range(rounds):
        for vname, g in graphs.items():
            t0 = time.monotonic()
            _replay_ms(g, calls)  # ramp, not counted
            while True:
                times[vname].append(_replay_ms(g, calls))
                if time.monotonic() - t0 >= sustain_s:
                    break
            windows[vname].append((t0, time.monotonic()))
    flop = 2.0 * m * k * n
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for vname, ts in times.items():
        ms = statistics.median(ts)
        row["ms"][vname] = ms
        row["tflops"][vname] = flop / (ms * 1e-3) / 1e12
        got = [c for c in (clocks.window(a, b) for a, b in windows[vname]) if c]
        if got:
            mhz = statistics.median(c["sm_mhz_median"] for c in got)
            row["clocks"][vname] = {"sm_mhz": mhz, "sm_mhz_min": min(c["sm_mhz_min"] for c in got),
                                    "sm_mhz_max": max(c["sm_mhz_max"] for c in got),
                                    "power_w": statistics.median(c["power_w_median"] for c in got),
                                    "samples": sum(c["samples"] for c in got),
                                    # dense 8-bit tensor-core peak at that clock (bf16: half of it)
                                    "peak_tflops_at_clock": FP8_FLOP_PER_CLK_SM * sms * mhz * 1e6 / 1e12}
    row["replays"] = {v: len(ts) for v, ts in times.items()}
    row["errors"] = errors

    def _clk(v):
        c = row["clocks"].get(v)
        if not c:
            return ""
        eff = row["tflops"][v] / (c["peak_tflops_at_clock"] / (2 if v == "bf16" else 1))
        return f" @{c['sm_mhz']:.0f} MHz {c['power_w']:.0f} W = {100 * eff:.0f}% of peak"
    print(f"{name:<30} {m}x{k}->{n}  ours vs rowwise rel {row['check']['ours_vs_cublas_rowwise']:.2e}", flush=True)
    for v in row["ms"]:
        print(f"    {v:<18} {row['ms'][v]:.3f} ms  {row['tflops'][v]:6.0f} TF/s{_clk(v)}", flush=True)
    del graphs
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default="13b,14b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10, help="GEMMs per CUDA-graph replay")
    ap.add_argument("--sustain-s", type=float, default=0.5,
                    help="seconds each variant replays back to back per round (clock sampled meanwhile)")
    args = ap.parse_args(argv)
    groups = args.shapes.split(",")
    bad = [g for g in groups if g not in SHAPES]
    if bad:
        raise SystemExit(f"--shapes: unknown {bad}; choose from {', '.join(SHAPES)}")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "command": "python3 benchmarks/probe_gemm_ceiling.py " + " ".join(argv if argv is not None else
                                                                             sys.argv[1:]),
           "rounds": args.rounds, "calls": args.calls, "sustain_s": args.sustain_s,
           "fp8_flop_per_clk_sm": FP8_FLOP_PER_CLK_SM, "rows": []}
    with ClockSampler() as clocks:
        _run_groups(groups, args, clocks, res)
    path = os.path.join(args.out, "probe_gemm_ceiling.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")


def _run_groups(groups, args, clocks, res):
    for grp in groups:
        for name, m, k, n, per_fwd in SHAPES[grp]:
            res["rows"].append(probe_shape(name, m, k, n, per_fwd, args.rounds, args.calls, args.sustain_s, clocks))
        # per forward: the GEMM time each variant would give the whole forward (same shapes and counts)
        rows = [r for r in res["rows"] if r["name"].startswith("1.3B" if grp == "13b" else "14B")]
        tot = {v: sum(r["ms"].get(v, float("nan")) * r["per_forward"] for r in rows) for v in rows[0]["ms"]}
        res.setdefault("per_forward_ms", {})[grp] = tot
        print(f"{grp}: GEMM ms per forward at these rates: "
              + ", ".join(f"{v} {t:.2f}" for v, t in tot.items()), flush=True)


if __name__ == "__main__":
    main()
