"""W8A8 linear on the GPU: correctness of every variant vs the fp64 reference, then timings.

Full W8A8 linear = activation quantization + scaled GEMM + bias, vs bf16 F.linear, at Wan-14B
(M in {32760, 75600}) and Wan-1.3B (M = 32760) shapes; also torch._int_mm and row-wise
torch._scaled_mm (fp8) as library baselines. Run from the repo root:

    pip install --no-deps --no-build-isolation -e . -q; PYTHONUNBUFFERED=1 python benchmarks/bench_w8a8.py

Writes $OUT/bench_w8a8.json (when OUT is set) and prints a table last.

``*_tok`` = per-token x per-channel with the pointer kernel (``use_tma=False``), ``*_tok_tma`` = the
same GEMM through the persistent TMA kernel (kernels/w8a8/triton_gemm_tma.py, ``use_tma=True``).

BENCH_W8A8_QUICK=1: only the 6 Wan-14B + 3 Wan-1.3B shapes for bf16, int8_tok, int8_tok_tma,
fp8_tok, fp8_tok_tma (full linear and GEMM only) and `_scaled_mm` GEMM only; no block128 variants.
Every variant runs in try/except: a failure is printed and the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

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
from turbocompile.kernels.w8a8 import triton_gemm_tma as TMA  # noqa: E402
from turbocompile.kernels.w8a8.triton_gemm import gemm_path, tuned_block_config, w8a8_gemm_triton  # noqa: E402
from turbocompile.kernels.w8a8.triton_quant import quantize_triton  # noqa: E402

DEV = "cuda"
QUICK = os.environ.get("BENCH_W8A8_QUICK", "0") not in ("", "0")
CONFIGS: dict[str, str] = {}  # autotuner picks of the block / TMA kernels, per shape
ERRORS: list[str] = []
SHAPES_14B = [(m, k, n) for m in (32760, 75600) for (k, n) in ((5120, 5120), (5120, 13824), (13824, 5120))]
SHAPES_13B = [(32760, k, n) for (k, n) in ((1536, 1536), (1536, 8960), (8960, 1536))]
# correctness shapes: all variants / the TMA path first (its shape rule holds: K % 16 == 0, N % 8 == 0)
CHECK_SHAPES = [(1000, 1000, 1000), (4133, 1536, 1536), (300, 5120, 200)]
# Shape i is checked with the TMA kernel's i-th autotune config (fixed, no autotuning: every config
# compiles and is verified once, a few with several tiles per persistent program).
TMA_CHECK_SHAPES = [(4133, 1536, 1536), (1000, 1024, 1000), (2125, 1024, 2048), (300, 5120, 200), (77, 208, 264),
                    (1, 5120, 13824), (520, 1536, 8960)]
# fixed pointer-kernel config for the TMA check (no autotuning there: keeps the quick run short)
PTR_CHECK_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
BIG_CHECKS: list[dict] = []  # TMA vs pointer kernel at the timed shapes (autotuned configs)

# name -> (format, act granularity, weight granularity, fused activation quantization, block variant,
#          use_tma)
# Block variants (block128 x block128 only, kernels/w8a8/triton_gemm_block.py): "v1" = round-1 generic
# kernel (vector scale per column, rescale after each waited wgmma), "scalar" = one scalar scale per
# (tile, K block), "magic" = scalar + exponent-trick int32->fp32, "skew" = scalar + skewed loop whose
# rescale of block kb-1 overlaps block kb's asynchronous wgmma (fp8). None = the default.
VARIANTS = {
    "int8_tok_tma": ("int8", "per_token", "per_channel", False, None, True),
    "fp8_tok_tma": ("fp8", "per_token", "per_channel", False, None, True),
    "int8_tok": ("int8", "per_token", "per_channel", False, None, False),
    "fp8_tok": ("fp8", "per_token", "per_channel", False, None, False),
    "int8_blk_v1": ("int8", "block128", "block128", False, "v1", None),
    "int8_blk_scalar": ("int8", "block128", "block128", False, "scalar", None),
    "int8_blk_magic": ("int8", "block128", "block128", False, "magic", None),
    "fp8_blk_v1": ("fp8", "block128", "block128", False, "v1", None),
    "fp8_blk_scalar": ("fp8", "block128", "block128", False, "scalar", None),
    "fp8_blk_skew": ("fp8", "block128", "block128", False, "skew", None),
}
if QUICK:
    VARIANTS = {k: v for k, v in VARIANTS.items() if v[1] == "per_token"}


def _fail(what: str, e: BaseException) -> None:
    msg = f"{what}: {type(e).__name__}: {str(e)[:2000]}"
    print(f"  ERROR {msg}")
    traceback.print_exc(limit=4)
    ERRORS.append(msg)


def linear_fn(name, x, qw, sw, bias):
    fmt, ag, wg, fused, bv, tma = VARIANTS[name]
    if fused:
        return lambda: w8a8_gemm_triton(x, None, qw, sw, bias, ag, wg, x.dtype, fuse_quant=True)

    def run():
        qa, sa = quantize_triton(x, fmt, ag)
        return w8a8_gemm_triton(qa, sa, qw, sw, bias, ag, wg, x.dtype, block_variant=bv, use_tma=tma)

    return run


def _tma_check_pass(res: list) -> set:
    """One pass over TMA_CHECK_SHAPES (shape i with autotune config i); returns failing config indices."""
    bad = set()
    tune_list = TMA.tma_configs()
    for i, (m, k, n) in enumerate(TMA_CHECK_SHAPES):
        ci = i % len(tune_list)
        c = tune_list[ci]
        cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEV) * 0.02
        bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
        for fmt in ("int8", "fp8"):
            tag = f"{m}x{k}x{n} {fmt}_tok_tma cfg#{ci} (FLATTEN={TMA.FLATTEN})"
            try:
                qw, sw = W.quantize_weight(w, fmt, "per_channel")
                qa, sa = ref.quantize_ref(x, fmt, "per_token")
                path = gemm_path(qa, qw, torch.bfloat16, "per_token", "per_channel", use_tma=True)[0]
                want = ref.w8a8_gemm_ref(qa, sa, qw, sw, bias, "per_token", "per_channel", torch.float64)
                y = w8a8_gemm_triton(qa, sa, qw, sw, bias, "per_token", "per_channel", torch.bfloat16,
                                     use_tma=True, tma_config=cfg)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                _fail(f"tma check {tag}", e)
                res.append(dict(shape=[m, k, n], variant=f"{fmt}_tok_tma", config=str(cfg), flatten=TMA.FLATTEN,
                                ok=False, error=f"{type(e).__name__}: {e}"[:500]))
                bad.add(ci)
                continue
            rel, cos = rel_cos(y, want)
            ok = path == "tma" and rel < 5e-3 and cos > 0.99999 and not bool(torch.isnan(y).any())
            cmp = ""
            try:
                y_ptr = w8a8_gemm_triton(qa, sa, qw, sw, bias, "per_token", "per_channel", torch.bfloat16,
                                         use_tma=False, config=PTR_CHECK_CONFIG)
                cmp = f"rel_vs_pointer_kernel={rel_cos(y, y_ptr)[0]:.2e} bitequal_pointer={torch.equal(y, y_ptr)}"
            except Exception as e:  # noqa: BLE001
                _fail(f"pointer kernel at {tag}", e)
            print(f"  {tag} path={path} rel={rel:.2e} cos={cos:.7f} {cmp} {'OK' if ok else 'FAIL'}  cfg={cfg}")
            res.append(dict(shape=[m, k, n], variant=f"{fmt}_tok_tma", path=path, config=str(cfg), rel=rel, cos=cos,
                            flatten=TMA.FLATTEN, ok=bool(ok)))
            if not ok:
                bad.add(ci)
    return bad


def check_tma_first():
    """The new path before anything else: TMA GEMM vs the fp64 reference (and vs the pointer kernel),
    at shapes where the shape rule holds (K not a multiple of 128 included), every autotune config
    once. If some config fails with the flattened persistent loop, retry with FLATTEN off; then keep
    the FLATTEN setting with fewer failures and drop the failing configs from the autotune list
    (all printed, so the numbers say what ran)."""
    print("== TMA GEMM correctness first (vs fp64 reference) ==")
    res = []
    n_cfg = len(TMA.tma_configs())
    bad = _tma_check_pass(res)
    if bad:
        print(f"  configs {sorted(bad)} failed with FLATTEN=True; retrying with FLATTEN=False")
        TMA.FLATTEN = False
        bad_nf = _tma_check_pass(res)
        if len(bad_nf) >= len(bad):
            TMA.FLATTEN = True
        else:
            bad = bad_nf
    if bad and len(bad) < n_cfg:
        orig = TMA.tma_configs
        TMA.tma_configs = lambda: [c for i, c in enumerate(orig()) if i not in bad]
        TMA._TUNED = None  # rebuild the autotuner with the reduced list
        print(f"  autotune list reduced: dropped configs {sorted(bad)}")
    print(f"  TMA FLATTEN={TMA.FLATTEN}, failing configs: {sorted(bad) or 'none'}")
    return res


def rel_cos(out, want):
    o, w = out.double().flatten(), want.double().flatten()
    return float((o - w).norm() / w.norm()), float(F.cosine_similarity(o, w, dim=0))


def check_correctness():
    print("== correctness (Triton vs fp64 reference) ==")
    res = []
    for m, k, n in CHECK_SHAPES:
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEV) * 0.02
        bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
        for name in VARIANTS:
            try:
                res.append(_check_one(name, x, w, bias))
            except Exception as e:  # noqa: BLE001
                _fail(f"correctness {m}x{k}x{n} {name}", e)
                res.append(dict(shape=[m, k, n], variant=name, ok=False, error=f"{type(e).__name__}: {e}"[:500]))
    return res


def _check_one(name, x, w, bias):
    fmt, ag, wg, fused, bv, tma = VARIANTS[name]
    (m, k), n = x.shape, w.shape[0]
    qw, sw = W.quantize_weight(w, fmt, wg)
    qa_t, sa_t = quantize_triton(x, fmt, ag)
    qa_r, sa_r = ref.quantize_ref(x, fmt, ag)
    n_code_diff = int((qa_t.view(torch.uint8) != qa_r.view(torch.uint8)).sum())
    n_scale_diff = int((sa_t != sa_r).sum())
    codes_equal = n_code_diff == 0 and n_scale_diff == 0
    path = gemm_path(qa_t, qw, x.dtype, ag, wg, fused, tma)[0]
    want = ref.w8a8_gemm_ref(qa_r, sa_r, qw, sw, bias, ag, wg, torch.float64)
    y = linear_fn(name, x, qw, sw, bias)()
    torch.cuda.synchronize()
    rel, cos = rel_cos(y, want)
    y_op = W.w8a8_linear(x, qw, sw, bias, fmt, ag, wg, "triton")  # op path (auto kernel choice)
    y_float = F.linear(x.double(), w.double(), bias.double())
    sq = 10 * math.log10(float(y_float.pow(2).sum() / (want - y_float).pow(2).sum()))
    ok = codes_equal and rel < 5e-3 and cos > 0.99999 and not torch.isnan(y).any()
    ok = bool(ok and rel_cos(y_op, want)[0] < 5e-3)
    print(f"  {m}x{k}x{n} {name:15s} path={path} codes_exact={codes_equal} (diff codes {n_code_diff}, "
          f"scales {n_scale_diff}) rel={rel:.2e} cos={cos:.7f} "
          f"sqnr_vs_float={sq:.1f}dB {'OK' if ok else 'FAIL'}")
    return dict(shape=[m, k, n], variant=name, path=path, codes_exact=codes_equal, rel=rel, cos=cos,
                sqnr_db=sq, ok=ok)


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def timed(t: dict, key: str, fn, label: str) -> None:
    """t[key] = median ms of fn, or a printed error (and no entry) when it fails."""
    try:
        t[key] = bench(fn)
    except Exception as e:  # noqa: BLE001
        _fail(f"{label} {key}", e)


def time_shape(m, k, n):
    label = f"{m}x{k}x{n}"
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=DEV) * 0.02).to(torch.bfloat16)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    t = {}
    timed(t, "bf16", lambda: F.linear(x, w, bias), label)
    for name, (fmt, ag, wg, fused, bv, tma) in VARIANTS.items():
        try:
            qw, sw = W.quantize_weight(w, fmt, wg)
            qa, sa = quantize_triton(x, fmt, ag)
        except Exception as e:  # noqa: BLE001
            _fail(f"{label} {name} setup", e)
            continue
        timed(t, name, linear_fn(name, x, qw, sw, bias), label)
        if not fused:
            timed(t, name + ":gemm", lambda: w8a8_gemm_triton(qa, sa, qw, sw, bias, ag, wg, x.dtype,
                                                              block_variant=bv, use_tma=tma), label)
            if ag == "block128" and wg == "block128" and bv not in (None, "v1"):
                CONFIGS[f"{label}:{name}"] = str(tuned_block_config(bv))
            if tma:
                CONFIGS[f"{label}:{name}"] = str(TMA.tuned_tma_config())
                try:  # the autotuned TMA kernel vs the pointer kernel at this shape
                    y1 = w8a8_gemm_triton(qa, sa, qw, sw, bias, ag, wg, x.dtype, use_tma=True)
                    y0 = w8a8_gemm_triton(qa, sa, qw, sw, bias, ag, wg, x.dtype, use_tma=False)
                    rel = rel_cos(y1, y0)[0]
                    ok = bool(rel < 5e-3 and not torch.isnan(y1).any())
                    print(f"  {label} {name} (autotuned) vs pointer kernel: rel={rel:.2e} "
                          f"bitequal={torch.equal(y1, y0)} {'OK' if ok else 'FAIL'}")
                    BIG_CHECKS.append(dict(shape=[m, k, n], variant=name + ":vs_pointer", rel=rel, ok=ok,
                                           config=CONFIGS[f"{label}:{name}"]))
                    del y1, y0
                except Exception as e:  # noqa: BLE001
                    _fail(f"{label} {name} check vs pointer", e)
            if not QUICK and f"{fmt}:{ag}:quant" not in t:  # same quantizer for every block variant
                timed(t, f"{fmt}:{ag}:quant", lambda: quantize_triton(x, fmt, ag), label)
        if name == "int8_tok":  # library int8 GEMM alone (no scales, no bias, int32 out)
            timed(t, "_int_mm:gemm", lambda: torch._int_mm(qa, qw.t()), label)
        if name == "fp8_tok":  # cuBLAS row-wise fp8: GEMM alone, and with our per-token quantizer
            swt = sw.reshape(1, n)
            timed(t, "_scaled_mm:gemm",
                  lambda: torch._scaled_mm(qa, qw.t(), sa, swt, bias=bias, out_dtype=torch.bfloat16), label)
            if not QUICK:
                def scaled_full():
                    q2, s2 = quantize_triton(x, "fp8", "per_token")
                    return torch._scaled_mm(q2, qw.t(), s2, swt, bias=bias, out_dtype=torch.bfloat16)

                timed(t, "_scaled_mm+quant", scaled_full, label)
        del qw, sw, qa, sa
    if not QUICK:
        # the op path (torch.ops dispatch + validation) for the TD scheme, to show its overhead
        qw, sw = W.quantize_weight(w, "int8", "block128")
        timed(t, "op:int8_blk",
              lambda: W.w8a8_linear(x, qw, sw, bias, "int8", "block128", "block128", "triton"), label)
        timed(t, "bf16_again", lambda: F.linear(x, w, bias), label)  # run-to-run spread of the baseline
    else:
        timed(t, "bf16_again", lambda: F.linear(x, w, bias), label)  # run-to-run spread of the baseline
    del x, w
    torch.cuda.empty_cache()
    return t


def main():
    props = torch.cuda.get_device_properties(0)
    info = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"))
    print(info)
    print(f"quick={QUICK}")
    torch.manual_seed(0)
    t0 = time.time()
    correctness = check_tma_first()
    info["tma_flatten"] = TMA.FLATTEN
    print(f"TMA check done in {time.time() - t0:.0f}s (FLATTEN={TMA.FLATTEN})")
    if not QUICK:  # quick: the TMA check above + TMA vs pointer kernel at every timed shape
        correctness += check_correctness()
    print(f"correctness done in {time.time() - t0:.0f}s")
    timings = {}
    for m, k, n in SHAPES_14B + SHAPES_13B:
        t1 = time.time()
        try:
            timings[f"{m}x{k}x{n}"] = t = time_shape(m, k, n)
        except Exception as e:  # noqa: BLE001
            _fail(f"time_shape {m}x{k}x{n}", e)
            timings[f"{m}x{k}x{n}"] = t = {}
            torch.cuda.empty_cache()
        print(f"  {m}x{k}x{n}: " + " ".join(f"{key}={v:.3f}" for key, v in t.items() if v is not None)
              + f"  ({time.time() - t1:.0f}s)", flush=True)
    correctness += BIG_CHECKS
    summary = {}
    if QUICK:
        cols = ["int8_tok", "int8_tok_tma", "fp8_tok", "fp8_tok_tma", "int8_tok:gemm", "int8_tok_tma:gemm",
                "fp8_tok:gemm", "fp8_tok_tma:gemm", "_int_mm:gemm", "_scaled_mm:gemm", "bf16_again"]
    else:
        cols = ["int8_blk_v1", "int8_blk_scalar", "int8_blk_magic", "int8_tok", "int8_tok_tma", "fp8_blk_v1",
                "fp8_blk_scalar", "fp8_blk_skew", "fp8_tok", "fp8_tok_tma", "int8_tok:gemm", "int8_tok_tma:gemm",
                "fp8_tok:gemm", "fp8_tok_tma:gemm", "_int_mm:gemm", "_scaled_mm:gemm", "_scaled_mm+quant",
                "op:int8_blk", "bf16_again"]

    def base_ms(t):
        """The faster of the two bf16 timings of the shape (conservative speed-ups)."""
        return min(v for v in (t.get("bf16"), t.get("bf16_again")) if v)

    def speedups(shapes, c):
        out_ = []
        for m, k, n in shapes:
            t = timings.get(f"{m}x{k}x{n}", {})
            if t.get(c) and t.get("bf16"):
                out_.append(base_ms(t) / t[c])
        return out_

    for c in cols:
        sp14 = speedups(SHAPES_14B, c)
        sp13 = speedups(SHAPES_13B, c)
        if sp14:
            summary[c] = dict(geomean_14b=math.exp(sum(map(math.log, sp14)) / len(sp14)),
                              min_13b=min(sp13) if sp13 else None)
    out = os.environ.get("OUT")
    if out:
        import charts  # benchmarks/ is the script's directory

        result = dict(info=info, quick=QUICK, correctness=correctness, timings_ms=timings, summary=summary,
                      configs=CONFIGS, errors=ERRORS)
        with open(os.path.join(out, "bench_w8a8.json"), "w") as f:
            json.dump(result, f, indent=1)
        charts.save(result, os.path.join(out, "bench_w8a8.png"))
    print("\n== times (ms, median do_bench) and speedup vs bf16 F.linear (the faster of its two timings; `:gemm` = GEMM only) ==")
    hdr = f"{'shape MxKxN':22s} {'bf16':>7s} " + " ".join(f"{c[:17]:>17s}" for c in cols)
    print(hdr)
    for key, t in timings.items():
        b = base_ms(t) if t.get("bf16") else None
        row = f"{key:22s} {b if b else float('nan'):7.3f} "
        row += " ".join(f"{t[c]:9.3f}({b / t[c]:4.2f}x)" if t.get(c) and b else f"{'-':>17s}" for c in cols)
        print(row)
    print("autotune picks (block kernels, TMA kernel):")
    for key, cfg in CONFIGS.items():
        print(f"  {key}: {cfg}")
    split = ["int8_tok:gemm", "int8_tok_tma:gemm", "fp8_tok:gemm", "fp8_tok_tma:gemm", "_scaled_mm:gemm"]
    if not QUICK:
        split = ["int8:block128:quant", "int8_blk_v1:gemm", "int8_blk_scalar:gemm", "int8_blk_magic:gemm",
                 "fp8:block128:quant", "fp8_blk_v1:gemm", "fp8_blk_scalar:gemm", "fp8_blk_skew:gemm",
                 "int8:per_token:quant", "fp8:per_token:quant"] + split
    print("split (ms): " + " | ".join(split))
    for key, t in timings.items():
        print(f"  {key:22s} " + " ".join(f"{t.get(s_, float('nan')):.3f}" for s_ in split))
    print("\n== targets: INT8 >= 1.3x (geomean 14B), FP8 >= 1.6x, no 1.3B shape < 0.9x ==")
    for c, s_ in summary.items():
        print(f"  {c:18s} geomean14B={s_['geomean_14b']:.3f}x  min13B={s_['min_13b'] or float('nan'):.3f}x")
    print(f"TMA FLATTEN={TMA.FLATTEN}; errors: {len(ERRORS)}")
    for e in ERRORS:
        print(f"  {e[:300]}")
    ok = all(r["ok"] for r in correctness)
    print("correctness:", "ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
