"""SageSLA's linear-branch statistics on Hopper: the Gluon kernel (`gluon_stats`) against the Triton one.

    source benchmarks/gpu_env.sh; PYTHONUNBUFFERED=1 python3 benchmarks/probe_gluon_stats.py --out $OUT

1. correctness, both kernels launched directly on the same inputs, against an fp64 reference of what
   they compute (φ(k)ᵀv with φ rounded to the input dtype, Σφ(k), |v| channel maxima, q block means,
   k block sums): odd L, L below one 64-row step, B 2, q/k/v as column slices of one fused tensor, fp16,
   K-channel outliers, dense (no q means) and without pooling (the e2e path); then `prepare` and the whole
   op with the Gluon kernel on and off (LUT and quantized operands, cos vs the torch reference, repeated
   calls and a CUDA-graph replay);
2. timing at the Wan shapes: each statistics kernel alone with and without pooling (and the Gluon ring
   depth), `prepare` with the fold, and the whole op (top-k 0.1 with proj_l) with the Gluon kernel on and
   off, with torch SDPA (cuDNN) and a device copy of q, k, v in the same run.
JSON to $OUT/probe_gluon_stats.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_sagesla import bench as bench_once  # benchmarks/ is the script's directory (sys.path[0])
from turbocompile.kernels.sagesla import gluon_stats
from turbocompile.kernels.sagesla import triton_prep as tp
from turbocompile.kernels.sagesla.linear_stats import _linear_stats_kernel
from turbocompile.ops.attention import sagesla

DEV = "cuda"
RES = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
       "correctness": [], "timing": []}


def bench(fn, reps=1):
    """`reps` medians of the whole-op benchmark's timer."""
    return [bench_once(fn) for _ in range(reps)]


