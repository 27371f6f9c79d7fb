"""SageSLA's preparation chain and attention-kernel knobs on the GPU: the block map in one launch, chained
launches (PDL), top-k launch shapes and the attention epilogue's KVW through registers or by TMA, A/B in
one process against the default, whole op (issue 4's measurement). (Session 22 also compared softmax
exponentials partly on the FMA pipe: branch `exp/attn-exp-poly`, RESULTS.md.)

    source benchmarks/gpu_env.sh; PYTHONUNBUFFERED=1 python3 benchmarks/probe_prep_chain.py --out $OUT
    ... --topk 1.0 --no-proj --variants "kvw by registers"    # dense mode, without proj_l

For each variant (a set of `DEFAULT_TUNE` overrides; ``kvw_tma`` sets `gluon_attn.KVW_TMA`, default on) and
shape:
1. correctness: every LUT row a valid top-T of the exact (fp64, key-mean centred) block scores up to
   TF32 rounding, the share of rows that differ from the default's LUT (near-ties), the op's output vs
   the default's and vs the torch reference of the same semantics (cos, rel-L1, rel-L2; the reference
   only at shapes up to `REF_MAX_L`), finite, the same bits from a second eager call, and a CUDA-graph
   replay equal to the eager call (`bench_sagesla.stream_join_checks`);
2. time: eager and CUDA-graph replay of the whole op (top-k 0.1 with proj_l + bias unless told
   otherwise), rounds interleaved across the variants, next to cuDNN SDPA in the same run;
3. CUDA time per kernel of three eager calls (torch.profiler).
JSON: $OUT/probe_prep_chain.json (or the name given by --json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import traceback

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from _cuda_graph import graphed  # benchmarks/ is the script's directory (sys.path[0])
from bench_sagesla import bench, metrics, proj, qkv, stream_join_checks
from turbocompile.kernels.sagesla import gluon_attn
from turbocompile.kernels.sagesla.triton_prep import DEFAULT_TUNE, prepare
from turbocompile.ops.attention import sagesla

SHAPES = {"13b": (1, 32760, 12, 128), "14b": (1, 75600, 40, 128), "small": (2, 3001, 3, 128)}
VARIANTS = {
    "default": {},
    "top-k 1 warp": dict(topk_warps=1),
    "top-k 2 warps": dict(topk_warps=2),
    "key means pipelined": dict(km_stages=3),
    "block map fused": dict(topk="fused"),
    "block map fused 32 rows": dict(topk="fused", map_rows=32),
    "block map fused 8 warps": dict(topk="fused", map_warps=8),
    "block map fused fp32 scores": dict(topk="fused", scores="fp32"),
    "pdl": dict(pdl=1),
    "pdl + top-k 1 warp": dict(pdl=1, topk_warps=1),
    "pdl + block map fused": dict(pdl=1, topk="fused"),
    "kvw by registers": dict(kvw_tma=0),  # the default before session 22
}
REF_MAX_L = 4096  # the torch reference (fp32, dense scores per head) only at the small shapes
BASE_TUNE = dict(DEFAULT_TUNE)
BASE_KVW_TMA = gluon_attn.KVW_TMA


def exact_scores(q, k, block_q, block_k):
    """fp64 q̄·(k̄ − km) [B*H, Qb, Kb] over the actual rows of each block."""
    B, L, H, D = q.shape
    Qb, Kb = math.ceil(L / block_q), math.ceil(L / block_k)
    qf, kf = (t.double().permute(0, 2, 1, 3).reshape(B * H, L, D) for t in (q, k))
    kf = kf - kf.mean(1, keepdim=True)
    qp = F.pad(qf, (0, 0, 0, Qb * block_q - L)).view(B * H, Qb, block_q, D).sum(2)
    kp = F.pad(kf, (0, 0, 0, Kb * block_k - L)).view(B * H, Kb, block_k, D).sum(2)
    qn = torch.full((Qb,), float(block_q), device=q.device, dtype=torch.float64)
    kn = torch.full((Kb,), float(block_k), device=q.device, dtype=torch.float64)
    qn[-1], kn[-1] = L - (Qb - 1) * block_q, L - (Kb - 1) * block_k
    return (qp / qn[:, None]) @ (kp / kn[:, None]).transpose(1, 2)


def lut_checks(lut, ref_lut, scores):
    """(worst violation of the top-T property / score scale, share of rows unlike the default's)."""
    sel = lut.long()
    kept = scores.gather(-1, sel).amin(-1)
    dropped = scores.scatter(-1, sel, -math.inf).amax(-1)
    viol = (dropped - kept).clamp(min=0).amax().item() / scores.abs().amax().item()
    differ = (lut != ref_lut).any(-1).double().mean().item()
    return viol, differ


def set_tune(tune):
    tune = dict(tune)
    gluon_attn.KVW_TMA = bool(tune.pop("kvw_tma", BASE_KVW_TMA))
    DEFAULT_TUNE.clear()
    DEFAULT_TUNE.update(BASE_TUNE, **tune)


def run_shape(name, reps, res, variants, topk, with_proj):
    B, L, H, D = SHAPES[name]
    print(f"== {name}: B{B} L{L} H{H} D{D}, top-k {topk}{' + proj_l' if with_proj else ''} ==", flush=True)
    q, k, v = qkv(B, L, H, D)
    w, b = proj(D) if with_proj else (None, None)
    op = lambda: sagesla(q, k, v, topk=topk, proj_weight=w, proj_bias=b, quant="int8-fp8", backend="triton")  # noqa: E731
    dense = topk >= 1.0
    scores = None if dense else exact_scores(q, k, 64, 128)
    set_tune({})
    ref_out, ref_lut = op(), prepare(q, k, v, topk, 64, 128, "int8-fp8", w is not None)["lut"]
    torch_out = None
    if L <= REF_MAX_L:
        torch_out = sagesla(q, k, v, topk=topk, proj_weight=w, proj_bias=b, quant="none", backend="torch")
    calls, rows = {}, {}
    for vname in variants:
        row = dict(shape=name, variant=vname, tune=VARIANTS[vname], topk=topk, proj_l=with_proj)
        try:
            set_tune(VARIANTS[vname])
            prep = prepare(q, k, v, topk, 64, 128, "int8-fp8", w is not None)
            row["pdl_active"] = prep["pdl"]
            if not dense:
                row["lut_violation"], row["lut_rows_differ"] = lut_checks(prep["lut"], ref_lut, scores)
            out = op()
            row["finite"] = bool(torch.isfinite(out).all())
            row["vs_default"] = metrics(out, ref_out)
            if torch_out is not None:  # cos, rel-L1, rel-L2 vs the unquantized semantics (quant="none")
                row["vs_torch_ref"] = metrics(out, torch_out)
            row["repeat_equal"], row["graph_equal"] = stream_join_checks(q, k, v, topk, w, b, out)
            calls[vname] = (op, graphed(op))
        except Exception as e:  # one broken variant must not hide the others
            row["error"] = repr(e)[:300]
            traceback.print_exc()
        rows[vname] = row
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        sd = lambda: F.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
        sdpa = [bench(sd) for _ in range(2)]
        sdpa_graph = bench(graphed(sd))
    times = {vname: {"eager": [], "graph": []} for vname in calls}
    for _ in range(reps):  # interleaved rounds: drift hits every variant alike
        for vname, (eager, replay) in calls.items():
            set_tune(VARIANTS[vname])
            times[vname]["eager"].append(bench(eager))
            times[vname]["graph"].append(bench(replay))
    from torch.profiler import ProfilerActivity, profile
    for vname, (eager, _) in calls.items():
        set_tune(VARIANTS[vname])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                eager()
            torch.cuda.synchronize()
        kern = {}
        for ev in prof.key_averages():
            us = getattr(ev, "device_time_total", 0) or 0
            if us > 0:
                kern[ev.key[:60]] = round(us / 3 / 1e3, 4)
        rows[vname]["kernels_ms"] = dict(sorted(kern.items(), key=lambda kv: -kv[1]))
    sd_ms = statistics.median(sdpa)
    for vname, row in rows.items():
        if vname in times:
            t = times[vname]
            row.update(eager_ms=t["eager"], graph_ms=t["graph"], sdpa_ms=sdpa, sdpa_graph_ms=sdpa_graph,
                       x_sdpa_eager=sd_ms / statistics.median(t["eager"]),
                       x_sdpa_graph=sdpa_graph / statistics.median(t["graph"]))
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
    set_tune({})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default="small,13b,14b", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--reps", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    ap.add_argument("--topk", type=float, default=0.1, help="1.0 = dense mode")
    ap.add_argument("--no-proj", action="store_true", help="without proj_l (no linear branch)")
    ap.add_argument("--json", default="probe_prep_chain.json", help="file name under --out")
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    bad = [s for s in shapes if s not in SHAPES] + [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown shape/variant {bad}; valid shapes {sorted(SHAPES)}, variants {list(VARIANTS)}")
    if "default" not in variants:
        variants.insert(0, "default")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": []}
    print(res["device"], res["torch"], "triton", res["triton"], flush=True)
    for name in shapes:
        try:
            run_shape(name, args.reps, res, variants, args.topk, not args.no_proj)
        except Exception:
            traceback.print_exc()
        with open(os.path.join(args.out, args.json), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
