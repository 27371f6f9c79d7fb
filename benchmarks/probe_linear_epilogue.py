"""SageSLA's linear branch on the GPU: its cost in the attention kernels and the fold kernel.

    source benchmarks/gpu_env.sh; PYTHONUNBUFFERED=1 python3 benchmarks/probe_linear_epilogue.py --out $OUT

1. correctness: the Gluon kernel (linear branch in its epilogue) and the Triton kernel, each vs the
   torch reference of the op, with proj_l, at 1, 2, 3 and more key blocks per query block, dense,
   D 64 and 128, odd L;
2. timing at the Wan shapes (top-k 0.1): attention with the linear branch minus without (fold
   included); the fold (statistics partials summed, proj_l folded) as one kernel vs the torch ops
   it replaced, and the statistics kernel at a few grid sizes.
JSON to $OUT/probe_linear_epilogue.json. (Session 14's first run also timed KVWᵀ by TMA in the
Gluon epilogue, branch exp/gluon-lin-tma: not faster.)
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import triton

from turbocompile.kernels.sagesla.linear_fold import fold_linear, fold_proj, linear_state
from turbocompile.kernels.sagesla.triton_attn import launch_attn
from turbocompile.kernels.sagesla.triton_prep import prepare
from turbocompile.ops.attention import sagesla

DEV = "cuda"
PATHS = [("gluon epilogue", dict(linear_cfg=dict(where="epilogue"), kernel="gluon")),
         ("triton kernel", dict(kernel="triton"))]


def metrics(out, ref):
    o, r = out.double().flatten(), ref.double().flatten()
    return {"cos": (o @ r / (o.norm() * r.norm())).item(), "rel_l2": ((o - r).norm() / r.norm()).item()}


def ms_of(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def inputs(B, L, H, D, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, D, device=DEV, generator=g).to(torch.bfloat16) for _ in range(3))
    w = torch.randn(D, D, device=DEV, generator=g) / math.sqrt(D) * 0.5
    b = torch.randn(D, device=DEV, generator=g) * 0.02
    return q, k, v, w, b


def correctness(res):
    cases = [(1, 256, 2, 128, 0.1), (1, 512, 2, 128, 0.5), (1, 1024, 2, 64, 0.4), (2, 3001, 3, 64, 0.1),
             (1, 4096, 4, 128, 0.1), (1, 8192, 2, 128, 0.2), (1, 1000, 2, 128, 1.0), (1, 77, 1, 64, 1.0)]
    for B, L, H, D, topk in cases:
        q, k, v, w, b = inputs(B, L, H, D, seed=L)
        prep = prepare(q, k, v, topk, 64, 128, "int8-fp8", True)
        ref = sagesla(q, k, v, topk=topk, proj_weight=w, proj_bias=b, quant="int8-fp8", backend="torch")
        outs = {}
        row = {"shape": [B, L, H, D], "topk": topk, "key_blocks_per_q_block": prep["T"]}
        for name, kw in PATHS:
            try:
                o = launch_attn(q, k, v, prep, w, b, 64, 128, **kw)
                torch.cuda.synchronize()
                outs[name] = o
                row[name] = dict(vs_ref=metrics(o, ref), finite=bool(torch.isfinite(o).all()))
            except Exception as e:  # keep going: one broken path must not hide the others
                row[name] = {"error": repr(e)[:300]}
        if len(outs) == 2:
            row["gluon_vs_triton"] = metrics(outs["gluon epilogue"], outs["triton kernel"])
        print(json.dumps(row), flush=True)
        res["correctness"].append(row)


def timing(res, name, B, L, H, D, topk=0.1):
    q, k, v, w, b = inputs(B, L, H, D)
    prep = prepare(q, k, v, topk, 64, 128, "int8-fp8", True)
    t0 = ms_of(lambda: launch_attn(q, k, v, prep, None, None, 64, 128))
    row = {"shape": name, "topk": topk, "attention_no_linear_ms": t0}
    for pname, kw in PATHS[:1]:
        t = ms_of(lambda kw=kw: launch_attn(q, k, v, prep, w, b, 64, 128, **kw))
        row[pname] = {"ms": t, "linear_ms": t - t0}
    # the fold alone: one kernel vs the torch ops of session 13
    row["fold_kernel_ms"] = ms_of(lambda: fold_linear(prep, w, q.dtype))

    def torch_fold():
        kv, ks = linear_state(prep)
        return fold_proj(kv, w, q.dtype), ks

    row["fold_torch_ms"] = ms_of(torch_fold)
    kvw = fold_linear(prep, w, q.dtype)[0]
    row["fold_max_abs_diff"] = (kvw.float() - torch_fold()[0].float()).abs().max().item()
    for ncb, warps in ((1, 4), (4, 4), (8, 4), (4, 8), (8, 8), (16, 8)):
        row[f"fold kernel, {ncb} partials per step, {warps} warps"] = ms_of(
            lambda ncb=ncb, warps=warps: fold_linear(prep, w, q.dtype, ncb=ncb, num_warps=warps))
    row["fold_partials"] = list(prep["kv_parts"].shape)
    # the statistics kernel's grid (programs in all) with the fold that follows it
    for progs in (264, 528, 1024):
        tune = dict(progs_l=progs)
        pp = prepare(q, k, v, topk, 64, 128, "int8-fp8", True, tune=tune)
        row[f"prep+fold, {progs} statistics programs"] = ms_of(
            lambda tune=tune: fold_linear(prepare(q, k, v, topk, 64, 128, "int8-fp8", True, tune=tune), w, q.dtype))
        row[f"fold alone, {progs} statistics programs"] = ms_of(lambda pp=pp: fold_linear(pp, w, q.dtype))
    print(json.dumps(row), flush=True)
    res["timing"].append(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "correctness": [], "timing": []}
    print(res["device"], res["torch"], res["triton"], flush=True)
    correctness(res)
    timing(res, "B1 H12 L32760 D128", 1, 32760, 12, 128)
    timing(res, "B1 H40 L75600 D128", 1, 75600, 40, 128)
    with open(os.path.join(args.out, "probe_linear_epilogue.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
