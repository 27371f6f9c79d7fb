"""Optimize time and artifact size (issue 8 (e)): ``turbocompile.optimize`` of a Wan model with a recipe,
written as a deployable artifact, then loaded back; random weights at the real config (weights do not
change these figures; the built-in model is initialized on the device).

    python benchmarks/bench_optimize.py --model wan2.1-t2v-14b --recipe turbo-fp8 --out $OUT

Reports the wall time of optimize (capture, every pass with its own time, the artifact write), the time
to load the artifact, the artifact's size on disk against the bf16 weights it replaces, and peak GPU
and host memory. Writes ``optimize_<model>_<recipe>.json`` and a PNG chart to --out; the artifact itself
goes to a temporary directory (--keep to leave it) and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import turbocompile
from turbocompile.model.config import get_preset


def _dir_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan2.1-t2v-14b")
    ap.add_argument("--recipe", default="turbo-fp8")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--workdir", default=None, help="where the artifact is written (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the artifact")
    args = ap.parse_args(argv)
    cfg = get_preset(args.model)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tc_optimize_"))
    art = work / f"{cfg.name}_{args.recipe}"
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    recipe = turbocompile.recipe.load_recipe(args.recipe).to_dict()
    recipe["model"] = {"dtype": "bfloat16", "device": args.device}
    t0 = time.perf_counter()
    res = turbocompile.optimize(args.model, recipe, out=art, overwrite=True)
    if args.device == "cuda":
        torch.cuda.synchronize()
    optimize_s = time.perf_counter() - t0
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    passes = {r["name"]: r.get("seconds") for r in res.manifest["passes"]}
    size, n_files = _dir_bytes(art)
    with torch.device("meta"):  # parameter count without allocating the weights
        n_params = sum(p.numel() for p in turbocompile.model.wan.WanModel(cfg).parameters())
    del res
    if args.device == "cuda":
        torch.cuda.empty_cache()
    t1 = time.perf_counter()
    model = turbocompile.load(art, device=args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t1
    del model
    host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    out = {"model": cfg.name, "recipe": args.recipe, "weights": "random (built-in, initialized on the device)",
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
           "triton": turbocompile.api._version("triton"), "optimize_s": round(optimize_s, 2),
           "pass_s": passes, "load_s": round(load_s, 2), "artifact_gib": size / 2**30, "artifact_files": n_files,
           "bf16_weights_gib": 2 * n_params / 2**30, "params": n_params, "gpu_peak_gib": gpu_peak,
           "host_peak_rss_gib": host_peak, "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "command": "python3 benchmarks/bench_optimize.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(out, indent=2))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"optimize_{cfg.name}_{args.recipe}")
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=2)
    import charts  # benchmarks/ is the script's directory

    charts.save(out, stem + ".png")
    if not args.keep:
        shutil.rmtree(art, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
