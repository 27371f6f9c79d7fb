"""Where the SageSLA time goes: inner-loop variants of the attention kernel and a per-kernel
breakdown of the pre-processing, on the GPU.

    source benchmarks/gpu_env.sh; PYTHONUNBUFFERED=1 python3 benchmarks/ablate_sagesla.py

1. correctness of every inner-loop variant on the GPU (vs the default kernel and vs fp32 SDPA);
2. the attention kernel alone (operands prepared once) for each variant at Wan shapes, dense
   and top-k 0.1, with the ablations (no exponent / no PV product) that bound each unit's share;
3. torch.profiler CUDA time per kernel of one whole op (prep passes, glue, top-k, attention).
JSON to $OUT/ablate_sagesla.json. Variants: cvt (0 I2F, 1 add/sub trick, 2 trick folded into the
exponent FMA), expm (0 MUFU ex2, 1 FMA polynomial, 2 half/half, 9 none), p8 (0 cvt, 1 int bits).
$VARIANT_ONLY (comma-separated name prefixes) limits the variants; names containing "+lin" are also
checked and timed with the linear branch (+ proj_l, bias) in the epilogue. Correctness rows also say
whether two launches give the same bits.
"""

from __future__ import annotations

import json
import math
import os
import traceback

import torch
import torch.nn.functional as F
import triton

from turbocompile.kernels.sagesla.linear_fold import linear_state
from turbocompile.kernels.sagesla.triton_attn import launch_attn
from turbocompile.kernels.sagesla.triton_prep import prepare
from turbocompile.ops.attention import sagesla

DEV = "cuda"
OUT = os.environ.get("OUT", ".")
RES: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
             "correctness": [], "kernel": [], "profile": []}
