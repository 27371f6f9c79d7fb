"""Probe (GPU): SageSLA's pooling kernel (prep pass A) folded into the q/k RMSNorm+RoPE kernels.

At Wan-1.3B 480p and Wan-14B 720p self-attention shapes, with q, k, v as strided slices of one
fused q/k/v projection output (as `fuse_sibling_gemms` leaves them):

* correctness: ``rmsnorm_rope_pool``'s normalized output bit-equal to ``rmsnorm_rope``'s; its pooled
  q means, k sums and |v| maxima vs a torch fp32 computation from the stored rows; the attention
  output with precomputed statistics vs the plain op (cosine, relative L2, LUT agreement);
* time: q norm + k norm alone (plain vs pooling, a small sweep of the pooling kernel's launch
  config), the SageSLA prep alone (with / without pass A), and the whole chain
  norm q + norm k + sagesla (top-k 0.1, with proj_l) in a CUDA graph.

    python benchmarks/probe_attn_pooling.py --out $OUT [--shapes 13b,14b]

Writes ``probe_attn_pooling.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import triton
import triton.testing

from _cuda_graph import graphed  # benchmarks/ is the script's directory (sys.path[0])
from turbocompile.kernels.norms.triton_rmsnorm_rope import rmsnorm_rope_triton
from turbocompile.kernels.norms.triton_rmsnorm_rope_pool import rmsnorm_rope_pool_triton
from turbocompile.kernels.sagesla.triton_prep import prepare

# (L, heads, dim): Wan2.1-1.3B 480p and Wan-14B 720p
SHAPES = {"13b": (32760, 12, 1536), "14b": (75600, 40, 5120)}
BLOCK_Q, BLOCK_K, TOPK, EPS = 64, 128, 0.1, 1e-6
SWEEP = [dict(sub=s, num_warps=w, stages=st) for s in (1, 2, 4) for w in (2, 4) for st in (2, 3, 4)]


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _cos(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _pool_torch(x, H, rows, reduce):
    """[1, L, H*D] -> [H, ceil(L/rows), D] fp32 per-block mean / sum / absmax over actual rows."""
    _, L, HD = x.shape
    D = HD // H
    nb = math.ceil(L / rows)
    xf = x.float().reshape(L, H, D).permute(1, 0, 2)
    pad = nb * rows - L
    if reduce == "absmax":
        xp = torch.nn.functional.pad(xf.abs(), (0, 0, 0, pad))
        return xp.reshape(H, nb, rows, D).amax(2)
    s = torch.nn.functional.pad(xf, (0, 0, 0, pad)).reshape(H, nb, rows, D).sum(2)
    if reduce == "mean":
        n = torch.full((nb,), rows, device=x.device, dtype=torch.float32)
        n[-1] = L - (nb - 1) * rows
        s = s / n[None, :, None]
    return s


def probe(L, H, dim) -> dict:
    D = dim // H
    torch.manual_seed(0)
    qkv = torch.randn(1, L, 3 * dim, device="cuda", dtype=torch.bfloat16)
    zq, zk, v = qkv[..., :dim], qkv[..., dim:2 * dim], qkv[..., 2 * dim:]
    wq, wk = ((1 + 0.1 * torch.randn(dim, device="cuda")).to(torch.bfloat16) for _ in range(2))
    ang = torch.rand(L, D // 2, device="cuda") * 6.28
    cos, sin = ang.cos(), ang.sin()
    pw = torch.randn(D, D, device="cuda", dtype=torch.bfloat16) * 0.02
    pb = torch.randn(D, device="cuda", dtype=torch.bfloat16) * 0.02
    row = {"shape": f"L{L} H{H} D{D}", "checks": {}, "ms": {}}

    def plain_norms():
        return rmsnorm_rope_triton(zq, wq, cos, sin, H, EPS), rmsnorm_rope_triton(zk, wk, cos, sin, H, EPS)

    def pool_norms(cfg=None):
        q, qp, _ = rmsnorm_rope_pool_triton(zq, wq, cos, sin, H, EPS, BLOCK_Q, True, config=cfg)
        k, ks, vm = rmsnorm_rope_pool_triton(zk, wk, cos, sin, H, EPS, BLOCK_K, False, v=v, config=cfg)
        return q, k, qp, ks, vm

    # -- correctness
    q0, k0 = plain_norms()
    q1, k1, qp, ks, vm = pool_norms()
    c = row["checks"]
    c["q_out_bit_equal"] = torch.equal(q0, q1)
    c["k_out_bit_equal"] = torch.equal(k0, k1)
    c["q_pool_rel"] = _rel(qp, _pool_torch(q1, H, BLOCK_Q, "mean"))
    c["k_blocksum_rel"] = _rel(ks, _pool_torch(k1, H, BLOCK_K, "sum"))
    c["v_absmax_equal"] = torch.equal(vm, _pool_torch(v, H, BLOCK_K, "absmax"))
    qh, kh, vh = q1.view(1, L, H, D), k1.view(1, L, H, D), v.view(1, L, H, D)
    pooled = (qp, ks, vm)
    p0 = prepare(qh, kh, vh, TOPK, BLOCK_Q, BLOCK_K, "int8-fp8", True)
    p1 = prepare(qh, kh, vh, TOPK, BLOCK_Q, BLOCK_K, "int8-fp8", True, pooled=pooled)
    c["lut_equal_frac"] = (p0["lut"] == p1["lut"]).float().mean().item()
    c["kq_equal_frac"] = (p0["kq"] == p1["kq"]).float().mean().item()
    c["vscale_rel"] = _rel(p1["vscale"], p0["vscale"])
    op = torch.ops.turbocompile.sagesla
    o0 = op(qh, kh, vh, TOPK, pw, pb, BLOCK_Q, BLOCK_K, "int8-fp8", "triton")
    o1 = op(qh, kh, vh, TOPK, pw, pb, BLOCK_Q, BLOCK_K, "int8-fp8", "triton", *pooled)
    c["attn_cos"] = _cos(o1, o0)
    c["attn_rel"] = _rel(o1, o0)
    c["attn_bit_equal"] = torch.equal(o0, o1)
    print(json.dumps(c), flush=True)

    # -- timing
    ms = row["ms"]
    ms["norms plain (q + k)"] = _bench(plain_norms)
    ms["norms pooling (q + k,v), default config"] = _bench(pool_norms)
    sweep = {}
    for cfg in SWEEP:
        try:
            qc, kc = pool_norms(cfg)[:2]
            sweep[json.dumps(cfg)] = {"ms": _bench(lambda: pool_norms(cfg)),
                                      "bit_equal": torch.equal(qc, q0) and torch.equal(kc, k0)}
        except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of resources)
            sweep[json.dumps(cfg)] = f"{type(e).__name__}: {str(e)[:80]}"
    row["pool_sweep_ms"] = sweep
    ms["prep with pass A"] = _bench(lambda: prepare(qh, kh, vh, TOPK, BLOCK_Q, BLOCK_K, "int8-fp8", True))
    ms["prep, pooled given"] = _bench(lambda: prepare(qh, kh, vh, TOPK, BLOCK_Q, BLOCK_K, "int8-fp8", True,
                                                      pooled=pooled))

    def chain_plain():
        q, k = plain_norms()
        return op(q.view(1, L, H, D), k.view(1, L, H, D), vh, TOPK, pw, pb, BLOCK_Q, BLOCK_K, "int8-fp8", "triton")

    def chain_pool():
        q, k, a, b, m = pool_norms()
        return op(q.view(1, L, H, D), k.view(1, L, H, D), vh, TOPK, pw, pb, BLOCK_Q, BLOCK_K, "int8-fp8", "triton",
                  a, b, m)

    ms["chain plain (norms + sagesla), CUDA graph"] = _bench(graphed(chain_plain))
    ms["chain pooling (norms + sagesla), CUDA graph"] = _bench(graphed(chain_pool))
    ms["chain plain again"] = _bench(graphed(chain_plain))
    row["bytes_norms_plain_GB"] = 4 * L * dim * 2 / 1e9
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default="13b,14b")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": []}
    for key in args.shapes.split(","):
        row = probe(*SHAPES[key])
        print(json.dumps(row, indent=1), flush=True)
        res["rows"].append(row)
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "probe_attn_pooling.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
