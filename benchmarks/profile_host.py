"""Host (Python) cost of an optimized forward run WITHOUT a CUDA graph: where the launch time goes.

    python3 benchmarks/profile_host.py --model wan2.1-t2v-1.3b --recipe turbo-fp8 --out $OUT

Without a CUDA graph every node of the graph is dispatched from Python (torch.library op, argument
checks, Triton launch); when that takes longer than the GPU needs for the kernels, the forward is
host-bound. For one forward this reports:

* ``wall_ms``: synchronised eager forward of ``graph_module`` (median of ``--reps``); ``gpu_ms``: a
  CUDA-graph replay of the same graph (kernels only); ``host_ms``: Python time to enqueue one forward
  while a long GPU sleep keeps the queue from draining (so the host never waits on the GPU);
  ``host_valid`` says the sleep outlasted the enqueue;
* ``bound_*``: the same for ``OptimizeResult.eager_runner()`` (ops called without the dispatcher, what
  loaded artifacts run), and whether its output equals ``graph_module``'s bit for bit;
* ``per_target``: each call target's calls per forward and host µs per call (each node timed while
  enqueueing behind the sleep; turbocompile ops called as the eager runner calls them);
* ``cprofile``: the top functions of one bound forward by own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import time

import torch
import torch.fx as fx
from _host import build_forward, enqueue_ms, header, wall_ms, write  # benchmarks/ is the script's directory

from turbocompile.ops._registry import implementation


class _NodeTimer(fx.Interpreter):
    """Runs the graph node by node and adds each call's host time to ``times[target]``; turbocompile
    ops are called as the eager runner calls them (their Python bodies, no dispatcher)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.times = collections.defaultdict(float)
        self.calls = collections.Counter()

    def call_function(self, target, args, kwargs):
        return (implementation(target) or target)(*args, **kwargs)

    def run_node(self, n):
        if n.op not in ("call_function", "call_method", "call_module"):
            return super().run_node(n)
        t = time.perf_counter()
        out = super().run_node(n)
        key = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        if n.op == "call_function" and "turbocompile" in str(n.target):
            key = str(n.target)
        self.times[f"{n.op}:{key}"] += time.perf_counter() - t
        self.calls[f"{n.op}:{key}"] += 1
        return out


def _wall_and_host(fn, inp, reps):
    """(median wall ms, median host-enqueue ms behind a GPU sleep, every enqueue valid)."""
    wall = wall_ms(lambda: fn(*inp), reps)
    hosts = [enqueue_ms(lambda: fn(*inp), 4 * wall + 100) for _ in range(reps)]
    return wall, sorted(h[0] for h in hosts)[reps // 2], all(h[1] for h in hosts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--recipe", default="turbo-fp8")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    res, inp = build_forward(a.model, a.recipe)
    gm = res.graph_module
    out = header(model=a.model, recipe=a.recipe, nodes=sum(1 for n in gm.graph.nodes if n.op.startswith("call")))
    with torch.no_grad():
        for _ in range(3):  # compile + autotune
            gm(*inp)
        torch.cuda.synchronize()
        out["wall_ms"], out["host_ms"], out["host_valid"] = _wall_and_host(gm, inp, a.reps)
        bound = res.eager_runner()  # the same graph, ops called without the dispatcher
        ref = gm(*inp)
        out["bound_identical"] = bool(torch.equal(bound(*inp), ref))
        del ref
        out["bound_wall_ms"], out["bound_host_ms"], out["bound_host_valid"] = _wall_and_host(bound, inp, a.reps)
        timer = _NodeTimer(gm)
        enqueue_ms(lambda: timer.run(*inp), 8 * out["wall_ms"] + 200)  # warm the interpreter path
        timer = _NodeTimer(gm)
        out["interpreted_host_ms"], out["interpreted_valid"] = enqueue_ms(lambda: timer.run(*inp),
                                                                          8 * out["wall_ms"] + 200)
        rows = sorted(((k, timer.calls[k], v * 1e6) for k, v in timer.times.items()), key=lambda r: -r[2])
        out["per_target"] = [{"target": k, "calls": c, "total_us": round(us, 1), "us_per_call": round(us / c, 1)}
                             for k, c, us in rows]
        prof = cProfile.Profile()
        out["cprofile_host_ms"], out["cprofile_valid"] = enqueue_ms(lambda: prof.runcall(bound, *inp),
                                                                    40 * out["wall_ms"] + 1000)
        for order in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(order).print_stats(45)
            out[f"cprofile_{order}"] = s.getvalue()
        replay = res.cuda_graph(inp)
        for _ in range(2):
            replay(*inp)
        torch.cuda.synchronize()
        out["gpu_ms"] = wall_ms(lambda: replay(*inp), a.reps)
    print(f"{a.model} {a.recipe}: {out['nodes']} call nodes; eager wall {out['wall_ms']:.1f} ms, host enqueue "
          f"{out['host_ms']:.1f} ms (valid {out['host_valid']}); bound: wall {out['bound_wall_ms']:.1f} ms, host "
          f"{out['bound_host_ms']:.1f} ms (valid {out['bound_host_valid']}, identical {out['bound_identical']}); "
          f"CUDA-graph replay {out['gpu_ms']:.1f} ms; interpreted {out['interpreted_host_ms']:.1f} ms")
    for r in out["per_target"][:30]:
        print(f"  {r['total_us'] / 1e3:8.2f} ms {r['calls']:5d} x {r['us_per_call']:8.1f} us  {r['target'][:90]}")
    print(out["cprofile_tottime"][:6000])
    print(out["cprofile_cumulative"][:6000])
    write(out, os.path.join(a.out, f"profile_host_{a.model}_{a.recipe}{a.tag}.json"))


if __name__ == "__main__":
    main()