def inputs(B, L, H, D, dtype=torch.bfloat16, sliced=False, outliers=False, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    if sliced:  # q, k, v as column slices of one [B, L, 3, H, D] tensor (a fused q/k/v GEMM's output)
        x = torch.randn(B, L, 3, H, D, device=DEV, generator=g).to(dtype)
        q, k, v = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    else:
        q, k, v = (torch.randn(B, L, H, D, device=DEV, generator=g).to(dtype) for _ in range(3))
    if outliers:
        k[..., 3] += 12.0
        v[..., 7] *= 30.0
    return q, k, v


def run_stats(q, k, v, use_gluon, pool, dense, block_q=64, block_k=128, stages=3):
    """One statistics kernel, launched as `prepare` launches it; returns its buffers and a relaunch fn."""
    B, L, H, D = k.shape
    BH, f32 = B * H, torch.float32
    Qb, Kb = math.ceil(L / block_q), math.ceil(L / block_k)
    if use_gluon:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        chunk = gluon_stats.chunk_rows(L, BH, max(64, block_q, block_k), sms)
    else:
        chunk = tp._chunk_rows(L, BH, max(64, block_q, block_k) if pool else 64, tp.DEFAULT_TUNE["progs_l"])
    NC = math.ceil(L / chunk)
    buf = {"kv": torch.empty(BH, NC, D, D, device=DEV, dtype=f32), "ks": torch.empty(BH, NC, D, device=DEV, dtype=f32),
           "vmax": torch.empty(BH, NC, D, device=DEV, dtype=f32), "qpool": torch.empty(BH, Qb, D, device=DEV, dtype=f32),
           "kblk": torch.empty(BH, Kb, D, device=DEV, dtype=f32)}

    def launch():
        if use_gluon:
            gluon_stats.launch_stats(q, k, v, buf["kv"], buf["ks"], buf["vmax"], buf["qpool"], buf["kblk"], chunk, Qb,
                                     Kb, block_q, block_k, pool, pool and not dense, stages)
        else:
            pool_args = {}
            if pool:
                pool_args = dict(q_ptr=q, qpool_ptr=buf["qpool"], kblk_ptr=buf["kblk"], Qb=Qb, Kb=Kb,
                                 stride_qb=q.stride(0), stride_ql=q.stride(1), stride_qh=q.stride(2),
                                 stride_qd=q.stride(3), POOL=True, POOL_Q=not dense, BLOCK_Q=block_q, BLOCK_K=block_k)
            _linear_stats_kernel[(NC, BH)](k, v, buf["kv"], buf["ks"], buf["vmax"], H, L, NC, *k.stride(), *v.stride(),
                                           CHUNK=chunk, BLOCK=64, HEAD_D=D, KT=False, EXACT_FP8=False, STAGES=2,
                                           VMAX=pool, VT=True, KS8=True, num_warps=4, **pool_args)
    launch()
    return buf, launch, NC


def reference(q, k, v, block_q=64, block_k=128):
    B, L, H, D = k.shape
    kf = k.float().transpose(1, 2).reshape(B * H, L, D)
    vf = v.double().transpose(1, 2).reshape(B * H, L, D)
    qf = q.double().transpose(1, 2).reshape(B * H, L, D)
    phi = torch.softmax(kf, dim=-1)
    out = {"kv": torch.einsum("bld,ble->bde", phi.to(k.dtype).double(), vf), "ks": phi.double().sum(1),
           "vmax": vf.abs().amax(1)}
    Qb, Kb = math.ceil(L / block_q), math.ceil(L / block_k)
    pad = lambda x, n, blk: F.pad(x, (0, 0, 0, n * blk - L)).reshape(B * H, n, blk, D).sum(2)  # noqa: E731
    cnt = torch.full((Qb,), float(block_q), device=DEV, dtype=torch.float64)
    cnt[-1] = L - (Qb - 1) * block_q
    out["qpool"] = pad(qf, Qb, block_q) / cnt[None, :, None]
    out["kblk"] = pad(k.double().transpose(1, 2).reshape(B * H, L, D), Kb, block_k)
    return out


def summarize(buf):
    return {"kv": buf["kv"].sum(1).double(), "ks": buf["ks"].sum(1).double(), "vmax": buf["vmax"].amax(1).double(),
            "qpool": buf["qpool"].double(), "kblk": buf["kblk"].double()}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def correctness():
    cases = [dict(B=2, L=1000, H=3), dict(B=1, L=50, H=2), dict(B=1, L=4096, H=4), dict(B=2, L=3001, H=3, sliced=True),
             dict(B=1, L=3001, H=2, dtype=torch.float16), dict(B=1, L=2500, H=2, outliers=True),
             dict(B=1, L=130, H=1)]
    for case in cases:
        kw = dict(case)
        q, k, v = inputs(kw.pop("B"), kw.pop("L"), kw.pop("H"), 128, seed=len(RES["correctness"]), **kw)
        ref = reference(q, k, v)
        for pool, dense in ((True, False), (True, True), (False, False)):
            row = {"case": {k_: str(v_) for k_, v_ in case.items()}, "pool": pool, "dense": dense,
                   "supported": gluon_stats.stats_supported(q, k, v, 64, 128)}
            try:
                outs = {}
                for name, g in (("triton", False), ("gluon", True)):
                    buf, _, nc = run_stats(q, k, v, g, pool, dense)
                    s = summarize(buf)
                    outs[name] = s
                    row[name] = {"chunks": nc, "kv_rel": rel(s["kv"], ref["kv"]), "ks_rel": rel(s["ks"], ref["ks"]),
                                 "finite": bool(torch.isfinite(buf["kv"]).all() and torch.isfinite(buf["ks"]).all())}
                    if pool:
                        row[name]["vmax_equal"] = bool(torch.equal(s["vmax"], ref["vmax"]))
                        row[name]["kblk_rel"] = rel(s["kblk"], ref["kblk"])
                        if not dense:
                            row[name]["qpool_rel"] = rel(s["qpool"], ref["qpool"])
                row["gluon_vs_triton_kv_rel"] = rel(outs["gluon"]["kv"], outs["triton"]["kv"])
            except Exception as e:  # keep going: one failing case must not hide the others
                row["error"] = repr(e)[:400]
            print(row)
            RES["correctness"].append(row)
    # prepare and the whole op, Gluon statistics on and off
    w = torch.randn(128, 128, device=DEV) / math.sqrt(128) * 0.5
    b = torch.randn(128, device=DEV) * 0.02
    for (B, L, H, topk) in ((1, 4096, 4, 0.1), (2, 3001, 3, 0.1), (1, 4096, 4, 1.0), (1, 1000, 2, 0.5)):
        q, k, v = inputs(B, L, H, 128, seed=L + H)
        row = {"op": [B, L, H, 128], "topk": topk}
        try:
            preps, outs = {}, {}
            for flag in (0, 1):
                tp.DEFAULT_TUNE["lin_gluon"] = flag
                preps[flag] = tp.prepare(q, k, v, topk, 64, 128, "int8-fp8", True)
                outs[flag] = sagesla(q, k, v, topk=topk, proj_weight=w, proj_bias=b, quant="int8-fp8", backend="triton")
            tp.DEFAULT_TUNE["lin_gluon"] = 1
            r = sagesla(q, k, v, topk=topk, proj_weight=w, proj_bias=b, quant="int8-fp8", backend="torch")
            for flag in (0, 1):
                o, rr = outs[flag].double().flatten(), r.double().flatten()
                row[f"cos_ref_gluon{flag}"] = (o @ rr / (o.norm() * rr.norm())).item()
            p0, p1 = preps[0], preps[1]
            if p0["lut"] is not None:
                row["lut_equal_frac"] = (p0["lut"] == p1["lut"]).float().mean().item()
            row["kq_diff_frac"] = (p0["kq"] != p1["kq"]).float().mean().item()
            row["vq_equal"] = bool(torch.equal(p0["vq"].view(torch.uint8), p1["vq"].view(torch.uint8)))
            row["out_rel_gluon_vs_triton"] = rel(outs[1].double(), outs[0].double())
            fn = lambda: sagesla(q, k, v, topk=topk, proj_weight=w, proj_bias=b, quant="int8-fp8", backend="triton")  # noqa: E731
            row["repeat_equal"] = bool(torch.equal(fn(), outs[1]))
            g = torch.cuda.CUDAGraph()
            fn()
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                cap = fn()
            g.replay()
            torch.cuda.synchronize()
            row["graph_equal"] = bool(torch.equal(cap, outs[1]))
            row["finite"] = bool(torch.isfinite(outs[1]).all())
        except Exception as e:
            row["error"] = repr(e)[:400]
        tp.DEFAULT_TUNE["lin_gluon"] = 1
        print(row)
        RES["correctness"].append(row)


def timing(name, B, L, H, D, reps):
    q, k, v = inputs(B, L, H, D)
    w = torch.randn(D, D, device=DEV) / math.sqrt(D) * 0.5
    b = torch.randn(D, device=DEV) * 0.02
    nbytes = B * L * H * D * 2

    def add(variant, ms, moved=None):
        row = {"shape": name, "variant": variant, "ms": ms}
        if moved:
            row["GBps"] = [moved / (m * 1e-3) / 1e9 for m in ms]
        print(row)
        RES["timing"].append(row)

    x = torch.empty(3 * nbytes // 2, device=DEV, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    add("copy of 3 tensors (read + write)", bench(lambda: y.copy_(x), reps), 2 * 3 * nbytes)
    del x, y
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        add("sdpa cudnn", bench(lambda: F.scaled_dot_product_attention(qt, kt, vt), reps))
    del qt, kt, vt
    for pool in (True, False):
        moved = (3 if pool else 2) * nbytes
        _, fn, _ = run_stats(q, k, v, False, pool, False)
        add(f"stats triton, pool={pool}", bench(fn, reps), moved)
        for st in (2, 3, 4):
            _, fn, _ = run_stats(q, k, v, True, pool, False, stages=st)
            add(f"stats gluon ns{st}, pool={pool}", bench(fn, reps), moved)
    torch.cuda.empty_cache()
    for flag in (0, 1, 0, 1):
        tp.DEFAULT_TUNE["lin_gluon"] = flag
        add(f"prepare+fold, gluon stats={flag}",
            bench(lambda: tp.prepare(q, k, v, 0.1, 64, 128, "int8-fp8", True, fold=(w, q.dtype)), 1))
        add(f"op top-k 0.1 + proj_l, gluon stats={flag}",
            bench(lambda: sagesla(q, k, v, topk=0.1, proj_weight=w, proj_bias=b, quant="int8-fp8", backend="triton"), 1))
    tp.DEFAULT_TUNE["lin_gluon"] = 1
    torch.cuda.empty_cache()


def host_us(fn, n=100):
    """Host time per call (µs) on a tiny input, where the GPU work is shorter than the launch path."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def host_overhead():
    q, k, v = inputs(1, 4096, 4, 128)
    w = torch.randn(128, 128, device=DEV) / math.sqrt(128) * 0.5
    rows = {}
    for name, g in (("triton", False), ("gluon", True)):
        _, fn, _ = run_stats(q, k, v, g, True, False)
        rows[f"stats {name}"] = host_us(fn)
    for flag in (0, 1):
        tp.DEFAULT_TUNE["lin_gluon"] = flag
        rows[f"prepare+fold, gluon stats={flag}"] = host_us(
            lambda: tp.prepare(q, k, v, 0.1, 64, 128, "int8-fp8", True, fold=(w, q.dtype)))
        rows[f"op + proj_l, gluon stats={flag}"] = host_us(
            lambda: sagesla(q, k, v, topk=0.1, proj_weight=w, quant="int8-fp8", backend="triton"))
    tp.DEFAULT_TUNE["lin_gluon"] = 1
    print("host µs per call (B1 L4096 H4):", rows)
    RES["host_us"] = rows
    import cProfile
    import io
    import pstats

    op = lambda: sagesla(q, k, v, topk=0.1, proj_weight=w, quant="int8-fp8", backend="triton")  # noqa: E731
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        op()
    pr.disable()
    torch.cuda.synchronize()
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(45)
        print(buf.getvalue()[:9000])
        RES[f"op_cprofile_{key}"] = buf.getvalue()[:12000]


def kernel_profile(B, L, H, D, reps=5):
    """GPU time per kernel of the whole op (top-k 0.1 with proj_l) under torch.profiler, and the
    host-side hot spots of `prepare` (cProfile), at one Wan shape."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    q, k, v = inputs(B, L, H, D)
    w = torch.randn(D, D, device=DEV) / math.sqrt(D) * 0.5
    fn = lambda: sagesla(q, k, v, topk=0.1, proj_weight=w, quant="int8-fp8", backend="triton")  # noqa: E731
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" or getattr(ev, "device_time_total", 0):
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if t:
                per[ev.key[:60]] = t / reps / 1e3  # ms per call
    per = dict(sorted(per.items(), key=lambda kv: -kv[1]))
    print(f"kernel ms per op call (B{B} L{L} H{H}):", {k_: round(v_, 4) for k_, v_ in per.items()})
    RES.setdefault("kernel_profile", {})[f"B{B}_L{L}_H{H}"] = per
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        tp.prepare(q, k, v, 0.1, 64, 128, "int8-fp8", True, fold=(w, q.dtype))
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(12)
    print(buf.getvalue()[:3000])
    RES["prepare_cprofile"] = buf.getvalue()[:6000]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--shapes", default="13b,14b", help="timing shapes: 13b, 14b; host (launch overhead); prof (kernels of the 1.3B op, host hot spots)")
    a = ap.parse_args()
    print(RES["device"], RES["torch"], RES["triton"])
    shapes = a.shapes.split(",")
    try:
        if not a.skip_correctness:
            correctness()
        if "host" in shapes:
            host_overhead()
        if "prof" in shapes:
            kernel_profile(1, 32760, 12, 128)
        if "13b" in shapes:
            timing("wan-1.3b", 1, 32760, 12, 128, a.reps)
        if "14b" in shapes:
            timing("wan-14b", 1, 75600, 40, 128, a.reps)
    finally:
        with open(f"{a.out}/probe_gluon_stats.json", "w") as f:
            json.dump(RES, f, indent=1)


if __name__ == "__main__":
    main()