ROUND1_VARIANTS = [
    ("base", {}),
    ("cvt1", dict(cvt=1)),
    ("cvt2", dict(cvt=2)),
    ("expm1", dict(expm=1)),
    ("expm2", dict(expm=2)),
    ("p8", dict(p8=1)),
    ("cvt2+expm1", dict(cvt=2, expm=1)),
    ("cvt2+expm2", dict(cvt=2, expm=2)),
    ("cvt2+expm2+p8", dict(cvt=2, expm=2, p8=1)),
    ("cvt2+expm1+p8", dict(cvt=2, expm=1, p8=1)),
    ("ABL no-exp (cvt2)", dict(cvt=2, expm=9)),
    ("ABL no-PV (cvt2)", dict(cvt=2, nopv=True)),
    ("ABL no-exp no-PV (cvt2)", dict(cvt=2, expm=9, nopv=True)),
]
# Round 2 (defaults now cvt 2): TMA K/V loads and pipeline depth.
VARIANTS = [
    ("base", {}),
    ("cvt0", dict(cvt=0)),
    ("tma", dict(tma=True)),
    ("tma s2", dict(tma=True, num_stages=2)),
    ("ABL tma no-PV", dict(tma=True, nopv=True)),
    # Session 6: the Gluon kernel (TMA ring + async wgmma, QK of block t+1 under block t's softmax)
    ("gluon ns3", dict(kernel="gluon")),
    ("gluon ns2", dict(kernel="gluon", stages=2)),
    # Session 7: V keys permuted so that P needs no shuffles (v_perm, default). The warp-specialized
    # ping-pong kernel is on branch exp/gluon-ws (slower on the H200).
    ("triton", dict(kernel="triton")),
    ("gluon, session-6 layout (no v_perm)", dict(kernel="gluon", prep_tune=dict(v_perm=0))),
    ("triton, session-6 layout (no v_perm)", dict(kernel="triton", prep_tune=dict(v_perm=0))),
]
PREP_TUNES = [
    ("default", {}),
    ("V in key order (session-6 layout, v_perm 0)", dict(v_perm=0)),
    ("linear in B (session-3 default)", dict(linear_in="b", scores="fp32", topk_rows=0)),
    ("pass B 4 warps", dict(warps_b=4)),
    ("pass B 16 warps", dict(warps_b=16)),
    ("pass A stages 2", dict(stages_a=2)),
    ("pass A 2048 progs", dict(progs_a=2048)),
    ("pass A 512 progs", dict(progs_a=512)),
    ("pass A 4096 progs", dict(progs_a=4096)),
    ("pass A 2048 progs stages 2", dict(progs_a=2048, stages_a=2)),
    ("pass A 8 warps", dict(warps_a=8)),
    ("pass A 4096 progs 8 warps stages 2", dict(progs_a=4096, warps_a=8, stages_a=2)),
    ("pass B 2048 progs", dict(progs_b=2048)),
    ("linear kernel: stages 3", dict(lin_stages=3)),
    ("linear kernel: 512 progs", dict(progs_l=512)),
    ("linear kernel: φ(k)ᵀv row-major (session-7 default, lin_vt 0)", dict(lin_vt=0)),
    ("linear kernel: φ(k)ᵀv row-major, 8 warps", dict(lin_vt=0, lin_warps=8)),
    ("linear kernel: 8 warps", dict(lin_warps=8)),
    ("linear kernel: 8 warps 128 rows", dict(lin_warps=8, lin_block=128)),
    # Session 14: fewer, longer statistics programs (fewer partials for the fold kernel to sum)
    ("linear kernel: 264 progs", dict(progs_l=264)),
    ("linear kernel: 264 progs stages 3", dict(progs_l=264, lin_stages=3)),
    ("linear kernel: 264 progs stages 4", dict(progs_l=264, lin_stages=4)),
    ("linear kernel: 528 progs stages 3", dict(progs_l=528, lin_stages=3)),
    ("linear kernel: 528 progs", dict(progs_l=528)),
    ("linear kernel: 264 progs 128 rows", dict(progs_l=264, lin_block=128)),
    ("linear kernel: ks8", dict(lin_ks8=1)),
    ("linear kernel: ks8 264 progs", dict(lin_ks8=1, progs_l=264)),
    ("linear kernel: ks8 264 progs stages 3", dict(lin_ks8=1, progs_l=264, lin_stages=3)),
    ("linear kernel: ks8 1024 progs", dict(lin_ks8=1, progs_l=1024)),
    ("linear kernel: ks8 8 warps", dict(lin_ks8=1, lin_warps=8)),
    ("linear kernel: 32 rows", dict(lin_block=32)),
    ("linear kernel: 32 rows stages 3", dict(lin_block=32, lin_stages=3)),
    ("linear kernel: 32 rows 264 progs", dict(lin_block=32, progs_l=264)),
    ("linear kernel: 32 rows 2 warps", dict(lin_block=32, lin_warps=2)),
    ("linear kernel: 16 rows", dict(lin_block=16)),
    ("linear kernel: 16 rows stages 4", dict(lin_block=16, lin_stages=4)),
    # Session 15: pass A's outputs (q means, k block sums, V maxima) inside the statistics kernel (lin_pool 1)
    ("linear kernel: pass A separate (lin_pool 0, session-14 default)", dict(lin_pool=0)),
    ("linear kernel: pool 8 warps", dict(lin_warps=8)),
    ("linear kernel: pool 8 warps 32 rows", dict(lin_warps=8, lin_block=32)),
    ("linear kernel: pool 32 rows", dict(lin_block=32)),
    ("linear kernel: pool 264 progs stages 3", dict(progs_l=264, lin_stages=3)),
    ("linear kernel: pool 1024 progs", dict(progs_l=1024)),
    # Session 9: key means, V scales and block scores in one kernel (glue, default) vs torch ops + bmm
    ("glue off: torch ops + cuBLAS TF32 bmm (session 8)", dict(glue=0)),
]
# The split linear-branch output kernel (launch_attn(linear_cfg=...)).
LINEAR_OUT_CFGS = [
    ("default", {}),
    ("Gluon epilogue", dict(where="epilogue")),
    ("own kernel", dict(where="kernel")),
    ("prologue of the attention kernel", dict(where="prologue")),
    ("own kernel, 32 rows x 4 warps", dict(where="kernel", block_m=32, warps=4)),
]


def metrics(out, ref):
    o, r = out.double().flatten(), ref.double().flatten()
    return (o @ r / (o.norm() * r.norm())).item(), ((o - r).abs().sum() / r.abs().sum()).item()


