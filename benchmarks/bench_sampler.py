"""Baked rCM sampler vs the naive Python rCM loop over the same optimized denoiser.

Default: Wan2.1-T2V-1.3B (random weights, initialised on the GPU), 480p 81 frames, bf16,
4 SDE steps, same step noise for both. Variants: recipe ``baseline`` (+ bake) and, if its
kernels run, ``turbo-int8`` (+ bake); plus the 1-frame geometry where the hoisted work is a
larger share. For each: GPU correctness (baked vs loop: rel err / max abs), then timing with
CUDA events, warm-up then interleaved repetitions, median: plain eager calls, or with
``--cuda-graph`` each callable's replay of one captured call (host launch time left out, as the
e2e benchmark times the sampler). JSON to $OUT/bench_sampler.json (and a PNG).

    PYTHONUNBUFFERED=1 python benchmarks/bench_sampler.py            # GPU defaults
    python benchmarks/bench_sampler.py --recipes baseline,turbo-fp8 --cuda-graph --reps 5
    python benchmarks/bench_sampler.py --model wan-tiny --frames 9 --size 128x128 --device cpu --reps 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def build_model(name: str, device: str, dtype: torch.dtype, seed: int = 0):
    """Random-weight WanModel built on the meta device and initialised on ``device``."""
    from turbocompile.model.config import get_preset
    from turbocompile.model.wan import WanModel

    cfg = get_preset(name)
    with torch.device("meta"):
        m = WanModel(cfg)
    m = m.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            v = torch.randn(p.shape, generator=gen, device=device)
            if pname.endswith(".weight") and p.ndim == 2:
                v /= math.sqrt(p.shape[1])
            elif "norm" in pname and pname.endswith("weight"):
                v = 1.0 + 0.1 * v
            else:
                v *= 0.1
            p.copy_(v)
    m = m.to(dtype)
    m.init_non_persistent_buffers()
    return m.eval()


def bake_direct(den, options: dict):
    """Apply bake_rcm_sampler to a structural copy of an optimized denoiser (no re-capture)."""
    from turbocompile.model.config import WanConfig
    from turbocompile.passbase import PassContext
    from turbocompile.passes.bake_rcm_sampler import BakeRCMSampler
    from turbocompile.pipeline import clone_graph_module

    gm = clone_graph_module(den.graph_module)
    man = den.manifest
    cfg = WanConfig.from_dict(man["model"]["config"])
    vs = man["model"]["video_shape"]
    specs = {i["name"]: (tuple(i["shape"]), getattr(torch, i["dtype"])) for i in man["signature"]["inputs"]}
    dev = next(iter(gm.parameters()), None)
    dev = dev.device if dev is not None else next(iter(gm.buffers())).device
    ctx = PassContext(model_config=cfg, video_shape=cfg.video_shape(frames=vs["frames"], size=(vs["width"], vs["height"])),
                      dtype=getattr(torch, man["signature"]["activation_dtype"]), device=dev, input_specs=specs)
    res = BakeRCMSampler(BakeRCMSampler.Options(**options)).run(gm, ctx)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, res.stats


def time_pair(fa, fb, reps: int, device: str):
    """Interleaved timing of two callables (ms per call, median), one warm-up each."""
    def once(f):
        if device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            f()
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e)
        t = time.perf_counter()
        f()
        return 1e3 * (time.perf_counter() - t)

    once(fa)
    once(fb)
    ta, tb = [], []
    for _ in range(reps):
        ta.append(once(fa))
        tb.append(once(fb))
    return statistics.median(ta), statistics.median(tb), ta, tb


def kernel_times(fn) -> tuple[dict, dict]:
    """Over one call of ``fn`` (torch.profiler): ``{kernel name: (GPU ms, launches)}`` and the kernel
    timeline (span, busy and idle time, largest gaps: ``profile_forward._gaps``)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            ms, n = out.get(ev.key[:90], (0.0, 0))
            out[ev.key[:90]] = (ms + ev.device_time_total / 1e3, n + ev.count)
    from profile_forward import _gaps  # benchmarks/ is the script's directory

    return out, _gaps(prof)


