"""Probe (GPU): the gated residual add in the W8A8 GEMM epilogue (pass ``fuse_residual_epilogues``).

Per Wan block there are three residual sites, each a W8A8 GEMM whose output y feeds ``x + y·gate`` and the
next LayerNorm (+ the per-token 8-bit quantization for the next W8A8 linear):

* ``attn.o``  (dim -> dim, gated)  then norm3 (affine LN, no modulation)
* ``cross.o`` (dim -> dim, no gate) then norm2 (LN + AdaLN modulation)
* ``ffn.2``   (ffn_dim -> dim, gated) then the next block's norm1 (LN + modulation)

For each site, format (FP8 e4m3, INT8; per-token x per-channel) and model it times, in CUDA graphs:

  (a) today:  y = GEMM (TMA kernel)                  ; x_new, q, s = residual_ln_modulate_quant(x, y, gate, ...)
  (b) fused:  x_new = GEMM with residual epilogue    ; q, s = ln_modulate_quant(x_new, ...)

with the epilogue reading the residual tile through a TMA descriptor (``load=tma``) or with pointer loads
(``load=pointer``), and the LayerNorm with its default configuration or with the one-pass statistics
(``stats1``, what the residual kernel uses at D = 1536 / INT8 D = 5120). Checks between (a) and (b):
x_new bit for bit, the 8-bit codes and scales (differing codes counted). The GEMM and norm alone are timed
too. The per-forward estimate multiplies the per-site saving by the number of blocks.

    source benchmarks/gpu_env.sh; python3 benchmarks/probe_gemm_residual.py --out $OUT
        [--shapes 13b,14b] [--fmts fp8,int8] [--sites attn.o,cross.o,ffn.2] [--configs probe|all]
        [--budget-s 140]

Writes ``probe_gemm_residual.json`` under ``--out`` and prints a table. Autotuning: ``--configs probe`` (default)
restricts the TMA kernel's list to 3 configs (for the plain GEMM and the fused one alike) to keep the
compile time of a run under the budget; cases left when ``--budget-s`` runs out are skipped (listed in the
JSON), the most relevant first (1.3B FP8, 1.3B INT8, 14B FP8, 14B INT8).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton
import triton.testing

from _cuda_graph import graphed  # benchmarks/ is the script's directory (sys.path[0])
from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton, residual_ln_modulate_triton
from turbocompile.kernels.w8a8 import triton_gemm_residual as TR
from turbocompile.kernels.w8a8 import triton_gemm_tma as TMA
from turbocompile.kernels.w8a8.triton_gemm import gemm_path, w8a8_gemm_triton
from turbocompile.ops.w8a8 import quantize_activation, quantize_weight

# (M tokens, dim, ffn_dim, blocks): Wan2.1-1.3B 480p and Wan-14B 720p
SHAPES = {"13b": (32760, 1536, 8960, 30), "14b": (75600, 5120, 13824, 40)}
SITES = ("attn.o", "cross.o", "ffn.2")
EPS = 1e-6
BF16 = torch.bfloat16
DEV = "cuda"


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=150)


def _restrict_configs(which: str) -> None:
    if which == "all":
        return
    keep = {(128, 256, 8, 3, True), (128, 128, 8, 4, False), (128, 128, 4, 4, False)}
    full = TMA.tma_configs
    TMA.tma_configs = lambda: [c for c in full() if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                      c.num_stages, c.kwargs["EPILOGUE_SUBTILE"]) in keep]
    TMA._TUNED = TMA._TUNED_PARTIAL = None  # rebuilt with the reduced list


def _operands(m, k, n, fmt, site, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    h = torch.randn(m, k, device=DEV, generator=g).to(BF16)
    qa, sa = quantize_activation(h, fmt, "per_token", "triton")
    del h
    qw, sw = quantize_weight(torch.randn(n, k, device=DEV, generator=g) * k ** -0.5, fmt, "per_channel")
    bias = (torch.randn(n, device=DEV, generator=g) * 0.1).to(BF16)
    x = (torch.randn(1, m, n, device=DEV, generator=g) * 4).to(BF16)  # the residual stream
    mod = torch.randn(1, 6, n, device=DEV, generator=g) * 0.5  # AdaLN modulation, fp32; chunks are strided
    gate = None if site == "cross.o" else mod[:, 2:3]
    if site == "attn.o":  # norm3: affine LayerNorm, no modulation
        norm = dict(weight=1 + 0.1 * torch.randn(n, device=DEV, generator=g), bias=0.1 * torch.randn(
            n, device=DEV, generator=g), shift=None, scale=None)
    else:
        norm = dict(weight=None, bias=None, shift=mod[:, 3:4], scale=mod[:, 4:5])
    return qa, sa, qw, sw, bias, x, gate, norm


def case(key: str, site: str, fmt: str) -> dict:
    m, dim, ffn, blocks = SHAPES[key]
    k = ffn if site == "ffn.2" else dim
    n = dim
    seed = 10 * list(SHAPES).index(key) + SITES.index(site)
    qa, sa, qw, sw, bias, x, gate, nm = _operands(m, k, n, fmt, site, seed)
    w, b, sh, sc = nm["weight"], nm["bias"], nm["shift"], nm["scale"]
    quant = (fmt, "per_token")
    row = {"shape": key, "site": site, "fmt": fmt, "M": m, "K": k, "N": n, "blocks": blocks,
           "path": gemm_path(qa, qw, BF16, "per_token", "per_channel")[0], "ms": {}, "checks": {}, "configs": {}}

    def gemm():
        return w8a8_gemm_triton(qa, sa, qw, sw, bias, "per_token", "per_channel", BF16)

    def norm_res(y):
        return residual_ln_modulate_triton(x, y.view(x.shape), gate, w, b, sh, sc, EPS, BF16, quant=quant)

    def gemm_res(load):
        return TR.w8a8_gemm_residual_triton(qa, sa, qw, sw, bias, "per_token", "per_channel", x, gate, res_load=load)

    def norm(xn, cfg=None):
        return ln_modulate_triton(xn, w, b, sh, sc, EPS, BF16, quant=quant, config=cfg)

    # correctness, outside the graphs
    y = gemm()
    row["configs"]["gemm"] = str(TMA.tuned_tma_config())
    xa, qa_ref, sa_ref = norm_res(y)
    for load in ("tma", "pointer"):
        xb = gemm_res(load)
        row["configs"][f"gemm+res load={load}"] = str(TMA.tuned_tma_config())
        chk = {"x_new_bit_equal": bool(torch.equal(xb.view(torch.int16), xa.view(torch.int16))),
               "x_new_differing": int((xb != xa).sum()), "x_new_max_abs": float((xb.float() - xa.float()).abs().max())}
        for tag, cfg in (("default", None), ("stats1", {"stats": 1})):
            q, s = norm(xb, cfg)
            chk[f"codes_differing_{tag}"] = int((q.view(torch.uint8) != qa_ref.view(torch.uint8)).sum())
            chk[f"scales_equal_{tag}"] = bool(torch.equal(s, sa_ref))
        row["checks"][f"load={load}"] = chk
        del xb
    del y, xa, qa_ref, sa_ref

    # timings (each sequence in its own CUDA graph)
    x_new = gemm_res("tma")
    y = gemm()
    plan = [
        ("GEMM (writes y)", gemm),
        ("residual_ln_modulate_quant", lambda: norm_res(y)),
        ("(a) GEMM + residual_ln_modulate_quant", lambda: norm_res(gemm())),
        ("GEMM+residual load=tma", lambda: gemm_res("tma")),
        ("GEMM+residual load=pointer", lambda: gemm_res("pointer")),
        ("ln_modulate_quant default", lambda: norm(x_new)),
        ("ln_modulate_quant stats1", lambda: norm(x_new, {"stats": 1})),
        ("(b) GEMM+residual load=tma + LN default", lambda: norm(gemm_res("tma"))),
        ("(b) GEMM+residual load=tma + LN stats1", lambda: norm(gemm_res("tma"), {"stats": 1})),
        ("(b) GEMM+residual load=pointer + LN default", lambda: norm(gemm_res("pointer"))),
        ("(a) again", lambda: norm_res(gemm())),
    ]
    for name, fn in plan:
        replay = graphed(fn)
        row["ms"][name] = _bench(replay)
        del replay
    a = min(row["ms"]["(a) GEMM + residual_ln_modulate_quant"], row["ms"]["(a) again"])
    best = min((v, kk) for kk, v in row["ms"].items() if kk.startswith("(b)"))
    row["best_b"] = best[1]
    row["saved_ms"] = a - best[0]
    row["ideal_saved_ms_at_4.0TBps"] = 2.0 * m * n / 4.0e12 * 1e3  # 2 B/elt less traffic
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default="13b,14b")
    ap.add_argument("--fmts", default="fp8,int8")
    ap.add_argument("--sites", default=",".join(SITES))
    ap.add_argument("--configs", default="probe", choices=("probe", "all"))
    ap.add_argument("--budget-s", type=float, default=140.0)
    args = ap.parse_args()
    t0 = time.time()
    _restrict_configs(args.configs)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "configs": args.configs, "rows": [], "skipped": [], "errors": []}
    todo = [(key, site, fmt) for key in args.shapes.split(",") for fmt in args.fmts.split(",")
            for site in args.sites.split(",")]
    for key, site, fmt in todo:
        if time.time() - t0 > args.budget_s:
            res["skipped"].append(f"{key} {site} {fmt}")
            continue
        try:
            r = case(key, site, fmt)
        except Exception as exc:  # keep the other cases (and the JSON) when one fails
            res["errors"].append(f"{key} {site} {fmt}: {type(exc).__name__}: {str(exc)[:500]}")
            print(res["errors"][-1], flush=True)
            continue
        finally:
            torch.cuda.empty_cache()
        res["rows"].append(r)
        print(json.dumps(r), flush=True)
    res["per_forward"] = {}
    for key in args.shapes.split(","):
        for fmt in args.fmts.split(","):
            rows = [r for r in res["rows"] if r["shape"] == key and r["fmt"] == fmt]
            if len(rows) == len(args.sites.split(",")):
                blocks = SHAPES[key][3]
                res["per_forward"][f"{key} {fmt}"] = {"saved_ms": blocks * sum(r["saved_ms"] for r in rows),
                                                      "ideal_ms": blocks * sum(r["ideal_saved_ms_at_4.0TBps"]
                                                                               for r in rows)}
    res["wall_s"] = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_gemm_residual.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    _table(res)


def _table(res) -> None:
    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}  ({res['wall_s']:.0f} s)")
    hdr = f"{'shape':5} {'fmt':4} {'site':7} {'(a) ms':>8} {'(b) tma':>8} {'(b) ptr':>8} {'saved':>7} {'ideal':>6}  " \
          f"{'gemm':>6} {'gemm+r':>6} {'res-LN':>6} {'LN':>6}  x_new  codes"
    print(hdr)
    for r in res["rows"]:
        ms = r["ms"]
        a = min(ms["(a) GEMM + residual_ln_modulate_quant"], ms["(a) again"])
        chk = r["checks"]["load=tma"]
        b_tma, b_ptr = ms["(b) GEMM+residual load=tma + LN default"], ms["(b) GEMM+residual load=pointer + LN default"]
        print(f"{r['shape']:5} {r['fmt']:4} {r['site']:7} {a:8.3f} {b_tma:8.3f} {b_ptr:8.3f} {r['saved_ms']:7.3f} "
              f"{r['ideal_saved_ms_at_4.0TBps']:6.3f}  {ms['GEMM (writes y)']:6.3f} "
              f"{ms['GEMM+residual load=tma']:6.3f} "
              f"{ms['residual_ln_modulate_quant']:6.3f} {ms['ln_modulate_quant default']:6.3f}  "
              f"{'equal' if chk['x_new_bit_equal'] else chk['x_new_differing']:>5}  "
              f"{chk['codes_differing_default']}/{chk['codes_differing_stats1']}")
    for k, v in res["per_forward"].items():
        print(f"per forward {k}: saved {v['saved_ms']:.3f} ms (ideal {v['ideal_ms']:.3f} ms)")
    for s in res["skipped"]:
        print("skipped (budget):", s)
    for e in res["errors"]:
        print("error:", e)


if __name__ == "__main__":
    main()
