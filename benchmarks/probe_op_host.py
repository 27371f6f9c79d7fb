"""Where does the host time of one turbocompile op call go? (eager forwards without a CUDA graph)

    python3 benchmarks/probe_op_host.py --model wan2.1-t2v-1.3b --recipe turbo-fp8 --out $OUT

Builds the optimized graph, records the arguments of the first call of every ``torch.ops.turbocompile``
target in one forward, then times each target on the host (enqueued behind a GPU sleep, so the host
never waits) in layers:

* ``op_us``: the op through the dispatcher (``torch.ops.turbocompile.X.default``), as the graph calls it;
* ``impl_us``: the op's Python implementation called directly (``ops._registry.implementation``);
* ``triton_us``: of ``impl_us``, the time inside Triton's launch entry points (``JITFunction.run``,
  autotuner included); the rest is our argument checks, allocations and torch glue.

For one persistent TMA GEMM call it also times the launch layers below the op: Triton's autotuner
(``Autotuner.run``), the JIT launch with the tuned config (``JITFunction.run``), and the compiled
kernel's launcher (``CompiledKernel.run``); then the wrapper again (host timings drift by ±20%).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.fx as fx
import triton
from _host import build_forward, enqueue_ms, header, per_call_us, write  # benchmarks/ is the script's directory
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from turbocompile.ops._registry import implementation

REPS = 200


def host_us(fn, reps: int = REPS) -> float:
    """Host µs per call of ``fn`` enqueued behind a ~2 s GPU sleep (the queue never drains)."""
    return per_call_us(fn, reps, sleep_ms=2000.0)


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the (args, kwargs) of the first call of every turbocompile op."""

    def __init__(self, gm):
        super().__init__(gm)
        self.first = {}

    def call_function(self, target, args, kwargs):
        if "turbocompile" in str(target) and str(target) not in self.first:
            self.first[str(target)] = (target, args, kwargs)
        return super().call_function(target, args, kwargs)


class _TritonTimer:
    """Accumulates wall time spent in JITFunction.run / Autotuner.run (outermost call only)."""

    def __init__(self):
        self.total = 0.0
        self.depth = 0

    def __enter__(self):
        self._jit, self._auto = JITFunction.run, Autotuner.run
        timer = self

        def wrap(orig):
            def run(*a, **k):
                timer.depth += 1
                t = time.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    timer.depth -= 1
                    if timer.depth == 0:
                        timer.total += time.perf_counter() - t
            return run

        JITFunction.run, Autotuner.run = wrap(self._jit), wrap(self._auto)
        return self

    def __exit__(self, *exc):
        JITFunction.run, Autotuner.run = self._jit, self._auto


def gemm_layers(qx, sx, qw, sw, bias) -> dict:
    """Host µs of the TMA GEMM's launch layers for one call shape."""
    from turbocompile.kernels.w8a8 import triton_gemm_tma as tg

    rec = {}
    orig = Autotuner.run

    def spy(self, *a, **k):
        rec.setdefault("call", (self, a, dict(k)))
        return orig(self, *a, **k)

    Autotuner.run = spy
    try:
        tg.w8a8_gemm_tma(qx, sx, qw, sw, bias, torch.bfloat16)
    finally:
        Autotuner.run = orig
    tuner, a, k = rec["call"]
    grid = k.pop("grid")
    k.pop("warmup", None)
    cfg = tuner.best_config
    out = {"config": str(cfg),
           "w8a8_gemm_tma_us": host_us(lambda: tg.w8a8_gemm_tma(qx, sx, qw, sw, bias, torch.bfloat16)),
           "autotuner_run_us": host_us(lambda: tuner.run(*a, grid=grid, warmup=False, **k))}
    jit = tuner.fn
    full = {**k, **cfg.all_kwargs()}
    out["jit_run_us"] = host_us(lambda: jit.run(*a, grid=grid, warmup=False, **full))
    kernel = jit.run(*a, grid=grid, warmup=False, **full)
    device = triton.runtime.driver.active.get_current_device()
    binder = jit.device_caches[device][4]
    bound, _, _ = binder(*a, **full)
    vals = list(bound.values())
    g = grid(bound)
    stream = torch.cuda.current_stream().cuda_stream

    def raw():
        kernel.run(g[0], 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *vals)

    out["compiled_run_us"] = host_us(raw)
    out["binder_us"] = host_us(lambda: binder(*a, **full))
    m, n = qx.shape[0], qw.shape[0]
    out["torch_empty_us"] = host_us(lambda: torch.empty((m, n), dtype=torch.bfloat16, device=qx.device))
    from triton.tools.tensor_descriptor import TensorDescriptor

    out["tensor_descriptor_us"] = host_us(lambda: TensorDescriptor.from_tensor(qx, [128, 128]))
    out["w8a8_gemm_tma_again_us"] = host_us(lambda: tg.w8a8_gemm_tma(qx, sx, qw, sw, bias, torch.bfloat16))
    return out


@torch.library.custom_op("tcprobe::noop", mutates_args=())
def _noop_custom(x: torch.Tensor, a: str, b: str, d: torch.dtype, backend: str) -> torch.Tensor:
    return x.new_empty(1)


_LIB = torch.library.Library("tcprobe_lib", "DEF")
_LIB.define("noop(Tensor x, str a, str b, ScalarType d, str backend) -> Tensor")
_LIB.impl("noop", lambda x, a, b, d, backend: x.new_empty(1), "CUDA")


def dispatch_overhead() -> dict:
    """Host µs of a no-op through ``torch.library.custom_op``, through a plain ``Library`` CUDA kernel,
    and called directly."""
    x = torch.empty(4, device="cuda")
    return {"custom_op_us": host_us(lambda: torch.ops.tcprobe.noop.default(x, "a", "b", torch.bfloat16, "auto")),
            "library_impl_us": host_us(lambda: torch.ops.tcprobe_lib.noop.default(x, "a", "b", torch.bfloat16,
                                                                                   "auto")),
            "direct_us": host_us(lambda: x.new_empty(1))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--recipe", default="turbo-fp8")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    res, inp = build_forward(a.model, a.recipe)
    gm = res.graph_module
    out = header(model=a.model, recipe=a.recipe, reps=REPS, ops=[])
    with torch.no_grad():
        out["dispatch"] = dispatch_overhead()
        print("dispatch:", out["dispatch"], flush=True)
        for _ in range(2):
            gm(*inp)
        rec = _Recorder(gm)
        rec.run(*inp)
        torch.cuda.synchronize()
        gemm_args = None
        for name, (target, args, kwargs) in sorted(rec.first.items()):
            body = implementation(target)
            row = {"op": name, "op_us": host_us(lambda: target(*args, **kwargs), 50)}
            if body is not None:
                row["impl_us"] = host_us(lambda: body(*args, **kwargs), 50)
                with _TritonTimer() as tt:
                    enqueue_ms(lambda: [body(*args, **kwargs) for _ in range(50)], 2000.0)
                row["triton_us"] = 1e6 * tt.total / 50
            out["ops"].append(row)
            print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            if "w8a8_linear_prequant" in name:
                gemm_args = args
        if gemm_args is not None:
            qx, sx, qw, sw, bias = gemm_args[:5]
            out["gemm_layers"] = gemm_layers(qx, sx, qw, sw, bias)
            print("gemm layers:", {k: (round(v, 1) if isinstance(v, float) else v)
                                   for k, v in out["gemm_layers"].items()}, flush=True)
    write(out, os.path.join(a.out, f"probe_op_host{a.tag}.json"))


if __name__ == "__main__":
    main()