def ms_of(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def _variants():
    """VARIANTS, or those whose names start with one of the comma-separated prefixes in $VARIANT_ONLY."""
    only = [x for x in os.environ.get("VARIANT_ONLY", "").split(",") if x]
    return [(n, v) for n, v in VARIANTS if not only or n == "base" or any(n.startswith(x) for x in only)]


def correctness():
    print("== correctness: variants vs default kernel and vs fp32 SDPA (dense) ==", flush=True)
    for (B, L, H, D) in [(1, 4096, 4, 128), (2, 3001, 3, 64)]:
        q, k, v = (torch.randn(B, L, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        sd = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        for quant in ("int8-fp8", "int8-fp16"):
            for topk in (0.1, 1.0):
                prep = prepare(q, k, v, topk, 64, 128, quant, False)
                base = launch_attn(q, k, v, prep, None, None, 64, 128)
                w = torch.randn(D, D, device=DEV) / math.sqrt(D) * 0.5
                bias = torch.randn(D, device=DEV) * 0.02
                prep_l = prepare(q, k, v, topk, 64, 128, quant, True)
                base_l = launch_attn(q, k, v, prep_l, w, bias, 64, 128)
                for name, var in _variants():
                    if name.startswith("ABL") or (quant == "int8-fp16" and ("p8" in var or "kernel" in var)):
                        continue
                    if "block_m" in var and not topk == 1.0:
                        continue
                    row = dict(shape=[B, L, H, D], quant=quant, topk=topk, variant=name)
                    try:
                        var = dict(var)
                        tune = var.pop("prep_tune", None)
                        pp = prepare(q, k, v, topk, 64, 128, quant, False, tune=tune) if tune else prep
                        o = launch_attn(q, k, v, pp, None, None, 64, 128, **var)
                        row["vs_default"] = metrics(o, base)
                        row["finite"] = bool(torch.isfinite(o).all())
                        row["deterministic"] = torch.equal(o, launch_attn(q, k, v, pp, None, None, 64, 128, **var))
                        if "+lin" in name:  # also with the linear branch (+ proj_l, bias) in the epilogue
                            ol = launch_attn(q, k, v, prep_l, w, bias, 64, 128, **var)
                            row["linear_vs_default"] = metrics(ol, base_l)
                            row["linear_finite"] = bool(torch.isfinite(ol).all())
                        if topk == 1.0:
                            row["vs_sdpa_fp32"] = metrics(o, sd)
                    except Exception as e:
                        row["error"] = repr(e)[:300]
                    print(row, flush=True)
                    RES["correctness"].append(row)


def kernel_timings(name, B, L, H, D, topks):
    q, k, v = (torch.randn(B, L, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    w = torch.randn(D, D, device=DEV) / math.sqrt(D) * 0.5
    bias = torch.randn(D, device=DEV) * 0.02
    for topk in topks:
        prep = prepare(q, k, v, topk, 64, 128, "int8-fp8", True)
        dens = prep["T"] / prep["Kb"]
        flops = 4.0 * B * H * L * L * D * dens
        print(f"== kernel alone {name} topk {topk} (density {dens:.4f}) ==", flush=True)
        for vname, var in _variants():
            if "block_m" in var and topk != 1.0:
                continue
            for lin in ((False, True) if vname == "base" or "+lin" in vname else (False,)):
                try:
                    var = dict(var)
                    tune = var.pop("prep_tune", None)
                    pp = prepare(q, k, v, topk, 64, 128, "int8-fp8", True, tune=tune) if tune else prep
                    fn = (lambda var=var, lin=lin, pp=pp: launch_attn(q, k, v, pp, w if lin else None,
                                                                      bias if lin else None, 64, 128, **var))
                    t = ms_of(fn)
                    row = dict(shape=name, topk=topk, variant=vname + (" +linear-branch" if lin else ""), ms=t,
                               eff_tops=flops / (t * 1e-3) / 1e12)
                except Exception as e:
                    row = dict(shape=name, topk=topk, variant=vname, error=repr(e)[:300])
                    traceback.print_exc()
                print(row, flush=True)
                RES["kernel"].append(row)
        del prep
        torch.cuda.empty_cache()


def key_order_v(prep):
    """The FP8 V operand with its keys in plain order (undoes `permute_keys` when v_perm)."""
    vq = prep["vq"]
    if not prep["v_perm"]:
        return vq
    r = torch.arange(vq.shape[-1], device=vq.device)
    c = r % 32
    return vq[..., r - c + (c & 16) + ((c >> 1) & 3) * 4 + ((c >> 3) & 1) * 2 + (c & 1)]


def prep_sweep(name, B, L, H, D, topk):
    """prepare() alone for each tuning, and its per-kernel CUDA times."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (torch.randn(B, L, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    print(f"== prep sweep {name} topk {topk} ==", flush=True)
    ref = prepare(q, k, v, topk, 64, 128, "int8-fp8", True)
    only = [x for x in os.environ.get("PREP_ONLY", "").split(",") if x]  # name prefixes (default: all)
    for tname, tune in PREP_TUNES:
        if only and not any(tname.startswith(x) for x in only):
            continue
        try:
            fn = lambda tune=tune: prepare(q, k, v, topk, 64, 128, "int8-fp8", True, tune=tune)  # noqa: E731
            out = fn()
            same = all(torch.equal(out[key], ref[key]) for key in ("lut", "kq", "kscale"))
            same = same and torch.equal(key_order_v(out).view(torch.int8), key_order_v(ref).view(torch.int8))
            (kv_o, ks_o), (kv_r, ks_r) = linear_state(out), linear_state(ref)
            kv_rel = ((kv_o - kv_r).norm() / kv_r.norm()).item()
            ks_rel = ((ks_o - ks_r).norm() / ks_r.norm()).item()
            t = ms_of(fn)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            ker = {ev.key[:28]: round((getattr(ev, "device_time_total", 0) or 0) / 1e3, 3)
                   for ev in prof.key_averages() if (getattr(ev, "device_time_total", 0) or 0) > 20}
            row = dict(shape=name, tune=tname, ms=t, identical_quant=same, kv_rel=kv_rel, ks_rel=ks_rel, kernels=ker)
        except Exception as e:
            row = dict(shape=name, tune=tname, error=repr(e)[:300])
        print(row, flush=True)
        RES.setdefault("prep", []).append(row)


def linear_out_sweep(name, B, L, H, D, topk):
    """Cost of the linear branch output (split kernel + the attention kernel's ADD_OUT read):
    attention with proj_l minus attention without, for each launch config of the split kernel."""
    q, k, v = (torch.randn(B, L, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    w = torch.randn(D, D, device=DEV) / math.sqrt(D) * 0.5
    bias = torch.randn(D, device=DEV) * 0.02
    prep = prepare(q, k, v, topk, 64, 128, "int8-fp8", True)
    t0 = ms_of(lambda: launch_attn(q, k, v, prep, None, None, 64, 128))
    ref = launch_attn(q, k, v, prep, w, bias, 64, 128)
    print(f"== linear-out sweep {name} topk {topk}: attention without the linear branch {t0:.3f} ms ==", flush=True)
    for cname, cfg in LINEAR_OUT_CFGS:
        try:
            o = launch_attn(q, k, v, prep, w, bias, 64, 128, linear_cfg=cfg)
            t = ms_of(lambda cfg=cfg: launch_attn(q, k, v, prep, w, bias, 64, 128, linear_cfg=cfg))
            row = dict(shape=name, cfg=cname, ms=t, linear_ms=t - t0, vs_default=metrics(o, ref))
        except Exception as e:
            row = dict(shape=name, cfg=cname, error=repr(e)[:300])
        print(row, flush=True)
        RES.setdefault("linear_out", []).append(row)
    del prep
    torch.cuda.empty_cache()


def whole_op(name, B, L, H, D):
    """Whole op (default settings) vs SDPA cuDNN in the same run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(B, L, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    w = torch.randn(D, D, device=DEV) / math.sqrt(D) * 0.5
    bias = torch.randn(D, device=DEV) * 0.02
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        sd = ms_of(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    del qt, kt, vt
    row = dict(shape=name, sdpa_cudnn_ms=sd)
    from turbocompile.kernels.sagesla import triton_attn

    def op(topk):
        return sagesla(q, k, v, topk=topk, proj_weight=w, proj_bias=bias, quant="int8-fp8", backend="triton")

    for topk in (0.1, 1.0):
        # the default whole op (the Gluon attention kernel where supported)
        t = ms_of(lambda: op(topk))
        row[f"topk{topk}_ms"] = t
        row[f"topk{topk}_x_sdpa"] = sd / t
        ref = op(topk)
        # the same op on the Triton attention kernel, and that kernel with its linear branch in the
        # other place (own kernel <-> prologue)
        default_kernel = triton_attn.DEFAULT_VARIANT["kernel"]
        triton_attn.DEFAULT_VARIANT["kernel"] = "triton"
        try:
            row[f"topk{topk}_triton_kernel_vs_op"] = metrics(op(topk), ref)
            t = ms_of(lambda: op(topk))
        finally:
            triton_attn.DEFAULT_VARIANT["kernel"] = default_kernel
        row[f"topk{topk}_triton_kernel_ms"] = t
        row[f"topk{topk}_triton_kernel_x_sdpa"] = sd / t
        fn = lambda: launch_attn(q, k, v, prepare(q, k, v, topk, 64, 128, "int8-fp8", True), w, bias, 64, 128,  # noqa: E731
                                 linear_cfg=dict(where="kernel" if topk < 1.0 else "prologue"), kernel="triton")
        row[f"topk{topk}_other_linear_place_vs_op"] = metrics(fn(), ref)
        t = ms_of(fn)
        row[f"topk{topk}_other_linear_place_ms"] = t
        row[f"topk{topk}_other_linear_place_x_sdpa"] = sd / t
    print("== whole op ==", row, flush=True)
    RES.setdefault("whole", []).append(row)


def profile_op(name, B, L, H, D, topk):
    """CUDA time per kernel of the whole op (3 calls, averaged), via torch.profiler."""
    q, k, v = (torch.randn(B, L, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    w = torch.randn(D, D, device=DEV) / math.sqrt(D) * 0.5
    bias = torch.randn(D, device=DEV) * 0.02
    fn = lambda: sagesla(q, k, v, topk=topk, proj_weight=w, proj_bias=bias, quant="int8-fp8", backend="triton")  # noqa: E731
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    tot = 0.0
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        rows.append((ev.key[:70], us / 3 / 1e3, ev.count // 3))
    rows.sort(key=lambda r: -r[1])
    print(f"== per-kernel CUDA time, whole op {name} topk {topk} (ms per call) ==", flush=True)
    for key, ms, n in rows:
        tot += ms
        print(f"  {ms:8.3f}  x{n:<3d} {key}")
        RES["profile"].append(dict(shape=name, topk=topk, kernel=key, ms=ms, calls=n))
    print(f"  {tot:8.3f}  total", flush=True)


def main():
    print(RES["device"], "torch", RES["torch"], "triton", RES["triton"], flush=True)
    parts = os.environ.get("ABLATE", "correctness,kernel,prep,linout,whole,profile").split(",")
    if "correctness" in parts:
        correctness()
    if "kernel" in parts:
        kernel_timings("B1 H12 L32760 D128", 1, 32760, 12, 128, (1.0, 0.1))
        kernel_timings("B1 H40 L75600 D128", 1, 75600, 40, 128, (0.1,))
    for shp in [("B1 H12 L32760 D128", 1, 32760, 12, 128), ("B1 H40 L75600 D128", 1, 75600, 40, 128)]:
        if "prep" in parts:
            prep_sweep(*shp, 0.1)
        if "linout" in parts:
            for topk in (0.1, 1.0):
                linear_out_sweep(*shp, topk)
        if "whole" in parts:
            whole_op(*shp)
    if "profile" not in parts:
        return finish()
    for args in [("B1 H12 L32760 D128", 1, 32760, 12, 128, 0.1), ("B1 H40 L75600 D128", 1, 75600, 40, 128, 0.1)]:
        try:
            profile_op(*args)
        except Exception:
            traceback.print_exc()
    finish()


def finish():
    with open(os.path.join(OUT, "ablate_sagesla.json"), "w") as f:
        json.dump(RES, f, indent=1)
    print("== summary: kernel alone (ms, eff TOPS) ==")
    for r in RES["kernel"]:
        if "ms" in r:
            print(f"  {r['shape']:20s} topk {r['topk']:<4} {r['variant']:32s} {r['ms']:8.3f} ms {r['eff_tops']:7.1f}")


if __name__ == "__main__":
    main()
