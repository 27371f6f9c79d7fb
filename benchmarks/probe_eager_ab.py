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
import os

import torch
from _host import build_forward, enqueue_ms, header, wall_ms, write  # benchmarks/ is the script's directory

import turbocompile


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
                row[f"{name}_wall_ms"] = wall_ms(fn, reps)
                if name != "cudagraph":
                    row[f"{name}_host_ms"], row[f"{name}_host_valid"] = enqueue_ms(fn, 3 * row[f"{name}_wall_ms"] + 200)
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
    out = header(model=a.model, rounds=a.rounds, reps=a.reps)
    res, fwd_in = build_forward(a.model, "turbo-fp8")
    out["forward"] = _ab("forward", res, fwd_in, a.rounds, a.reps)
    del res
    torch.cuda.empty_cache()
    base = turbocompile.recipe.load_recipe("turbo-fp8").to_dict()
    base["model"] = {"dtype": "bfloat16", "device": "cuda"}
    sampler = dict(base, name="turbo-fp8-rcm4",
                   passes=[*base["passes"], {"name": "bake_rcm_sampler", "options": {"steps": 4}}])
    res = turbocompile.optimize(a.model, sampler)
    gen = torch.Generator(device="cuda").manual_seed(0)
    smp_in = [torch.randn(i["shape"], generator=gen, device="cuda") for i in res.manifest["signature"]["inputs"]]
    out["sampler_4step"] = _ab("sampler", res, smp_in, a.rounds, a.reps)
    write(out, os.path.join(a.out, f"probe_eager_ab{a.tag}.json"))


if __name__ == "__main__":
    main()
