"""FFN ffn.0 at Wan2.1-1.3B 480p (M=L=32760, K=1536, N=8960): the unfused chain vs the GELU-epilogue GEMM
and its quantizing variants (amax schemes), on the pointer kernel and on the persistent TMA kernel.
Correctness on the GPU vs the references, then do_bench medians.

    python benchmarks/bench_gemm_epilogue.py --out $OUT [--fmt int8|fp8]

The "fused" variants force the pointer GELU kernel (``use_tma=False``: what they measured before the
TMA epilogue existed); the "TMA" variants force the persistent TMA kernel (``use_tma=True``). "gemm
only" and the unfused chains use the plain GEMM's default routing (TMA on sm90+). FP8: e4m3 weights
(per channel) and activations (per token); the GELU output is quantized to the same format.
JSON: ``gemm_epilogue.json`` (int8) / ``gemm_epilogue_fp8.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback

import torch
import triton
import triton.testing

from turbocompile.kernels.w8a8 import ref
from turbocompile.kernels.w8a8 import triton_gemm_tma as TMA
from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton
from turbocompile.kernels.w8a8.triton_gemm_epilogue import (
    AMAX_GRANULE,
    gelu_gemm_path,
    w8a8_gemm_gelu_quant_triton,
    w8a8_gemm_gelu_triton,
)
from turbocompile.kernels.w8a8.triton_quant import quantize_triton
from turbocompile.ops.w8a8 import quantize_weight

MODES = ("partial", "atomic", "none")
SCALES = ("amax", "pow2", "bound")  # out_scale of w8a8_gemm_gelu_quant_triton (FP8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _codes_check(q, s, h, fmt: str) -> dict:
    """Codes/scales of a fused quantizer vs ``ref.quantize_ref`` of the stored h (values compared, so
    the e4m3 sign of a zero does not count; differing codes are counted, not just flagged)."""
    q_r, s_r = ref.quantize_ref(h, fmt, "per_token")
    n_diff = int((q.float() != q_r.float()).sum())
    s_equal = bool(torch.equal(s, s_r))
    return dict(ok=n_diff == 0 and s_equal, code_diffs=n_diff, scales_equal=s_equal)


def _granule_amax(h: torch.Tensor) -> torch.Tensor:
    m, n = h.shape
    g = triton.cdiv(n, AMAX_GRANULE)
    return torch.nn.functional.pad(h.float().abs(), (0, g * AMAX_GRANULE - n)).view(m, g, AMAX_GRANULE).amax(-1)


def check_tma(sl, full, h_ptr, truth, fmt: str) -> dict:
    """TMA + GELU epilogue vs the fp64 truth and the pointer kernel (on the row slice ``sl``), its
    amax buffers, and the codes of its quantizing variants; at the full M the autotuned config may
    differ, so output and partial amax are checked there too (vs the pointer kernel)."""
    bf16 = torch.bfloat16
    r = {"path": gelu_gemm_path(sl[0], sl[2], bf16, "per_token", "per_channel", use_tma=True)[0]}
    h, pa = w8a8_gemm_gelu_triton(*sl, bf16, amax_mode="partial", use_tma=True)
    r["rel_err"] = _rel(h, truth)
    r["rel_vs_pointer"] = _rel(h, h_ptr)
    r["bitequal_pointer"] = bool(torch.equal(h, h_ptr))  # expected for int8 (same epilogue order)
    r["partial_amax_exact"] = bool(torch.equal(pa, _granule_amax(h)))
    h_a, am = w8a8_gemm_gelu_triton(*sl, bf16, amax_mode="atomic", use_tma=True)
    r["atomic_amax_exact"] = bool(torch.equal(am, h_a.float().abs().amax(dim=1, keepdim=True)))
    for mode in MODES:
        q, s = w8a8_gemm_gelu_quant_triton(*sl, bf16, fmt, amax_mode=mode, use_tma=True)
        hh, _ = w8a8_gemm_gelu_triton(*sl, bf16, use_tma=True)
        r[f"codes_{mode}"] = _codes_check(q, s, hh, fmt)
    print(f"TMA gelu epilogue [{r['path']}]: rel err vs fp64 {r['rel_err']:.3e}, vs pointer kernel "
          f"{r['rel_vs_pointer']:.3e} (bit-equal {r['bitequal_pointer']}), partial amax exact "
          f"{r['partial_amax_exact']}, atomic amax exact {r['atomic_amax_exact']}")
    for mode in MODES:
        print(f"TMA gelu+quant[{mode}] codes == quantize_ref(stored h): {r[f'codes_{mode}']}")
    h_f, pa_f = w8a8_gemm_gelu_triton(*full, bf16, amax_mode="partial", use_tma=True)
    h_fp, _ = w8a8_gemm_gelu_triton(*full, bf16, use_tma=False)
    r["full_m"] = dict(rel_vs_pointer=_rel(h_f, h_fp), bitequal_pointer=bool(torch.equal(h_f, h_fp)),
                       partial_amax_exact=bool(torch.equal(pa_f, _granule_amax(h_f))),
                       config=str(TMA.tuned_tma_config(partial_amax=True)))
    print(f"TMA gelu epilogue at full M (autotuned): {r['full_m']}")
    del h_f, pa_f, h_fp
    ok = (r["path"] == "tma" and r["rel_err"] < 2.5e-3 and r["partial_amax_exact"] and r["atomic_amax_exact"]
          and r["full_m"]["partial_amax_exact"] and all(r[f"codes_{mode}"]["ok"] for mode in MODES)
          and (fmt != "int8" or (r["bitequal_pointer"] and r["full_m"]["bitequal_pointer"])))
    r["ok"] = bool(ok)
    print(f"TMA gelu epilogue checks: {'OK' if ok else 'FAIL'}")
    return r


def check_scales(sl, full) -> dict:
    """The three FP8 output-scale paths of the op (default kernel routing, as a graph runs them) on the
    row slice ``sl``: codes and scales against the references at the stored GELU output h. "amax":
    ``ref.quantize_ref``; "pow2": ``ref.quantize_pow2_ref``; "bound" (shipped in turbo-fp8): scales
    ``ref.row_bound_scale_ref`` (may differ only within a few fp32 ulps of a power-of-two boundary) and
    codes ``ref.quantize_at_scale_ref`` at the kernel's own scales. pow2's TMA route may leave a code
    below 2^-6 one subnormal step from the reference (its requantization; counted, and allowed only
    there). Also the ffn.2 input error each path leaves: ‖dequant(codes) − h‖ / ‖h‖."""
    bf16 = torch.bfloat16
    wb = ref.gelu_bound_constants_ref(full[2], full[3], full[4], "per_channel")
    h, _ = w8a8_gemm_gelu_triton(*sl, bf16)
    r = {"wbound": wb}
    for mode in SCALES:
        q, s = w8a8_gemm_gelu_quant_triton(*sl, bf16, "fp8", out_scale=mode, wbound=wb if mode == "bound" else None)
        if mode == "amax":
            q_r, s_r = ref.quantize_ref(h, "fp8", "per_token")
        elif mode == "pow2":
            q_r, s_r = ref.quantize_pow2_ref(h)
        else:
            s_r = ref.row_bound_scale_ref(sl[0], sl[1], wb)
            q_r = ref.quantize_at_scale_ref(h, s)
        deq = q.float() * s.float()
        differ = q.float() != q_r.float()
        # pow2 on the TMA route requantizes granule codes to the row scale: a code below 2^-6 (e4m3
        # subnormal) may land one subnormal step (2^-9) from the reference's (documented route property)
        step = (q.float() - q_r.float()).abs()[differ]
        c = dict(code_diffs=int(differ.sum()), scale_diffs=int((s != s_r).sum()),
                 diffs_one_subnormal_step=bool((q_r.float().abs()[differ] < 2.0 ** -6).all()
                                               and (step <= 2.0 ** -9).all()),
                 input_err=_rel(deq, h), scale_over_amax_median=float(
                     (s.float().view(-1) * 448.0 / h.float().abs().amax(dim=1).clamp_min(1e-30)).median()))
        codes_ok = c["code_diffs"] == 0 or (mode == "pow2" and c["diffs_one_subnormal_step"])
        c["ok"] = codes_ok and (c["scale_diffs"] == 0 if mode != "bound" else c["scale_diffs"] <= 2)
        r[mode] = c
        print(f"op out_scale {mode}: {c}")
    r["ok"] = all(r[m]["ok"] for m in SCALES)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=32760)
    ap.add_argument("--fmt", choices=("int8", "fp8"), default="int8")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    m, k, n, fmt = a.m, 1536, 8960, a.fmt
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}  "
          f"M={m} K={k} N={n} fmt={fmt}")
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.03
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
    qx, sx = quantize_triton(x, fmt, "per_token")
    qw, sw = quantize_weight(w, fmt, "per_channel")
    args = (qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16)

    def unfused_bf16():
        return torch.nn.functional.gelu(w8a8_gemm_triton(*args), approximate="tanh")

    def unfused_quant():
        return quantize_triton(unfused_bf16(), fmt, "per_token")

    res = {"fmt": fmt, "shape": [m, k, n], "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "errors": []}
    # correctness on a row slice (fp64 reference); the pointer GELU kernel is forced (use_tma=False)
    ms = 2048
    sl = (qx[:ms], sx[:ms], qw, sw, b, "per_token", "per_channel")
    truth = torch.nn.functional.gelu(ref.w8a8_gemm_ref(*sl, torch.float64), approximate="tanh")
    h, _ = w8a8_gemm_gelu_triton(*sl, torch.bfloat16, use_tma=False)
    rel = _rel(h, truth)
    hu = unfused_bf16()[:ms]
    rel_u = _rel(hu, truth)
    print(f"gelu epilogue (pointer) rel err vs fp64 {rel:.3e} (unfused chain {rel_u:.3e})")
    res["rel_err_fused"], res["rel_err_unfused"] = rel, rel_u
    for mode in MODES:
        q, s = w8a8_gemm_gelu_quant_triton(*sl, torch.bfloat16, fmt, amax_mode=mode, use_tma=False)
        hh, _ = w8a8_gemm_gelu_triton(*sl, torch.bfloat16, use_tma=False)
        c = _codes_check(q, s, hh, fmt)
        print(f"gelu+quant[{mode}] (pointer) codes == quantize_ref(stored h): {c}")
        res[f"codes_exact_{mode}"] = c["ok"]
        res[f"codes_{mode}"] = c
    try:
        res["tma_check"] = check_tma(sl, args[:7], h, truth, fmt)
    except Exception as e:  # noqa: BLE001 - report, and still time the pointer variants
        traceback.print_exc(limit=4)
        res["tma_check"] = dict(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        res["errors"].append(f"tma check: {type(e).__name__}: {e}"[:500])
    del truth, hu

    times = {
        "gemm only (no GELU)": lambda: w8a8_gemm_triton(*args),
        "unfused: gemm -> gelu (bf16)": unfused_bf16,
        "fused: gemm+gelu (bf16)": lambda: w8a8_gemm_gelu_triton(*args, use_tma=False),
        "unfused: gemm -> gelu -> quant": unfused_quant,
        "fused gelu + standalone quant": lambda: w8a8_gemm_gelu_quant_triton(*args, fmt, amax_mode="none",
                                                                             use_tma=False),
        "fused gelu + partial amax + quant": lambda: w8a8_gemm_gelu_quant_triton(*args, fmt, amax_mode="partial",
                                                                                 use_tma=False),
        "fused gelu + atomic amax + quant": lambda: w8a8_gemm_gelu_quant_triton(*args, fmt, amax_mode="atomic",
                                                                                use_tma=False),
        "TMA gemm only": lambda: w8a8_gemm_triton(*args, use_tma=True),
        "TMA fused gemm+gelu (bf16)": lambda: w8a8_gemm_gelu_triton(*args, use_tma=True),
        "TMA fused gelu + partial amax (no quant)": lambda: w8a8_gemm_gelu_triton(*args, amax_mode="partial",
                                                                                  use_tma=True),
        "TMA fused gelu + partial amax + quant": lambda: w8a8_gemm_gelu_quant_triton(*args, fmt, amax_mode="partial",
                                                                                     use_tma=True),
        # GELU epilogue without amax, then the one/two-tile per-token quantizer ("rows" kernel)
        "TMA gelu + rows quant": lambda: quantize_triton(w8a8_gemm_gelu_triton(*args, use_tma=True)[0], fmt,
                                                         "per_token", config=dict(kernel="rows")),
        "TMA gelu + rows quant (1 row x 16 warps)": lambda: quantize_triton(
            w8a8_gemm_gelu_triton(*args, use_tma=True)[0], fmt, "per_token",
            config=dict(kernel="rows", block_m=1, num_warps=16)),
        "pointer gelu + rows quant": lambda: quantize_triton(w8a8_gemm_gelu_triton(*args, use_tma=False)[0], fmt,
                                                             "per_token", config=dict(kernel="rows")),
    }
    if fmt == "fp8":  # the op's per-token output scales, as the recipes emit them (turbo-fp8: "bound")
        res["scale_check"] = check_scales(sl, args[:7])
        wb = res["scale_check"]["wbound"]
        for mode in SCALES:
            times[f"op: out_scale {mode}"] = (lambda mode=mode: w8a8_gemm_gelu_quant_triton(
                *args, fmt, out_scale=mode, wbound=wb if mode == "bound" else None))
        res["scale_check"]["wbound"] = wb.tolist()
    # the rows quantizer on this h (N = 8960: tiles 8192 + 1024, masked) against the loop kernel's codes
    h_full, _ = w8a8_gemm_gelu_triton(*args, use_tma=False)
    q_loop, s_loop = quantize_triton(h_full, fmt, "per_token", config=dict(kernel="loop"))
    for rc in (dict(kernel="rows"), dict(kernel="rows", block_m=1, num_warps=16)):
        q_rows, s_rows = quantize_triton(h_full, fmt, "per_token", config=rc)
        diffs = int((q_rows.view(torch.int8) != q_loop.view(torch.int8)).sum())
        print(f"rows quantizer {rc}: codes != loop kernel: {diffs}, scales equal: {torch.equal(s_rows, s_loop)}")
        res.setdefault("rows_quant_check", []).append(dict(cfg=str(rc), code_diffs=diffs,
                                                           scales_equal=bool(torch.equal(s_rows, s_loop))))
    del h_full, q_loop, s_loop, q_rows, s_rows
    res["ms"], res["tflops"], res["tma_configs"] = {}, {}, {}
    for name, fn in times.items():
        try:
            fn()
            t = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(limit=4)
            res["errors"].append(f"{name}: {type(e).__name__}: {e}"[:500])
            continue
        res["ms"][name] = t
        res["tflops"][name] = 2.0 * m * n * k / (t * 1e-3) / 1e12  # the GEMM's FLOPs per call time
        if name.startswith("TMA"):  # the autotuner's pick for this variant (its last launch)
            res["tma_configs"][name] = str(TMA.tuned_tma_config(partial_amax="partial" in name))
    print(f"{'variant':<42} {'ms':>8} {'TFLOP/s':>8}   (per call, x30 blocks per forward)")
    for name, t in res["ms"].items():
        print(f"{name:<42} {t:8.3f} {res['tflops'][name]:8.0f}   {30 * t:7.1f}")
    for name, cfg in res["tma_configs"].items():
        print(f"  autotuned config of '{name}': {cfg}")
    if res["errors"]:
        print(f"ERRORS ({len(res['errors'])}):\n  " + "\n  ".join(res["errors"]))
    name = "gemm_epilogue.json" if fmt == "int8" else f"gemm_epilogue_{fmt}.json"
    with open(os.path.join(a.out, name), "w") as f:
        json.dump(res, f, indent=2)
    import charts  # benchmarks/ is the script's directory

    charts.save(res, os.path.join(a.out, os.path.splitext(name)[0] + ".png"))


if __name__ == "__main__":
    main()
