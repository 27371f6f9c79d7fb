"""Shared by the host-cost benchmarks: build an optimized forward, time host work behind a GPU sleep; and the
prompt padding of the e2e inputs."""

from __future__ import annotations

import json
import time

import torch

import turbocompile
from turbocompile.capture import example_inputs

SLEEP_CYCLES_PER_MS = 2.0e6  # ~2 GHz SM clock: torch.cuda._sleep cycles per ms (a floor; it only has to outlast)


def build_forward(model: str, recipe: str, prompt_tokens: int | None = None):
    """``turbocompile.optimize`` of a built-in model (random weights) with a recipe, bf16 on the GPU, and
    the example inputs of its video geometry; returns (OptimizeResult, inputs). With ``prompt_tokens`` the
    context rows from that index on are zero, as Wan pads a prompt's T5 embedding (``bench_e2e.py``'s
    ``--prompt-tokens``: what ``merge_padding_keys`` finds at run time)."""
    rec = turbocompile.recipe.load_recipe(recipe).to_dict()
    rec["model"] = {"dtype": "bfloat16", "device": "cuda"}
    res = turbocompile.optimize(model, rec)
    cfg = turbocompile.get_preset(model)
    inp = example_inputs(cfg, cfg.video_shape(), device="cuda", dtype=torch.bfloat16)
    if prompt_tokens is not None:
        pad_prompt(inp, cfg, prompt_tokens)
    return res, list(inp.values())


def pad_prompt(inp: dict, cfg, prompt_tokens: int) -> None:
    """Zero ``inp["context"]``'s rows from ``prompt_tokens`` on, as Wan pads a prompt's T5 embedding to the
    model's text_len (``--prompt-tokens`` of the benchmarks); exits with a one-line error outside 0..text_len."""
    if not 0 <= prompt_tokens <= cfg.text_len:
        raise SystemExit(f"--prompt-tokens must be in 0..{cfg.text_len} (the model's text_len), got {prompt_tokens}")
    inp["context"][:, prompt_tokens:] = 0


def wall_ms(fn, reps: int) -> float:
    """Median synchronised wall ms of ``reps`` calls of ``fn``."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def enqueue_ms(fn, sleep_ms: float):
    """(host ms of ``fn()``, valid) with ``fn`` enqueued behind ``sleep_ms`` of GPU sleep, so the host never
    waits on the GPU. ``valid`` is False when the enqueue outlasted the sleep: the host then waited, e.g.
    because CUDA's queue of pending launches filled up (a 4-step sampler launches ~3,300 kernels)."""
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


def per_call_us(fn, reps: int, sleep_ms: float = 2000.0) -> float:
    """Host µs per call of ``reps`` back-to-back calls of ``fn`` enqueued behind a GPU sleep (after one
    warm call), as :func:`enqueue_ms` times them."""
    fn()
    ms, _ = enqueue_ms(lambda: [fn() for _ in range(reps)], sleep_ms)
    return 1e3 * ms / reps


def header(**extra) -> dict:
    """Device, versions and date for a result JSON, plus ``extra``."""
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": turbocompile.api._version("triton"), "date": time.strftime("%Y-%m-%d"), **extra}


def write(out: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", path)
