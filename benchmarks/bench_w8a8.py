"""W8A8 linear on the GPU: correctness of every variant vs the fp64 reference, then timings.

Full W8A8 linear = activation quantization + scaled GEMM + bias, vs bf16 F.linear, at Wan-14B
(M in {32760, 75600}) and Wan-1.3B (M = 32760) shapes; also torch._int_mm and row-wise
torch._scaled_mm (fp8) as library baselines. Run from the repo root:

    pip install --no-deps --no-build-isolation -e . -q; PYTHONUNBUFFERED=1 python benchmarks/bench_w8a8.py

Writes $OUT/bench_w8a8.json (when OUT is set) and prints a table last.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]


def _bootstrap_package() -> None:
    """Make ``turbocompile`` (with kernels/ -> turbocompile.kernels) importable without installing.

    pyproject maps the top-level kernels/, passes/, recipes/ into the package; when the editable
    install is missing, rebuild that mapping by hand before turbocompile/__init__ runs.
    """
    try:
        import turbocompile.kernels.w8a8  # noqa: F401

        return
    except ImportError:
        pass
    for name in [n for n in sys.modules if n == "turbocompile" or n.startswith("turbocompile.")]:
        del sys.modules[name]

    def make(name, folder):
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        return spec, mod

    top_spec, top = make("turbocompile", ROOT / "turbocompile")
    for sub in ("kernels", "passes", "recipes"):
        if (ROOT / sub / "__init__.py").exists():
            spec, mod = make(f"turbocompile.{sub}", ROOT / sub)
            setattr(top, sub, mod)
            if sub == "kernels":
                spec.loader.exec_module(mod)
    top_spec.loader.exec_module(top)


_bootstrap_package()

import turbocompile.ops.w8a8 as W  # noqa: E402
from turbocompile.kernels.w8a8 import ref  # noqa: E402
from turbocompile.kernels.w8a8.triton_gemm import tuned_block_config, w8a8_gemm_triton  # noqa: E402
from turbocompile.kernels.w8a8.triton_quant import quantize_triton  # noqa: E402

DEV = "cuda"
CONFIGS: dict[str, str] = {}  # autotuner picks of the block kernels, per shape
SHAPES_14B = [(m, k, n) for m in (32760, 75600) for (k, n) in ((5120, 5120), (5120, 13824), (13824, 5120))]
SHAPES_13B = [(32760, k, n) for (k, n) in ((1536, 1536), (1536, 8960), (8960, 1536))]

# name -> (format, act granularity, weight granularity, fused activation quantization, block variant)
# Block variants (block128 x block128 only, kernels/w8a8/triton_gemm_block.py): "v1" = round-1 generic
# kernel (vector scale per column, rescale after each waited wgmma), "scalar" = one scalar scale per
# (tile, K block), "magic" = scalar + exponent-trick int32->fp32, "skew" = scalar + skewed loop whose
# rescale of block kb-1 overlaps block kb's asynchronous wgmma (fp8). None = the default.
VARIANTS = {
    "int8_blk_v1": ("int8", "block128", "block128", False, "v1"),
    "int8_blk_scalar": ("int8", "block128", "block128", False, "scalar"),
    "int8_blk_magic": ("int8", "block128", "block128", False, "magic"),
    "int8_tok": ("int8", "per_token", "per_channel", False, None),
    "fp8_blk_v1": ("fp8", "block128", "block128", False, "v1"),
    "fp8_blk_scalar": ("fp8", "block128", "block128", False, "scalar"),
    "fp8_blk_skew": ("fp8", "block128", "block128", False, "skew"),
    "fp8_tok": ("fp8", "per_token", "per_channel", False, None),
}


def linear_fn(name, x, qw, sw, bias):
    fmt, ag, wg, fused, bv = VARIANTS[name]
    if fused:
        return lambda: w8a8_gemm_triton(x, None, qw, sw, bias, ag, wg, x.dtype, fuse_quant=True)

    def run():
        qa, sa = quantize_triton(x, fmt, ag)
        return w8a8_gemm_triton(qa, sa, qw, sw, bias, ag, wg, x.dtype, block_variant=bv)

    return run


def rel_cos(out, want):
    o, w = out.double().flatten(), want.double().flatten()
    return float((o - w).norm() / w.norm()), float(F.cosine_similarity(o, w, dim=0))


def check_correctness():
    print("== correctness (Triton vs fp64 reference) ==")
    res = []
    for m, k, n in [(1000, 1000, 1000), (4133, 1536, 1536), (300, 5120, 200)]:
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEV) * 0.02
        bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
        for name, (fmt, ag, wg, fused, bv) in VARIANTS.items():
            qw, sw = W.quantize_weight(w, fmt, wg)
            qa_t, sa_t = quantize_triton(x, fmt, ag)
            qa_r, sa_r = ref.quantize_ref(x, fmt, ag)
            n_code_diff = int((qa_t.view(torch.uint8) != qa_r.view(torch.uint8)).sum())
            n_scale_diff = int((sa_t != sa_r).sum())
            codes_equal = n_code_diff == 0 and n_scale_diff == 0
            want = ref.w8a8_gemm_ref(qa_r, sa_r, qw, sw, bias, ag, wg, torch.float64)
            y = linear_fn(name, x, qw, sw, bias)()
            torch.cuda.synchronize()
            rel, cos = rel_cos(y, want)
            y_op = W.w8a8_linear(x, qw, sw, bias, fmt, ag, wg, "triton")  # op path
            y_float = F.linear(x.double(), w.double(), bias.double())
            sq = 10 * math.log10(float(y_float.pow(2).sum() / (want - y_float).pow(2).sum()))
            ok = codes_equal and rel < 5e-3 and cos > 0.99999 and not torch.isnan(y).any()
            ok = ok and rel_cos(y_op, want)[0] < 5e-3
            print(f"  {m}x{k}x{n} {name:15s} codes_exact={codes_equal} (diff codes {n_code_diff}, "
                  f"scales {n_scale_diff}) rel={rel:.2e} cos={cos:.7f} "
                  f"sqnr_vs_float={sq:.1f}dB {'OK' if ok else 'FAIL'}")
            res.append(dict(shape=[m, k, n], variant=name, codes_exact=codes_equal, rel=rel, cos=cos,
                            sqnr_db=sq, ok=ok))
    return res


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_shape(m, k, n):
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=DEV) * 0.02).to(torch.bfloat16)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    t = {"bf16": bench(lambda: F.linear(x, w, bias))}
    for name, (fmt, ag, wg, fused, bv) in VARIANTS.items():
        qw, sw = W.quantize_weight(w, fmt, wg)
        t[name] = bench(linear_fn(name, x, qw, sw, bias))
        if not fused:
            qa, sa = quantize_triton(x, fmt, ag)
            t[name + ":gemm"] = bench(lambda: w8a8_gemm_triton(qa, sa, qw, sw, bias, ag, wg, x.dtype,
                                                               block_variant=bv))
            if ag == "block128" and wg == "block128" and bv not in (None, "v1"):
                cfg = tuned_block_config(bv)
                CONFIGS[f"{m}x{k}x{n}:{name}"] = str(cfg)
            if f"{fmt}:{ag}:quant" not in t:  # the quantizer is the same for every block variant
                t[f"{fmt}:{ag}:quant"] = bench(lambda: quantize_triton(x, fmt, ag))
        if name == "int8_tok":  # library int8 GEMM alone (no scales, no bias, int32 out)
            try:
                t["_int_mm:gemm"] = bench(lambda: torch._int_mm(qa, qw.t()))
            except Exception as e:  # noqa: BLE001
                print(f"  _int_mm failed: {type(e).__name__}: {e}")
        if name == "fp8_tok":  # cuBLAS row-wise fp8: GEMM alone, and with our per-token quantizer
            swt = sw.reshape(1, n)
            try:
                t["_scaled_mm:gemm"] = bench(
                    lambda: torch._scaled_mm(qa, qw.t(), sa, swt, bias=bias, out_dtype=torch.bfloat16))

                def scaled_full():
                    q2, s2 = quantize_triton(x, "fp8", "per_token")
                    return torch._scaled_mm(q2, qw.t(), s2, swt, bias=bias, out_dtype=torch.bfloat16)

                t["_scaled_mm+quant"] = bench(scaled_full)
            except Exception as e:  # noqa: BLE001
                print(f"  _scaled_mm failed: {type(e).__name__}: {e}")
        del qw, sw
    # the op path (torch.ops dispatch + validation) for the TD scheme, to show its overhead
    qw, sw = W.quantize_weight(w, "int8", "block128")
    t["op:int8_blk"] = bench(lambda: W.w8a8_linear(x, qw, sw, bias, "int8", "block128", "block128", "triton"))
    t["bf16_again"] = bench(lambda: F.linear(x, w, bias))  # run-to-run spread of the baseline
    del x, w
    torch.cuda.empty_cache()
    return t


def main():
    props = torch.cuda.get_device_properties(0)
    info = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"))
    print(info)
    torch.manual_seed(0)
    t0 = time.time()
    correctness = check_correctness()
    print(f"correctness done in {time.time() - t0:.0f}s")
    timings = {}
    for m, k, n in SHAPES_14B + SHAPES_13B:
        t1 = time.time()
        timings[f"{m}x{k}x{n}"] = t = time_shape(m, k, n)
        print(f"  {m}x{k}x{n}: " + " ".join(f"{key}={v:.3f}" for key, v in t.items() if v is not None)
              + f"  ({time.time() - t1:.0f}s)")
    summary = {}
    cols = ["int8_blk_v1", "int8_blk_scalar", "int8_blk_magic", "int8_tok", "fp8_blk_v1", "fp8_blk_scalar",
            "fp8_blk_skew", "fp8_tok", "_int_mm:gemm", "_scaled_mm:gemm", "_scaled_mm+quant", "op:int8_blk",
            "bf16_again"]
    for c in cols:
        sp14 = [timings[f"{m}x{k}x{n}"]["bf16"] / timings[f"{m}x{k}x{n}"][c] for m, k, n in SHAPES_14B
                if timings[f"{m}x{k}x{n}"].get(c)]
        sp13 = [timings[f"{m}x{k}x{n}"]["bf16"] / timings[f"{m}x{k}x{n}"][c] for m, k, n in SHAPES_13B
                if timings[f"{m}x{k}x{n}"].get(c)]
        if sp14:
            summary[c] = dict(geomean_14b=math.exp(sum(map(math.log, sp14)) / len(sp14)),
                              min_13b=min(sp13) if sp13 else None)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_w8a8.json"), "w") as f:
            json.dump(dict(info=info, correctness=correctness, timings_ms=timings, summary=summary,
                           configs=CONFIGS), f, indent=1)
    print("\n== times (ms, median do_bench) and speedup vs bf16 F.linear ==")
    hdr = f"{'shape MxKxN':22s} {'bf16':>7s} " + " ".join(f"{c[:14]:>14s}" for c in cols)
    print(hdr)
    for key, t in timings.items():
        row = f"{key:22s} {t['bf16']:7.3f} "
        row += " ".join(f"{t[c]:6.3f}({t['bf16'] / t[c]:4.2f}x)" if t.get(c) else f"{'-':>14s}" for c in cols)
        print(row)
    print("block-kernel autotune picks:")
    for key, cfg in CONFIGS.items():
        print(f"  {key}: {cfg}")
    split = ["int8:block128:quant", "int8_blk_v1:gemm", "int8_blk_scalar:gemm", "int8_blk_magic:gemm", "int8_tok:gemm",
             "fp8:block128:quant", "fp8_blk_v1:gemm", "fp8_blk_scalar:gemm", "fp8_blk_skew:gemm", "fp8_tok:gemm"]
    print("split (ms): " + " | ".join(split))
    for key, t in timings.items():
        print(f"  {key:22s} " + " ".join(f"{t.get(s, float('nan')):.3f}" for s in split))
    print("\n== targets: INT8 >= 1.3x (geomean 14B), FP8 >= 1.6x, no 1.3B shape < 0.9x ==")
    for c, s in summary.items():
        print(f"  {c:16s} geomean14B={s['geomean_14b']:.3f}x  min13B={s['min_13b'] or float('nan'):.3f}x")
    ok = all(r["ok"] for r in correctness)
    print("correctness:", "ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
