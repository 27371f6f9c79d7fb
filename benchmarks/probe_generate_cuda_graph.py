"""`turbocompile run`'s sampling with and without ``--cuda-graph`` at a real Wan geometry (session 33).

Builds a baked 4-step rCM sampler artifact of a built-in model (random weights) with `turbo-fp8`'s passes,
writes it, then for each way of running it (eager: ``load(art)``; graph: ``load(art, cuda_graph=True)``)
times the load and ``generate`` calls (synchronised wall time, the call that `turbocompile run` makes after
reading its inputs), with a ``--prompt-tokens`` prompt zero-padded as Wan pads it. Both modules run in one
process, so they share the autotuner's picks and must give the same latents.

    python3 benchmarks/probe_generate_cuda_graph.py --model wan2.1-t2v-1.3b --out $OUT
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time

import torch
from _host import header  # benchmarks/ is the script's directory

import turbocompile
from turbocompile.recipe import load_recipe
from turbocompile.sampling.compiled import generate


def _timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - t) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    rec = load_recipe("turbo-fp8").to_dict()
    rec["passes"] = [*rec["passes"], {"name": "bake_rcm_sampler", "options": {"steps": 4}}]
    rec["model"] = {"dtype": "bfloat16", "device": "cuda"}
    res = header(model=a.model, recipe="turbo-fp8 + bake_rcm_sampler(steps=4)", prompt_tokens=a.prompt_tokens,
                 reps=a.reps, runs={})
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        built = turbocompile.optimize(a.model, rec, os.path.join(tmp, "art"), seed=0)
        res["optimize_s"] = round(time.perf_counter() - t, 2)
        art = built.artifact
        del built
        torch.cuda.empty_cache()
        cfg = turbocompile.get_preset(a.model)
        ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(0))
        ctx[:, a.prompt_tokens:] = 0
        cond = {"context": ctx}
        lat = {}
        for mode in ("eager", "graph"):
            t = time.perf_counter()
            module = turbocompile.load(art, device="cuda", cuda_graph=mode == "graph")
            load_s = time.perf_counter() - t
            sample = functools.partial(generate, module, cond, seed=1)
            first, first_ms = _timed(lambda: sample().latents)
            times = [_timed(lambda: sample().latents)[1] for _ in range(a.reps)]
            lat[mode] = first
            res["runs"][mode] = {"load_s": round(load_s, 2), "first_call_ms": first_ms, "ms": sorted(times),
                                 "median_ms": sorted(times)[len(times) // 2],
                                 "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            print(mode, res["runs"][mode], flush=True)
            module = sample = None  # free the weights (and the graph pool) before the next mode
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    res["latents_equal"] = torch.equal(lat["eager"], lat["graph"])
    res["graph_speedup"] = res["runs"]["eager"]["median_ms"] / res["runs"]["graph"]["median_ms"]
    print({k: res[k] for k in ("optimize_s", "latents_equal", "graph_speedup")}, flush=True)
    with open(os.path.join(a.out, "probe_generate_cuda_graph.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
