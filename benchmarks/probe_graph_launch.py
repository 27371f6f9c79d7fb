"""Probe (GPU): host cost of launching one CUDA graph of many kernels vs the same work as segments.

A graph of N small kernels is captured whole, and as S segment graphs of N/S kernels each (one
memory pool). For each: host time of the replay call(s), and event time from before the launch to
after the last kernel (what a caller of one forward waits), next to the GPU time of the kernels.

    python benchmarks/probe_graph_launch.py --out $OUT [--model wan2.1-t2v-1.3b]

With --model, also the real thing: the turbo-fp8 forward (random weights) captured by
``OptimizeResult.cuda_graph``: host time of one call, event time of one call (as bench_e2e times it)
and per call over back-to-back calls.
"""
import argparse
import json
import os
import time

import torch


def build(n_kernels, segments, x):
    per = n_kernels // segments
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for _ in range(segments):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            for _ in range(per):
                x.add_(1e-7)
        graphs.append(g)
    return graphs


def measure(graphs, reps=20):
    host, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        t0 = time.perf_counter()
        for g in graphs:
            g.replay()
        host.append((time.perf_counter() - t0) * 1e3)
        e1.record()
        torch.cuda.synchronize()
        wall.append(e0.elapsed_time(e1))
    # back to back: 5 launches between two events (launch overlapped with the previous graph's work)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(5):
        for g in graphs:
            g.replay()
    e1.record()
    torch.cuda.synchronize()
    host.sort(); wall.sort()
    return {"host_ms": host[len(host) // 2], "event_ms": wall[len(wall) // 2], "back_to_back_ms": e0.elapsed_time(e1) / 5}


def model_graph(model: str) -> dict:
    import turbocompile
    from turbocompile.capture import example_inputs
    from turbocompile.model.config import get_preset

    cfg = get_preset(model)
    shape = cfg.video_shape()
    res = turbocompile.optimize(model, "turbo-fp8", dtype="bfloat16", device="cuda", seed=0)
    inputs = list(example_inputs(cfg, shape, seed=0, device="cuda", dtype=torch.bfloat16).values())
    runner = res.cuda_graph(inputs)
    with torch.no_grad():
        for _ in range(3):
            runner(*inputs)
        host, one = [], []
        for _ in range(7):
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            t0 = time.perf_counter()
            runner(*inputs)
            host.append((time.perf_counter() - t0) * 1e3)
            e1.record()
            torch.cuda.synchronize()
            one.append(e0.elapsed_time(e1))
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(5):
            runner(*inputs)
        e1.record()
        torch.cuda.synchronize()
    host.sort(); one.sort()
    return {"model": model, "host_ms": host[3], "event_ms_one_call": one[3], "back_to_back_ms": e0.elapsed_time(e1) / 5}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for numel in (1 << 16, 1 << 22):  # tiny kernels (launch-bound) and ~4 us kernels
        x = torch.zeros(numel, device="cuda")
        for n in (100, 1000):
            for seg in (1, 10, 30):
                if seg > n // 10:
                    continue
                graphs = build(n, seg, x)
                for g in graphs:  # first launch uploads
                    g.replay()
                torch.cuda.synchronize()
                row = {"numel": numel, "kernels": n, "segments": seg, **measure(graphs)}
                print(json.dumps(row))
                res["rows"].append(row)
                del graphs
    if args.model:
        res["model"] = model_graph(args.model)
        print(json.dumps(res["model"]))
    with open(os.path.join(args.out, "probe_graph_launch.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
