"""Host cost of the per-op device guard (`turbocompile.device_scope.on_tensor_device`).

Every ``torch.ops.turbocompile`` body runs inside this guard. The probe times a do-nothing body called
raw and guarded, with its tensor on the CPU, on the current GPU and on another GPU (that last case
switches devices on every call; `run_graph` and CUDA graphs avoid it by making the device current
once per call). Prints µs per call; with ``--out``, writes ``device_guard.json`` there.

    python3 benchmarks/probe_device_guard.py [--calls 200000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from turbocompile.device_scope import on_tensor_device


def per_call_us(fn, args, calls: int) -> float:
    for _ in range(1000):
        fn(*args)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    def body(x, eps):
        return None

    guarded = on_tensor_device(body)
    devices = ["cpu"] + [f"cuda:{i}" for i in range(min(torch.cuda.device_count(), 2))]
    rows = []
    for dev in devices:
        x = torch.empty(1, device=dev)
        raw = per_call_us(body, (x, 1e-6), a.calls)
        grd = per_call_us(guarded, (x, 1e-6), a.calls)
        rows.append({"tensor_device": dev, "current_device": torch.cuda.current_device() if torch.cuda.is_available()
                     else None, "raw_us": round(raw, 4), "guarded_us": round(grd, 4),
                     "overhead_us": round(grd - raw, 4)})
        print(f"{dev:>7}: raw {raw:.3f} us, guarded {grd:.3f} us, overhead {grd - raw:.3f} us per call")
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "device_guard.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
