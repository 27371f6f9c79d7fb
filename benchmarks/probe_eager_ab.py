"""Eager runs through the dispatcher vs through the bound code (turbocompile.eager), interleaved.

    python3 benchmarks/probe_eager_ab.py --model wan2.1-t2v-1.3b --out $OUT

For the ``turbo-fp8`` forward and the 4-step baked sampler built from it, alternates rounds of
``graph_module(...)`` (op calls through the dispatcher), ``eager_runner()(...)`` (ops called directly)
and the CUDA-graph replay, so drift of the host's speed during the run hits every path alike. Per
round and path: median synchronised wall ms of ``--reps`` calls and the host ms to enqueue one call
behind a GPU sleep, with ``*_host_valid`` saying the sleep outlasted the enqueue (the host never
waited on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import turbocompile
from turbocompile.capture import example_inputs

SLEEP_CYCLES_PER_MS = 2.0e6  # ~2 GHz SM clock (a floor: the sleep only needs to outlast the enqueue)


def _wall_ms(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def _host_ms(fn, sleep_ms):
    """(host ms to enqueue fn() behind a GPU sleep, whether the sleep outlasted it). False means the host
    waited for the GPU: CUDA's queue of pending launches filled up (a 4-step sampler launches ~3,300
    kernels), so the figure is not host time."""
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    torch.cuda._sleep(int(sleep_ms * SLEEP_CYCLES_PER_MS))
    e1.record()
    t = time.perf_counter()
    fn()
    dt = (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    return dt, dt < e0.elapsed_time(e1)


def _ab(label, res, inputs, rounds, reps) -> dict:
    paths = {"dispatch": lambda: res.graph_module(*inputs), "bound": lambda: res.eager_runner()(*inputs)}
    graph = res.cuda_graph(inputs)
    paths["cudagraph"] = lambda: graph(*inputs)
    with torch.no_grad():
        ref = paths["dispatch"]()
        same = bool(torch.equal(paths["bound"](), ref))
        for fn in paths.values():
            fn()
        out = {"identical": same, "rounds": []}
        for r in range(rounds):
            row = {}
            for name, fn in paths.items():
                row[f"{name}_wall_ms"] = _wall_ms(fn, reps)
                if name != "cudagraph":
                    row[f"{name}_host_ms"], row[f"{name}_host_valid"] = _host_ms(fn, 3 * row[f"{name}_wall_ms"] + 200)
            out["rounds"].append(row)
            print(label, r, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    for key in out["rounds"][0]:
        if key.endswith("_valid"):
            out[f"all_{key}"] = all(rw[key] for rw in out["rounds"])
            continue
        vals = sorted(rw[key] for rw in out["rounds"])
        out[f"median_{key}"] = vals[len(vals) // 2]
    del graph
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    cfg = turbocompile.get_preset(a.model)
    fwd_in = list(example_inputs(cfg, cfg.video_shape(), device="cuda", dtype=torch.bfloat16).values())
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": turbocompile.api._version("triton"), "model": a.model, "date": time.strftime("%Y-%m-%d"),
           "rounds": a.rounds, "reps": a.reps}
    base = turbocompile.recipe.load_recipe("turbo-fp8").to_dict()
    base["model"] = {"dtype": "bfloat16", "device": "cuda"}
    res = turbocompile.optimize(a.model, base)
    out["forward"] = _ab("forward", res, fwd_in, a.rounds, a.reps)
    del res
    torch.cuda.empty_cache()
    sampler = dict(base, name="turbo-fp8-rcm4",
                   passes=[*base["passes"], {"name": "bake_rcm_sampler", "options": {"steps": 4}}])
    res = turbocompile.optimize(a.model, sampler)
    gen = torch.Generator(device="cuda").manual_seed(0)
    smp_in = [torch.randn(i["shape"], generator=gen, device="cuda") for i in res.manifest["signature"]["inputs"]]
    out["sampler_4step"] = _ab("sampler", res, smp_in, a.rounds, a.reps)
    path = os.path.join(a.out, f"probe_eager_ab{a.tag}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