def kernel_diff(loop, baked, top: int = 12) -> dict:
    """Per-kernel GPU time of one loop call and one baked call, and the kernels that differ most."""
    (a, gaps_a), (b, gaps_b) = kernel_times(loop), kernel_times(baked)
    for name, g in (("loop", gaps_a), ("baked", gaps_b)):
        log(f"{name} timeline: " + json.dumps({k: v for k, v in g.items() if k != "largest"}))
        for gap in g["largest"][:8]:
            log(f"  gap {gap[0]:8.1f} us after {gap[1]} before {gap[2]}")
    rows = sorted(((b.get(k, (0.0, 0))[0] - a.get(k, (0.0, 0))[0], k) for k in set(a) | set(b)),
                  key=lambda t: -abs(t[0]))
    diff = [{"kernel": k, "loop_ms": a.get(k, (0.0, 0))[0], "loop_calls": a.get(k, (0.0, 0))[1],
             "baked_ms": b.get(k, (0.0, 0))[0], "baked_calls": b.get(k, (0.0, 0))[1], "delta_ms": d}
            for d, k in rows[:top]]
    tot_a, tot_b = sum(v[0] for v in a.values()), sum(v[0] for v in b.values())
    log(f"kernels: loop {tot_a:.2f} ms, baked {tot_b:.2f} ms; largest differences (baked - loop):")
    for r in diff:
        log(f"  {r['delta_ms']:+8.3f} ms  loop {r['loop_ms']:8.3f} ({r['loop_calls']}x)  baked {r['baked_ms']:8.3f} "
            f"({r['baked_calls']}x)  {r['kernel']}")
    return {"loop_kernel_ms": tot_a, "baked_kernel_ms": tot_b, "largest_differences": diff,
            "loop_timeline": gaps_a, "baked_timeline": gaps_b}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--recipes", default="baseline,turbo-int8")
    ap.add_argument("--extra-frames", type=int, default=1, help="second geometry (0: none)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip further variants past this")
    ap.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays of both (GPU only)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one call of each (GPU kernels by name) and report where they differ")
    args = ap.parse_args()

    import triton  # noqa: F401  (version only)

    import turbocompile
    from turbocompile.recipe import load_recipe
    from turbocompile.sampling import rcm_sample

    dev = args.device
    dt = getattr(torch, args.dtype)
    info = {"torch": torch.__version__, "triton": getattr(__import__("triton"), "__version__", None),
            "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "model": args.model,
            "dtype": args.dtype, "steps": 4, "mode": "sde", "cuda_graph": bool(args.cuda_graph),
            "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/bench_sampler.py " + " ".join(sys.argv[1:])}
    if args.cuda_graph and dev != "cuda":
        ap.error(f"--cuda-graph needs --device cuda, got '{dev}'")
    log(f"env {info}")
    model = build_model(args.model, dev, dt)
    log(f"model built on {dev}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")

    cases = [(r, args.frames) for r in args.recipes.split(",")]
    if args.extra_frames:
        cases.append(("baseline", args.extra_frames))
    results = []
    for idx, (recipe, frames) in enumerate(cases):
        if time.perf_counter() - T0 > args.budget_s:
            log(f"skip {recipe}/{frames}f: past the time budget")
            continue
        try:
            rec = load_recipe(recipe).to_dict()
            rec["model"] = {"frames": frames, "size": args.size}
            t = time.perf_counter()
            den = turbocompile.optimize(model, rec, dtype=args.dtype, device=dev)
            t_den = time.perf_counter() - t
            t = time.perf_counter()
            if idx == 0:   # the full pipeline path once (capture + passes + bake + shape propagation)
                rec_b = dict(rec, passes=rec["passes"] + [{"name": "bake_rcm_sampler", "options": {"steps": 4}}])
                smp_res = turbocompile.optimize(model, rec_b, dtype=args.dtype, device=dev)
                gm, stats = smp_res.graph_module, smp_res.records[-1].stats
            else:
                gm, stats = bake_direct(den, {"steps": 4})
            t_bake = time.perf_counter() - t
            log(f"{recipe}/{frames}f: denoiser optimize {t_den:.1f}s, sampler build {t_bake:.1f}s; stats "
                + ", ".join(f"{k}={stats[k]}" for k in ("unrolled_nodes", "final_nodes", "folded_constants",
                                                        "cse_removed", "cross_kv_before", "cross_kv_after",
                                                        "text_embedding_after", "time_embedding_evals_left")))
            shape = den.manifest["signature"]["inputs"][0]["shape"]
            cfg = den.manifest["model"]["config"]
            g = torch.Generator(device=dev).manual_seed(0)
            noise = torch.randn(shape, generator=g, device=dev)
            ctx = torch.randn(1, cfg["text_len"], cfg["text_dim"], generator=g, device=dev).to(dt)
            eps = [torch.randn(shape, generator=g, device=dev) for _ in range(4)]

            def baked():
                with torch.no_grad():
                    return gm(noise, ctx, *eps)

            def loop():
                return rcm_sample(den.graph_module, noise, ctx, steps=4, step_noise=eps, net_dtype=dt)

            a, b = baked(), loop()
            rel = ((a - b).double().norm() / b.double().norm()).item()
            mx = (a - b).abs().max().item()
            log(f"{recipe}/{frames}f: baked vs loop rel_err={rel:.3e} max_abs={mx:.3e} finite={bool(a.isfinite().all())}")
            if args.cuda_graph:  # captured after the comparison above ran both once (compiled, autotuned)
                from _cuda_graph import graphed

                loop, baked = graphed(loop), graphed(baked)
            ms_loop, ms_baked, all_loop, all_baked = time_pair(loop, baked, args.reps, dev)
            gain = ms_loop - ms_baked
            prof = kernel_diff(loop, baked) if args.profile and dev == "cuda" else None
            log(f"{recipe}/{frames}f: loop {ms_loop:.2f} ms, baked {ms_baked:.2f} ms, gain {gain:.2f} ms "
                f"({100 * gain / ms_loop:.2f}%); loop reps {[round(x, 1) for x in all_loop]}, "
                f"baked reps {[round(x, 1) for x in all_baked]}")
            results.append({"recipe": recipe, "frames": frames, "size": args.size, "tokens": int(math.prod(
                den.manifest["model"]["video_shape"]["grid"])), "loop_ms": ms_loop, "baked_ms": ms_baked,
                "gain_ms": gain, "gain_pct": 100 * gain / ms_loop, "loop_reps": all_loop, "baked_reps": all_baked,
                "rel_err": rel, "max_abs": mx, "optimize_s": t_den, "bake_s": t_bake,
                "stats": {k: v for k, v in stats.items() if not isinstance(v, list)},
                **({"profile": prof} if prof else {})})
            del den, gm
            if dev == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - report and go on with the next variant
            log(f"{recipe}/{frames}f FAILED: {type(exc).__name__}: {exc}")
            results.append({"recipe": recipe, "frames": frames, "error": f"{type(exc).__name__}: {exc}"})

    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_sampler.json"), "w") as f:
            json.dump({"info": info, "results": results}, f, indent=2)
        import charts  # benchmarks/ is the script's directory

        charts.save({"info": info, "results": results}, os.path.join(out, "bench_sampler.png"))
    print("\n| recipe | frames | tokens | naive loop ms | baked ms | gain ms | gain % | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['recipe']} | {r['frames']} | - | error: {r['error'][:60]} | | | | |")
        else:
            print(f"| {r['recipe']} | {r['frames']} | {r['tokens']} | {r['loop_ms']:.2f} | {r['baked_ms']:.2f} | "
                  f"{r['gain_ms']:.2f} | {r['gain_pct']:.2f} | {r['rel_err']:.2e} |")


if __name__ == "__main__":
    main()
