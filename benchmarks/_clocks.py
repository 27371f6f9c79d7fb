"""Shared by the GPU benchmarks: the SM clock and board power while a variant runs, from ``nvidia-smi``.

Under a sustained load an H100 / H200 holds its 700 W power limit by lowering the SM clock (session 34: 1.3-1.7 GHz
under FP8 GEMMs and the Wan forward, against a 1.98 GHz boost clock), so rates are read against the peak at the
clock the GPU held, not the datasheet's.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time

# dense 8-bit (FP8 / INT8) tensor-core FLOP per SM per clock on sm90: the H100 SXM's 1 979 TFLOP/s are quoted at
# 1 830 MHz over 132 SMs (1 979e12 / (132 * 1.83e9) = 8 192); bf16 is half of it
FP8_FLOP_PER_CLK_SM = 8192


class ClockSampler:
    """``nvidia-smi`` sampling the SM clock (MHz) and board power (W) every 50 ms for the whole run; each
    sample is stamped on arrival, so :meth:`window` gives the samples taken while one variant ran. Without
    ``nvidia-smi`` every window is None. ``gpu``: nvidia-smi's index of the GPU to watch."""

    def __init__(self, gpu: int = 0):
        self.gpu = gpu
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.gpu), "--query-gpu=clocks.sm,power.draw",
                 "--format=csv,noheader,nounits", "-lms", "50"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return self
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                mhz, watts = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.monotonic(), mhz, watts))

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def window(self, t0: float, t1: float) -> dict | None:
        """Median clock and power of the samples stamped in [t0, t1] (None if there are none)."""
        got = [s for s in self.samples if t0 <= s[0] <= t1]
        if not got:
            return None
        return {"sm_mhz_median": statistics.median(s[1] for s in got), "sm_mhz_min": min(s[1] for s in got),
                "sm_mhz_max": max(s[1] for s in got), "power_w_median": statistics.median(s[2] for s in got),
                "samples": len(got)}
