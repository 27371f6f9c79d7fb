"""GPU benchmark of the fused norm kernels at Wan-14B 720p shapes (B1, L=75600, D=5120, H=40).

(1) correctness of every variant vs the reference / eager model code on the GPU, (2) timing of
the fused Triton kernels and of the eager PyTorch sequences they replace (do_bench, median),
(3) achieved bandwidth vs a measured device-to-device copy. Prints a table last and writes JSON
to $OUT/bench_norms.json. Run from the repo root:
    pip install --no-deps --no-build-isolation -e . -q; python benchmarks/bench_norms.py
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

try:  # installed (pip install -e .): turbocompile.kernels maps to ./kernels
    import turbocompile.kernels.norms  # noqa: F401
except ImportError:  # not installed: map turbocompile.kernels -> ./kernels by hand (before the
    import types  # package __init__ runs, since it imports the op families)

    for _name in [m for m in sys.modules if m == "turbocompile" or m.startswith("turbocompile.")]:
        del sys.modules[_name]
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, _root)
    _k = types.ModuleType("turbocompile.kernels")
    _k.__path__ = [os.path.join(_root, "kernels")]
    sys.modules["turbocompile.kernels"] = _k
    import turbocompile

    turbocompile.kernels = _k

from turbocompile.kernels.norms import ref
from turbocompile.ops import norms

torch.manual_seed(0)
DRY = os.environ.get("BENCH_DRY") == "1"  # CPU smoke run of the script logic (TRITON_INTERPRET=1, small L)
dev = "cpu" if DRY else "cuda"
dt = torch.bfloat16
# BENCH_L / BENCH_D / BENCH_H: other shapes, e.g. Wan2.1-1.3B 480p: BENCH_L=32760 BENCH_D=1536 BENCH_H=12
B, L, D, H = 1, int(os.environ.get("BENCH_L", 75600)), int(os.environ.get("BENCH_D", 5120)), int(os.environ.get("BENCH_H", 40))
d = D // H
M = B * L
RESULTS = {"device": "cpu-dry" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shape": dict(B=B, L=L, D=D, H=H), "checks": {}, "timings": []}
print(RESULTS["device"], "torch", torch.__version__, "triton", triton.__version__, flush=True)


def bench(fn):
    if DRY:
        fn()
        return 1.0
    return do_bench(fn, warmup=25, rep=200, return_mode="median")  # ms


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cos_sim(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def check(name, ok, **vals):
    RESULTS["checks"][name] = dict(ok=bool(ok), **vals)
    print(f"check {name:38s} {'OK ' if ok else 'FAIL'} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in vals.items()), flush=True)


# ---------------------------------------------------------------- copy bandwidth
big = torch.empty((1 << 20) if DRY else (1 << 30), dtype=torch.uint8, device=dev).random_(0, 255)  # 1 GiB
dst = torch.empty_like(big)
t_copy = bench(lambda: dst.copy_(big))
copy_bw = 2 * big.numel() / (t_copy * 1e-3) / 1e9
RESULTS["copy_GBps"] = copy_bw
print(f"device copy: {copy_bw:.0f} GB/s (read+write, 1 GiB)", flush=True)
del big, dst

# ---------------------------------------------------------------- inputs (random, never zeros)
x = (torch.randn(B, L, D, device=dev) * 2 + 0.5).to(dt)
y = torch.randn(B, L, D, device=dev).to(dt)
sh = torch.randn(B, 1, D, device=dev) * 0.5
sc = torch.randn(B, 1, D, device=dev) * 0.5
gate = torch.randn(B, 1, D, device=dev)
w = torch.randn(D, device=dev)
bvec = torch.randn(D, device=dev)
wq = (torch.rand(D, device=dev) + 0.5).to(dt)
f, hh, ww = 21, 60, 60  # 21·60·60 = 75600 grid positions for the 3D RoPE table
pos = torch.arange(L, device=dev)
theta = pos[:, None].float() * (10000.0 ** (-torch.arange(d // 2, device=dev).float() / (d // 2)))
cos_t, sin_t = torch.cos(theta), torch.sin(theta)
E = M * D  # elements


# ---------------------------------------------------------------- eager baselines (the model code)
def eager_ln_mod(x):
    return (F.layer_norm(x.float(), (D,), eps=1e-6).to(dt).float() * (1 + sc) + sh).to(dt)


def eager_ln_affine(x):
    return F.layer_norm(x.float(), (D,), w.float(), bvec.float(), eps=1e-6).to(dt)


def eager_head(x):
    return F.layer_norm(x.float(), (D,), eps=1e-6) * (1 + sc) + sh


def eager_res_ln_mod(x, y):
    xn = x + y * gate.to(dt)
    return xn, eager_ln_mod(xn)


def eager_rms_rope(z):
    n = (z.float() * torch.rsqrt(z.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt) * wq
    nf = n.float().view(B, L, H, d // 2, 2)
    c, s = cos_t.view(1, L, 1, -1), sin_t.view(1, L, 1, -1)
    a, b = nf[..., 0], nf[..., 1]
    return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(2).to(dt)


def eager_rms(z):
    return (z.float() * torch.rsqrt(z.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt) * wq


def eager_quant(h, fmt, gran):
    return ref.quantize_ref(h.reshape(-1, D), fmt, gran)


# ---------------------------------------------------------------- correctness on the GPU
h_t = norms.ln_modulate(x, shift=sh, scale=sc, backend="triton")
check("ln_modulate vs ref", rel(h_t, ref.layer_norm_modulate_ref(x, None, None, sh, sc)) < 4e-3,
      rel=rel(h_t, ref.layer_norm_modulate_ref(x, None, None, sh, sc)))
check("ln_modulate vs eager model", rel(h_t, eager_ln_mod(x)) < 8e-3, rel=rel(h_t, eager_ln_mod(x)),
      cos=cos_sim(h_t, eager_ln_mod(x)))
o = norms.ln_modulate(x, w, bvec, backend="triton")
check("ln affine vs eager model", rel(o, eager_ln_affine(x)) < 8e-3, rel=rel(o, eager_ln_affine(x)))
o = norms.ln_modulate(x, shift=sh, scale=sc, out_dtype=torch.float32, backend="triton")
check("head fp32 vs eager model", rel(o, eager_head(x)) < 1e-5, rel=rel(o, eager_head(x)))
xn_t, o = norms.residual_ln_modulate(x, y, gate, None, None, sh, sc, backend="triton")
xn_e, o_e = eager_res_ln_mod(x, y)
check("residual x_new bit-exact vs eager", torch.equal(xn_t, xn_e), mism=int((xn_t != xn_e).sum()))
check("residual h vs eager model", rel(o, o_e) < 8e-3, rel=rel(o, o_e))
xn_t, o = norms.residual_ln_modulate(x, y, None, w, bvec, None, None, backend="triton")
check("residual(ungated)+affine", torch.equal(xn_t, x + y) and rel(o, eager_ln_affine(x + y)) < 8e-3,
      rel=rel(o, eager_ln_affine(x + y)))
o = norms.rmsnorm_rope(x, wq, cos_t, sin_t, H, backend="triton")
check("rmsnorm_rope vs eager model", rel(o, eager_rms_rope(x)) < 8e-3, rel=rel(o, eager_rms_rope(x)),
      cos=cos_sim(o, eager_rms_rope(x)))
o = norms.rmsnorm_rope(x, wq, None, None, H, backend="triton")
check("rmsnorm vs eager model", rel(o, eager_rms(x)) < 8e-3, rel=rel(o, eager_rms(x)))
LQ = min(L, 4096)
qkv = torch.randn(1, LQ, 3 * D, device=dev).to(dt)
ks = qkv[..., D:2 * D]
o = norms.rmsnorm_rope(ks, wq, cos_t[:LQ], sin_t[:LQ], H, backend="triton")
check("rmsnorm_rope strided qkv slice", rel(o, ref.rmsnorm_rope_ref(ks, wq, cos_t[:LQ], sin_t[:LQ], H)) < 8e-3,
      rel=rel(o, ref.rmsnorm_rope_ref(ks, wq, cos_t[:LQ], sin_t[:LQ], H)))
for fmt in ("int8", "fp8"):
    q, s = norms.ln_modulate_quant(x, None, None, sh, sc, format=fmt, granularity="per_token", backend="triton")
    q_r, s_r = ref.quantize_ref(h_t.reshape(-1, D), fmt, "per_token")
    # q comes from a kernel launched with another row layout than h_t's (quant: 2 rows × 8 warps,
    # ln_modulate: 1 row × 4 warps): the fp32 statistics may differ in the last bit, which moves
    # a few elements across a bf16 boundary. Close, not exact: ≤ 1e-5 of the codes may differ.
    mism = int((q.view(torch.int8) != q_r.view(torch.int8)).sum())
    check(f"quant {fmt} per_token ~exact", mism <= 1e-5 * q.numel() and rel(s, s_r) < 1e-5,
          mism=mism, smism=int((s != s_r).sum()))
    q, s = norms.ln_modulate_quant(x, None, None, sh, sc, format=fmt, granularity="block128", backend="triton")
    q_r, s_r = ref.quantize_ref(h_t.reshape(-1, D), fmt, "block128")
    se, sre = s.repeat_interleave(128, 0)[:M].repeat_interleave(128, 1), s_r.repeat_interleave(128, 0)[:M].repeat_interleave(128, 1)
    deq, deq_r = q.float() * se, q_r.float() * sre
    check(f"quant {fmt} block128 close", rel(deq, deq_r) < 1e-2 and rel(s, s_r) < 4e-3,
          rel_deq=rel(deq, deq_r), rel_s=rel(s, s_r), exact_frac=(q.view(torch.int8) == q_r.view(torch.int8)).float().mean().item())
    del se, sre, deq, deq_r
xq, q, s = norms.residual_ln_modulate_quant(x, y, gate, None, None, sh, sc, format="int8", granularity="per_token", backend="triton")
_, h2 = norms.residual_ln_modulate(x, y, gate, None, None, sh, sc, backend="triton")
q_r, s_r = ref.quantize_ref(h2.reshape(-1, D), "int8", "per_token")
check("residual quant int8 per_token (x_new exact, q ~exact)", torch.equal(xq, xn_e) and int((q != q_r).sum()) <= 1e-5 * q.numel(),
      mism=int((q != q_r).sum()))
from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton as _lnt
from turbocompile.kernels.norms.triton_layernorm import residual_ln_modulate_triton as _rlnt

h1 = _lnt(x, None, None, sh, sc, 1e-6, dt, config=dict(stats=1))
check("stats1 (one-pass) ln_modulate vs eager model", rel(h1, eager_ln_mod(x)) < 8e-3, rel=rel(h1, eager_ln_mod(x)))
_, h1 = _rlnt(x, y, gate, None, None, sh, sc, 1e-6, dt, config=dict(stats=1))
check("stats1 (one-pass) residual h vs eager model", rel(h1, eager_res_ln_mod(x, y)[1]) < 8e-3,
      rel=rel(h1, eager_res_ln_mod(x, y)[1]))
del h1
for fmt in ("int8", "fp8"):  # the lean quantizer (qv=1) must give the very same codes on the GPU
    q0, s0 = _lnt(x, None, None, sh, sc, 1e-6, dt, quant=(fmt, "per_token"), config=dict(qv=0))
    for qv in (1, 2):
        q1, s1 = _lnt(x, None, None, sh, sc, 1e-6, dt, quant=(fmt, "per_token"), config=dict(qv=qv))
        check(f"qv{qv} {fmt} codes identical to qv0",
              torch.equal(q0.view(torch.int8), q1.view(torch.int8)) and torch.equal(s0, s1),
              mism=int((q0.view(torch.int8) != q1.view(torch.int8)).sum()))
    _, q0, s0 = _rlnt(x, y, gate, None, None, sh, sc, 1e-6, dt, quant=(fmt, "per_token"))
    _, q1, s1 = _rlnt(x, y, gate, None, None, sh, sc, 1e-6, dt, quant=(fmt, "per_token"), config=dict(qv=1))
    check(f"qv1 residual {fmt} codes identical",
          torch.equal(q0.view(torch.int8), q1.view(torch.int8)) and torch.equal(s0, s1),
          mism=int((q0.view(torch.int8) != q1.view(torch.int8)).sum()))
del q0, s0, q1, s1
have_qa = hasattr(torch.ops.turbocompile, "quantize_activation")
if not have_qa:
    try:
        from turbocompile.ops import w8a8  # noqa: F401
        have_qa = True
    except Exception as err:  # report, keep benchmarking
        print("quantize_activation unavailable:", err)
if have_qa:
    for fmt in ("int8", "fp8"):
        q, s = norms.ln_modulate_quant(x, None, None, sh, sc, format=fmt, granularity="per_token", backend="triton")
        q2, s2 = torch.ops.turbocompile.quantize_activation(h_t.reshape(-1, D), fmt, "per_token", "auto")
        mism = int((q.view(torch.int8) != q2.view(torch.int8)).sum())
        check(f"vs quantize_activation {fmt} per_token", mism <= 1e-5 * q.numel() and rel(s, s2) < 1e-5,
              mism=mism, smism=int((s != s2).sum()))
del qkv, ks, o, q, s, q_r, s_r, h2, xq
if not DRY:
    torch.cuda.empty_cache()

# ---------------------------------------------------------------- timings
# Every site: the eager sequence it replaces, then the fused kernel under several launch
# configurations (row_config keys), all in this run. "r1" = round 1's launch shape (one
# next_pow2(D) tile, one row per program, 16 warps) on today's kernel code.
import time

from turbocompile.kernels.norms.triton_layernorm import LAST_KERNEL as _LN_LAST
from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton, residual_ln_modulate_triton
from turbocompile.kernels.norms.triton_rmsnorm_rope import rmsnorm_rope_triton

T0 = time.time()
BUDGET = float(os.environ.get("BENCH_BUDGET_S", 330))
rows = []
LN_CFGS = {
    "default": None,
    "r1": dict(split=False, block_m=1, num_warps=16),
    "bm1w4": dict(block_m=1, num_warps=4),
    "bm1w8": dict(block_m=1, num_warps=8),
    "bm2w4": dict(block_m=2, num_warps=4),
    "bm2w8": dict(block_m=2, num_warps=8),
    "bm4w8": dict(block_m=4, num_warps=8),
    "nosplit_w4": dict(split=False, block_m=1, num_warps=4),
    "p4pf_w4": dict(block_m=1, num_warps=4, persist=4, prefetch=True),
}
SHORT = ("default", "r1", "bm1w4", "bm1w8", "bm2w4", "bm2w8", "bm4w8")
RMS_CFGS = {
    "default": None, "bm1w4": dict(block_m=1, num_warps=4), "bm1w8": dict(block_m=1, num_warps=8),
    "bm2w4": dict(block_m=2, num_warps=4), "bm2w8": dict(block_m=2, num_warps=8),
    "nosplit_w4": dict(block_m=1, num_warps=4, split=False),
    "bm1w2": dict(block_m=1, num_warps=2), "bm2w2": dict(block_m=2, num_warps=2),
    "bm4w4": dict(block_m=4, num_warps=4), "bm4w8": dict(block_m=4, num_warps=8),
}


def _first(o):
    return o[0] if isinstance(o, tuple) else o


ONLY = [t for t in os.environ.get("BENCH_NORMS_ONLY", "").split(",") if t]  # site-name substrings


def site(name, nbytes, make, eager, cfgs, extra=None):
    """make(cfg) -> fused callable. Times eager, then every config (each checked against the
    default config's output first). BENCH_NORMS_ONLY=a,b: only sites whose name contains a or b."""
    if ONLY and not any(t in name for t in ONLY):
        return
    te = bench(eager)
    base = _first(make(None)())
    row = dict(site=name, eager_ms=te, cfg={}, bytes=nbytes)
    for cname, cfg in cfgs.items():
        if time.time() - T0 > BUDGET:
            print(f"  [budget] skipping {name}/{cname}", flush=True)
            continue
        try:
            fn = make(cfg)
            _LN_LAST.clear()
            o = _first(fn())
            regs = _LN_LAST.get("n_regs")
            same = (rel(o.float() if o.dtype != torch.float8_e4m3fn else o.float(), base.float()) < 5e-3)
            t = bench(fn)
        except Exception as err:  # report and go on
            print(f"  {name}/{cname}: FAILED {type(err).__name__}: {str(err)[:200]}", flush=True)
            continue
        bw = nbytes / (t * 1e-3) / 1e9
        row["cfg"][cname] = dict(ms=t, GBps=bw, pct_copy=100 * bw / copy_bw, same=bool(same), n_regs=regs)
        print(f"  {name:32s} {cname:10s} {t:7.3f} ms {bw:6.0f} GB/s {100 * bw / copy_bw:5.1f}% copy"
              f"{'' if regs is None else f'  {regs} regs'}{'' if same else '  OUTPUT DIFFERS'}", flush=True)
    if extra is not None:
        row["alt_ms"] = bench(extra)
        print(f"  {name:32s} unfused alternative {row['alt_ms']:7.3f} ms", flush=True)
    td = bench(lambda: make(None)())
    row["default_ms"] = td
    row["default_pct"] = 100 * nbytes / (td * 1e-3) / 1e9 / copy_bw
    best = min(row["cfg"].items(), key=lambda kv: kv[1]["ms"]) if row["cfg"] else ("-", dict(ms=float("nan"), pct_copy=0))
    row["best"], row["best_ms"], row["best_pct"] = best[0], best[1]["ms"], best[1]["pct_copy"]
    print(f"{name:34s} eager {te:7.3f} ms | default {td:7.3f} ms ({row['default_pct']:5.1f}%) | best {best[0]} "
          f"{best[1]['ms']:7.3f} ms ({best[1]['pct_copy']:5.1f}%)", flush=True)
    rows.append(row)


bf = torch.bfloat16
# BENCH_NORMS_QUICK=1: only the quantizing epilogues (the sites below 75% in round 2), with the
# lean quantizer (qv=1) and launch shapes around the defaults, plus the unfused alternatives.
QUICK = os.environ.get("BENCH_NORMS_QUICK") == "1"
# (session 5 also measured register-lean "hold" variants and quantizing the fp32 h: all slower or
# within a point, see RESULTS.md; that code was removed again)
QCFGS = {"default": None, "qv0 (session 3)": dict(qv=0), "qv2 (amax before rounding)": dict(qv=2),
         "bm1w4": dict(block_m=1, num_warps=4), "bm2w8": dict(block_m=2, num_warps=8),
         "bm4w8": dict(block_m=4, num_warps=8), "cap96": dict(maxnreg=96)}
qa = torch.ops.turbocompile.quantize_activation if hasattr(torch.ops.turbocompile, "quantize_activation") else None
if not QUICK:
    site("ln_modulate (pre-attn/FFN)", 4 * E,
         lambda c: (lambda: ln_modulate_triton(x, None, None, sh, sc, 1e-6, bf, config=c)), lambda: eager_ln_mod(x), LN_CFGS)
    site("residual+ln_mod (gated)", 8 * E,
         lambda c: (lambda: residual_ln_modulate_triton(x, y, gate, None, None, sh, sc, 1e-6, bf, config=c)),
         lambda: eager_res_ln_mod(x, y), LN_CFGS)
site("ln_mod+quant int8 per_token", 3 * E + 4 * M,
     lambda c: (lambda: ln_modulate_triton(x, None, None, sh, sc, 1e-6, bf, quant=("int8", "per_token"), config=c)),
     lambda: eager_quant(eager_ln_mod(x), "int8", "per_token"), dict(LN_CFGS, **QCFGS) if not QUICK else QCFGS)
if not QUICK:
    site("rmsnorm + rope (H40 d128)", 4 * E + 8 * L * (d // 2),
         lambda c: (lambda: rmsnorm_rope_triton(x, wq, cos_t, sin_t, H, 1e-6, config=None if c == "legacy" else c,
                                                legacy=c == "legacy")), lambda: eager_rms_rope(x),
         dict(RMS_CFGS, r1_elem="legacy"))
    site("rmsnorm only", 4 * E, lambda c: (lambda: rmsnorm_rope_triton(x, wq, None, None, H, 1e-6,
                                                                      config=None if c == "legacy" else c,
                                                                      legacy=c == "legacy")),
         lambda: eager_rms(x), dict(RMS_CFGS, r1_elem="legacy"))
    SH = {k: LN_CFGS[k] for k in SHORT}
    site("ln affine (cross-attn pre-norm)", 4 * E,
         lambda c: (lambda: ln_modulate_triton(x, w, bvec, None, None, 1e-6, bf, config=c)), lambda: eager_ln_affine(x), SH)
    site("head ln_modulate -> fp32", 6 * E,
         lambda c: (lambda: ln_modulate_triton(x, None, None, sh, sc, 1e-6, torch.float32, config=c)),
         lambda: eager_head(x), SH)
    site("residual + ln affine (ungated)", 8 * E,
         lambda c: (lambda: residual_ln_modulate_triton(x, y, None, w, bvec, None, None, 1e-6, bf, config=c)),
         lambda: eager_ln_affine(x + y), SH)
site("ln_mod+quant fp8 per_token", 3 * E + 4 * M,
     lambda c: (lambda: ln_modulate_triton(x, None, None, sh, sc, 1e-6, bf, quant=("fp8", "per_token"), config=c)),
     lambda: eager_quant(eager_ln_mod(x), "fp8", "per_token"), QCFGS)
site("res+ln_mod+quant int8 per_token", 7 * E + 4 * M,
     lambda c: (lambda: residual_ln_modulate_triton(x, y, gate, None, None, sh, sc, 1e-6, bf,
                                                    quant=("int8", "per_token"), config=c)),
     lambda: (lambda xn_h: eager_quant(xn_h[1], "int8", "per_token"))(eager_res_ln_mod(x, y)),
     {"default": None, "stats0 bm2w8": dict(stats=0, block_m=2, num_warps=8),
      "bm1w4": dict(block_m=1, num_warps=4)})  # default (D = 5120): stats1 bm2w4
site("res+ln_mod+quant fp8 per_token", 7 * E + 4 * M,
     lambda c: (lambda: residual_ln_modulate_triton(x, y, gate, None, None, sh, sc, 1e-6, bf,
                                                    quant=("fp8", "per_token"), config=c)),
     lambda: (lambda xn_h: eager_quant(xn_h[1], "fp8", "per_token"))(eager_res_ln_mod(x, y)),
     {"default": None, "no register cap": dict(maxnreg=None),
      "stats1 bm2w4": dict(stats=1, block_m=2, num_warps=4, maxnreg=None)})
for fmt in ("int8", "fp8"):
    # block128 is composed (bf16 LN kernel, then the W8A8 block quantizer): no fused kernel, since a
    # 128-row scale block needs its band's statistics first (a fused kernel measured 1.14 ms vs 0.72)
    site(f"ln_mod + block128 {fmt} (composed, not fused)", 3 * E + 4 * triton.cdiv(M, 128) * triton.cdiv(D, 128),
         lambda c, f=fmt: (lambda: ln_modulate_triton(x, None, None, sh, sc, 1e-6, bf, quant=(f, "block128"))),
         lambda f=fmt: eager_quant(eager_ln_mod(x), f, "block128"), {"composed": None})
if qa is not None:  # the standalone activation quantizer alone (3 B/elt + scales), for reference
    hq = ln_modulate_triton(x, None, None, sh, sc, 1e-6, bf).reshape(-1, D)
    from turbocompile.kernels.w8a8.triton_quant import quantize_triton as _qt

    for fmt in ("int8", "fp8"):
        # torch's own cast as the code reference: q = (h·(qmax/amax)).to(dtype) with the same fp32 inv
        amax_t = hq.float().abs().amax(1, keepdim=True).clamp_min(1e-8)
        qmax = 448.0 if fmt == "fp8" else 128.0
        v = hq.float() * (torch.full_like(amax_t, qmax) / amax_t)
        q_torch = (v.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.int8) if fmt == "fp8"
                   else torch.round(v).clamp(-128, 127).to(torch.int8))
        del v, amax_t
        variants = {"loop (before)": dict(kernel="loop"), "rows": dict(kernel="rows"),
                    "rows bm1w4": dict(kernel="rows", block_m=1, num_warps=4),
                    "rows bm2w4": dict(kernel="rows", block_m=2, num_warps=4),
                    "rows bm1w8": dict(kernel="rows", block_m=1, num_warps=8),
                    "rows bm4w8": dict(kernel="rows", block_m=4, num_warps=8),
                    "rows nosplit": dict(kernel="rows", split=False)}
        for vname, vcfg in variants.items():
            qv_, sv_ = _qt(hq, fmt, "per_token", config=vcfg)
            mism = int((qv_.view(torch.int8) != q_torch).sum())
            t = bench(lambda f=fmt, c=vcfg: _qt(hq, f, "per_token", config=c))
            bw = (3 * E + 4 * M) / (t * 1e-3) / 1e9
            RESULTS.setdefault("standalone_quant_variants", {})[f"{fmt} {vname}"] = dict(
                ms=t, pct_copy=100 * bw / copy_bw, code_mismatch_vs_torch_cast=mism)
            print(f"  quantize per_token {fmt} {vname:14s} {t:.3f} ms ({100 * bw / copy_bw:.1f}% copy), "
                  f"codes != torch cast: {mism}", flush=True)
        del q_torch, qv_, sv_
    for fmt in ("int8", "fp8"):
        for gran in ("per_token", "block128"):
            t = bench(lambda f=fmt, g=gran: qa(hq, f, g, "auto"))
            bw = (3 * E) / (t * 1e-3) / 1e9
            RESULTS.setdefault("standalone_quant", {})[f"{fmt} {gran}"] = dict(ms=t, pct_copy=100 * bw / copy_bw)
            print(f"  standalone quantize_activation {fmt} {gran}: {t:.3f} ms ({100 * bw / copy_bw:.1f}% copy)",
                  flush=True)
    del hq
RESULTS["timings"] = rows

out_dir = os.environ.get("OUT", ".")
with open(os.path.join(out_dir, "bench_norms.json"), "w") as fh:
    json.dump(RESULTS, fh, indent=1)
import charts  # noqa: E402  (benchmarks/ is the script's directory)

charts.save(RESULTS, os.path.join(out_dir, "bench_norms.png"))

print("\n=== " + RESULTS["device"] + f" | torch {torch.__version__} | triton {triton.__version__} | copy {copy_bw:.0f} GB/s ===")
print(f"{'site (B1 L75600 D5120 bf16)':34s} {'eager':>7s} {'r1cfg':>7s} {'dflt':>7s} {'dflt%':>6s} {'best':>10s} {'best ms':>7s} {'best%':>6s}")
for r in rows:
    r1 = r["cfg"].get("r1", r["cfg"].get("r1_elem", {})).get("ms", float("nan"))
    print(f"{r['site']:34s} {r['eager_ms']:7.3f} {r1:7.3f} {r['default_ms']:7.3f} {r['default_pct']:6.1f} {r['best']:>10s} "
          f"{r['best_ms']:7.3f} {r['best_pct']:6.1f}")
bad = [k for k, v in RESULTS["checks"].items() if not v["ok"]]
print("checks:", "all OK" if not bad else "FAILED: " + ", ".join(bad))
sys.exit(1 if bad else 0)
