"""Benchmark (GPU): Wan's cross-attention between the q and o projections, unfused vs ``norm_attention_quant``.

What ``fuse_text_attention`` replaces, timed as CUDA-graph replays at the real shapes (Wan2.1-1.3B 480p and
Wan-14B 720p, 512 text keys, a prompt of ``--prompt-tokens`` real tokens zero-padded to 512):

* unfused, as ``turbo-fp8`` runs it: ``rmsnorm_rope`` (no RoPE) -> cuDNN SDPA over all 512 keys ->
  ``quantize_activation`` per token (FP8);
* unfused with ``merge_padding_keys``: the same with ``tail_merged_attention``;
* fused: ``norm_attention_quant`` (FP8 codes at the per-sample scale max|v| / 448) over all keys and over the
  merged keys, with its default attention kernel (the Gluon one on Hopper) and, where that is Gluon, the Triton
  kernel too, plus a sweep of the Triton kernel's launch configs; the parts (rstd pass, attention +
  quantization, the Gluon kernel at one and two persistent programs per SM, with 64- or 128-key blocks) alone;
* with the q projection in front (FP8 per-token x per-channel W8A8 GEMM, [L, D] x [D, D]), merged keys: the
  q GEMM then the fused op with its rstd pass (``fuse_text_attention`` with ``sumsq_from_gemm: false``), against
  the q GEMM writing z's sums of squares from its epilogue (``w8a8_linear_prequant_sumsq``) then the fused op
  without the rstd pass (the default); each GEMM alone, the fused op with the sums alone, and its attention
  kernel alone given a precomputed rstd (the floor of any way of getting the statistic). Checked in the same
  run: both chains' codes agree (:func:`check_q_gemm_sumsq`); the autotuned GEMM configs are recorded.

Checks at full size (same run): the fused op against its reference (``norm_attention_quant_ref``: dequantized
relative error, scales equal), and both paths' dequantized codes against the unquantized fp32 attention output
(what the bound scale costs against per-token abs-max scales). Reports the HBM traffic floor of the fused op
(read z twice, write codes and scales) against a device copy measured in the same run.

    python3 benchmarks/bench_text_attention.py --out $OUT [--shapes 13b,14b] [--prompt-tokens 100] [--sweep]

Writes ``text_attention.json`` and ``text_attention.png``, and exits with status 1 when a check of the q GEMM
variant fails. Without a GPU, ``TRITON_INTERPRET=1 python3 benchmarks/bench_text_attention.py --cpu-check`` runs
that check alone on a small shape in Triton's interpreter (the TMA GEMM route forced), timing nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import charts  # benchmarks/ is the script's directory (sys.path[0])
from _cuda_graph import graphed
from turbocompile.kernels.text_attention import ref as text_ref
from turbocompile.kernels.norms.ref import rmsnorm_rope_ref
from turbocompile.kernels.text_attention import triton_norm_attn_quant as fused_mod
from turbocompile.kernels.text_attention.gluon_norm_attn_quant import norm_attention_quant_gluon
from turbocompile.kernels.w8a8.ref import granule_sumsq_ref
from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_sumsq_triton, w8a8_gemm_triton
from turbocompile.ops.norms import rmsnorm_rope
from turbocompile.ops.text_attention import key_tail_start, tail_merged_attention, value_bound
from turbocompile.ops.w8a8 import quantize_activation, quantize_weight

# (L, heads, dim): Wan2.1-1.3B 480p x 81 frames and Wan-14B 720p x 81 frames
SHAPES = {"13b": (32760, 12, 1536), "14b": (75600, 40, 5120)}
TEXT = 512
SWEEP = [  # launch configs of the fused op (DEFAULT_CONFIG is timed as "fused, merged keys")
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"RSTD_ROWS": 16, "RSTD_COLS": 512, "RSTD_WARPS": 4},
    {"RSTD_ROWS": 4, "RSTD_COLS": 1024, "RSTD_WARPS": 4},
    {"RSTD_ROWS": 32, "RSTD_COLS": 256, "RSTD_WARPS": 8},
]


def _bench(fn) -> float:
    return triton.testing.do_bench(graphed(fn), warmup=25, rep=200)


def _copy_gbps() -> float:
    x = torch.empty(1 << 29, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=100)
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def _rel(codes, scales, r) -> float:
    a = codes.float() * scales
    return ((a - r).norm() / r.norm()).item()


# agreement of the two q GEMM chains (check_q_gemm_sumsq). On one z the statistic is summed in another fp32 order,
# so a q element may round the other way and move a code now and then; nothing else differs. Between the chains z
# itself may differ by one bf16 rounding (Triton's interpreter truncates the plain GEMM's bf16 cast; on a GPU both
# GEMMs round to nearest even and z is expected equal).
SUMSQ_CHECK = {"codes_differing_max": 1e-3, "dequantized_rel_max": 1e-3, "sumsq_rel_max": 1e-5,
               "z_rel_max": 8e-3, "chains_dequantized_rel_max": 2e-2}


def q_gemm_operands(L: int, D: int, device: str, seed: int = 1) -> tuple:
    """FP8 per-token codes and scales of a random bf16 activation [L, D] (the q projection's input), and an FP8
    per-channel [D, D] weight with bias scaled so that z = GEMM + bias has a std near 3, like ``run_shape``'s z."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(L, D, device=device, generator=g).to(torch.bfloat16)
    wq = torch.randn(D, D, device=device, generator=g) * (3.0 / math.sqrt(D))
    bias = (torch.randn(D, device=device, generator=g) * 0.5).to(torch.bfloat16)
    qx, sx = quantize_activation(x, "fp8", "per_token")
    qw, sw = quantize_weight(wq, "fp8", "per_channel")
    return qx, sx, qw, sw, bias


def q_gemm_chains(ops: tuple, w, k, v, vb, tail, H: int, use_tma: bool | None = None, cfg: dict | None = None):
    """``(with_rstd, with_sumsq, fused)``: q GEMM -> ``norm_attention_quant`` (rstd pass over z), and the q GEMM
    that writes z's granule sums of squares -> ``norm_attention_quant(sumsq=...)`` (no rstd pass); each returns
    ``(codes, scales, z [L, D], sumsq | None)``. ``fused(z, sumsq=None)``: the fused op alone on a given z.
    ``use_tma``: the GEMMs' route (None: their default)."""
    qx, sx, qw, sw, b = ops
    L, D = qx.shape[0], qw.shape[0]

    def fused(y, sumsq=None):
        return fused_mod.norm_attention_quant_triton(y.view(1, L, D), w, k, v, vb, tail, H, 1e-6, config=cfg,
                                                     sumsq=sumsq)

    def with_rstd():
        y = w8a8_gemm_triton(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16, use_tma=use_tma)
        return (*fused(y), y, None)

    def with_sumsq():
        y, ss = w8a8_gemm_sumsq_triton(qx, sx, qw, sw, b, torch.bfloat16, use_tma=use_tma)
        return (*fused(y, ss), y, ss)

    return with_rstd, with_sumsq, fused


def _dequant_rel(c, s, c_ref, s_ref) -> float:
    d, d_ref = c.float() * s, c_ref.float() * s_ref
    return ((d - d_ref).norm() / d_ref.norm().clamp_min(1e-30)).item()


def check_q_gemm_sumsq(with_rstd, with_sumsq, fused) -> dict:
    """The chains of :func:`q_gemm_chains` on the same operands: z from either GEMM; the epilogue's sums of squares
    against torch's sums over the z it stored; the fused op with the sums against the fused op with its rstd pass
    on that same z (codes, scales); and the two whole chains. ``agree``: every number within
    :data:`SUMSQ_CHECK` and the scales equal."""
    c0, s0, y0, _ = with_rstd()
    c1, s1, y1, ss = with_sumsq()
    c2, s2 = fused(y1)  # the rstd pass on the sumsq GEMM's own z: isolates the statistic
    want = granule_sumsq_ref(y1)
    out = {
        "z_equal (plain vs sumsq GEMM epilogue)": bool(torch.equal(y0, y1)),
        "z_rel_diff": ((y1.float() - y0.float()).norm() / y0.float().norm().clamp_min(1e-30)).item(),
        "sumsq_rel": ((ss - want).abs() / want.clamp_min(1e-30)).max().item() if want.numel() else 0.0,
        "same z: codes_differing": (c1.float() != c2.float()).float().mean().item(),
        "same z: dequantized_rel": _dequant_rel(c1, s1, c2, s2),
        "chains: codes_differing": (c1.float() != c0.float()).float().mean().item(),
        "chains: dequantized_rel": _dequant_rel(c1, s1, c0, s0),
        "scales_equal": bool(torch.equal(s0, s1) and torch.equal(s1, s2)),
    }
    lim = SUMSQ_CHECK
    out["agree"] = (out["same z: codes_differing"] <= lim["codes_differing_max"]
                    and out["same z: dequantized_rel"] <= lim["dequantized_rel_max"]
                    and out["sumsq_rel"] <= lim["sumsq_rel_max"] and out["z_rel_diff"] <= lim["z_rel_max"]
                    and out["chains: dequantized_rel"] <= lim["chains_dequantized_rel_max"] and out["scales_equal"])
    return out


def cpu_check(L: int = 70, H: int = 3, d: int = 64, prompt: int = 9) -> dict:
    """:func:`check_q_gemm_sumsq` at a small shape on the CPU (Triton's interpreter, TMA GEMM route forced). The
    default D = 192 is not a multiple of 128: the last granule of the sums is partial."""
    D = H * d
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(D, generator=g) + 0.5).to(torch.bfloat16)
    k = (torch.randn(1, 24, H, d, generator=g) * 1.5).to(torch.bfloat16)
    v = (torch.randn(1, 24, H, d, generator=g) + 0.3).to(torch.bfloat16)
    k[:, prompt:], v[:, prompt:] = k[:, -1:].clone(), v[:, -1:].clone()
    tail = key_tail_start(k, v)
    return check_q_gemm_sumsq(*q_gemm_chains(q_gemm_operands(L, D, "cpu"), w, k, v, value_bound(v), tail, H,
                                             use_tma=True))


def _attn_kernel_alone(z, rstd, w, k, v, vb, tail, H: int):
    """``norm_attention_quant_triton``'s second kernel alone, given ``rstd`` [B*L] (DEFAULT_CONFIG launch)."""
    B, L, D = z.shape
    cfg = fused_mod.DEFAULT_CONFIG
    codes = torch.empty(B * L, D, device=z.device, dtype=torch.float8_e4m3fn)
    scales = torch.empty(B * L, 1, device=z.device, dtype=torch.float32)
    fused_mod._attn_quant_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B * H)](
        z, rstd, vb, w, k, v, tail, vb, codes, scales, L, k.shape[1], H, D, fused_mod._LOG2E / math.sqrt(D // H),
        z.stride(0), z.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        0, 1, 1e-6, HAS_TAIL=True, NATIVE=True, DOT_F32=False, DH=D // H, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], HAS_SSQ=False, BLOCK_G=2)
    return codes, scales


def shape_operands(name: str, prompt: int) -> tuple:
    """z [1, L, D], the RMSNorm weight, k / v [1, 512, H, d] whose rows from ``prompt`` on are the padding's equal
    rows, and their tail start: the cross-attention operands at a Wan shape (seeded, on the GPU)."""
    L, H, D = SHAPES[name]
    d = D // H
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(1, L, D, device="cuda", generator=g).mul_(3).to(torch.bfloat16)
    w = (torch.rand(D, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    k = torch.randn(1, TEXT, H, d, device="cuda", generator=g).mul_(1.5).to(torch.bfloat16)
    v = torch.randn(1, TEXT, H, d, device="cuda", generator=g).add_(0.3).to(torch.bfloat16)
    k[:, prompt:] = k[:, -1:].clone()  # the padding's equal K/V rows
    v[:, prompt:] = v[:, -1:].clone()
    return z, w, k, v, key_tail_start(k, v)


def run_shape(name: str, prompt: int, sweep: bool) -> dict:
    L, H, D = SHAPES[name]
    d = D // H
    z, w, k, v, tail = shape_operands(name, prompt)
    row = {"shape": f"L{L} H{H} D{D}", "prompt_tokens": prompt, "tail_start": int(tail[0, 0]), "ms": {}, "check": {}}

    def unfused(merged: bool):
        qn = rmsnorm_rope(z, w, None, None, num_heads=H, eps=1e-6).unflatten(-1, (H, d))
        if merged:
            o = tail_merged_attention(qn, k, v, tail)
        else:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                o = F.scaled_dot_product_attention(qn.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            o = o.transpose(1, 2)
        return quantize_activation(o.flatten(2).reshape(L, D), "fp8", "per_token")

    vb = value_bound(v)

    def fused(merged: bool, cfg=None, kernel="auto"):
        return fused_mod.norm_attention_quant_triton(z, w, k, v, vb, tail if merged else None, H, 1e-6, config=cfg,
                                                     kernel=kernel)

    gluon = fused_mod.gluon_supported(z, k, v)
    row["attention_kernel_auto"] = "gluon" if gluon else "triton"

    # checks: the fused op vs its reference; both paths vs the unquantized fp32 attention output
    for merged in (False, True):
        tag = "merged" if merged else "all keys"
        t = tail if merged else torch.full((1, H), TEXT, dtype=torch.int32, device="cuda")
        rc, rs = text_ref.norm_attention_quant_ref(z, w, k, v, vb, t, H, 1e-6)
        fc, fs = fused(merged)
        row["check"][f"fused vs its reference, {tag}"] = {"rel": _rel(fc, fs, rc.float() * rs),
                                                          "scales_equal": bool(torch.equal(fs, rs))}
        if gluon:  # the Triton kernel too, and the two kernels' codes against each other
            tc, ts = fused(merged, kernel="triton")
            row["check"][f"fused (Triton kernel) vs its reference, {tag}"] = {
                "rel": _rel(tc, ts, rc.float() * rs), "scales_equal": bool(torch.equal(ts, rs))}
            row["check"][f"Gluon vs Triton kernel, {tag}"] = {
                "rel": _rel(fc, fs, tc.float() * ts), "codes_differ": float((fc.float() != tc.float()).float().mean())}
            del tc, ts
        del rc, rs
        qn = rmsnorm_rope_ref(z, w, None, None, H, 1e-6).unflatten(-1, (H, d))
        o32 = text_ref.tail_merged_attention_ref(qn.float(), k.float(), v.float(), t).reshape(L, D)
        del qn
        row["check"][f"error vs fp32 output, fused (bound scale), {tag}"] = _rel(fc, fs, o32)
        row["check"][f"error vs fp32 output, unfused (per-token scale), {tag}"] = _rel(*unfused(merged), o32)
        del o32, fc, fs
        torch.cuda.empty_cache()
    row["ms"]["unfused: rmsnorm + cuDNN SDPA (512 keys) + quantizer"] = _bench(lambda: unfused(False))
    row["ms"]["unfused: rmsnorm + tail-merged attention + quantizer"] = _bench(lambda: unfused(True))
    row["ms"]["fused, all 512 keys"] = _bench(lambda: fused(False))
    row["ms"]["fused, merged keys"] = _bench(lambda: fused(True))
    if gluon:
        row["ms"]["fused, all 512 keys, Triton kernel"] = _bench(lambda: fused(False, kernel="triton"))
        row["ms"]["fused, merged keys, Triton kernel"] = _bench(lambda: fused(True, kernel="triton"))
    # the parts alone, to see where the time goes
    qn = rmsnorm_rope(z, w, None, None, num_heads=H, eps=1e-6)
    o = tail_merged_attention(qn.unflatten(-1, (H, d)), k, v, tail)
    row["ms"]["part: rmsnorm"] = _bench(lambda: rmsnorm_rope(z, w, None, None, num_heads=H, eps=1e-6))
    row["ms"]["part: tail-merged attention"] = _bench(lambda: tail_merged_attention(qn.unflatten(-1, (H, d)), k, v, tail))
    row["ms"]["part: quantizer"] = _bench(lambda: quantize_activation(o.flatten(2).reshape(L, D), "fp8", "per_token"))
    rstd = torch.empty(L, device="cuda", dtype=torch.float32)
    cfg0 = fused_mod.DEFAULT_CONFIG
    row["ms"]["part: fused op's rstd pass"] = _bench(lambda: fused_mod._rms_rstd_kernel[(triton.cdiv(L, cfg0["RSTD_ROWS"]),)](
        z, rstd, L, L, D, 1e-6, z.stride(0), z.stride(1), BLOCK_R=cfg0["RSTD_ROWS"], BLOCK_D=cfg0["RSTD_COLS"],
        num_warps=cfg0["RSTD_WARPS"]))
    if sweep:
        for cfg in SWEEP:
            label = "fused merged " + " ".join(f"{k}={v}" for k, v in cfg.items())
            try:
                row["ms"][label] = _bench(lambda cfg=cfg: fused(True, cfg, kernel="triton"))
            except Exception as exc:  # a config the compiler cannot fit (shared memory, registers)
                row["ms"][label] = None
                row.setdefault("errors", {})[label] = f"{type(exc).__name__}: {str(exc)[:200]}"
    floor_bytes = 2 * L * D * 2 + L * D + L * 4  # z twice (rstd pass, attention), codes, scales
    row["floor_bytes"] = floor_bytes
    del qn, o, rstd
    torch.cuda.empty_cache()
    # the q projection in front: its GEMM with and without the sums of squares in the epilogue (merged keys)
    ops = q_gemm_operands(L, D, "cuda")
    with_rstd, with_sumsq, fused_q = q_gemm_chains(ops, w, k, v, vb, tail, H)
    row["check"]["q GEMM with sumsq vs q GEMM + rstd pass, merged keys"] = check_q_gemm_sumsq(with_rstd, with_sumsq,
                                                                                              fused_q)
    row["ms"]["q GEMM + fused op (rstd pass), merged keys"] = _bench(with_rstd)
    row["ms"]["q GEMM with sumsq epilogue + fused op (no rstd pass), merged keys"] = _bench(with_sumsq)
    qx, sx, qw, sw, qb = ops
    row["ms"]["part: q GEMM"] = _bench(lambda: w8a8_gemm_triton(qx, sx, qw, sw, qb, "per_token", "per_channel",
                                                                torch.bfloat16))
    row["ms"]["part: q GEMM with sumsq epilogue"] = _bench(lambda: w8a8_gemm_sumsq_triton(qx, sx, qw, sw, qb,
                                                                                          torch.bfloat16))
    y, ss = w8a8_gemm_sumsq_triton(qx, sx, qw, sw, qb, torch.bfloat16)
    row["ms"]["part: fused op with sumsq (no rstd pass), merged keys"] = _bench(lambda: fused_q(y, ss))
    # the attention kernel alone given a precomputed rstd: what the op costs without its statistic (the rstd
    # pass leaves part of z in L2 for it, which the sumsq path does not)
    rstd_q = (torch.rsqrt(ss.sum(-1) / D + 1e-6)).contiguous()
    row["ms"]["part: fused op's attention kernel, rstd given, merged keys"] = _bench(
        lambda: _attn_kernel_alone(y.view(1, L, D), rstd_q, w, k, v, vb, tail, H))
    if gluon:
        codes = torch.empty(L, D, device="cuda", dtype=torch.float8_e4m3fn)
        scales = torch.empty(L, 1, device="cuda", dtype=torch.float32)
        row["ms"]["part: Gluon attention kernel, rstd given, merged keys"] = _bench(
            lambda: norm_attention_quant_gluon(y.view(1, L, D), w, k, v, vb, tail, H, 1e-6, codes, scales, rstd_q,
                                               None, 2))
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        # persistent grid of one program per SM instead of two; 128-key blocks in one slot instead of 64 in two
        for progs, bn, nres in ((1, 64, 2), (2, 128, 1), (1, 128, 1)):
            n = progs * sms
            label = f"part: Gluon attention kernel, rstd given, merged keys, {n} programs, BLOCK_N {bn}, {nres} slot(s)"
            row["ms"][label] = _bench(
                lambda n=n, bn=bn, nres=nres: norm_attention_quant_gluon(
                    y.view(1, L, D), w, k, v, vb, tail, H, 1e-6, codes, scales, rstd_q, None, 2, programs=n,
                    block_n=bn, nres=nres))
        norm_attention_quant_gluon(y.view(1, L, D), w, k, v, vb, tail, H, 1e-6, codes, scales, rstd_q, None, 2)
        c0 = codes.clone()
        norm_attention_quant_gluon(y.view(1, L, D), w, k, v, vb, tail, H, 1e-6, codes, scales, rstd_q, None, 2,
                                   block_n=128, nres=1)
        row["check"]["Gluon BLOCK_N 128 vs 64: codes differing"] = float((codes.float() != c0.float()).float().mean())
    from turbocompile.kernels.w8a8 import triton_gemm_tma as tma_mod

    row["q_gemm_configs"] = {"plain": str(tma_mod.tuned_tma_config()), "sumsq": str(tma_mod.tuned_tma_config(True))}
    row["q_gemm_route"] = "tma" if qx.is_cuda and torch.cuda.get_device_capability() >= (9, 0) else "pointer"
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default="13b,14b")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--sweep", action="store_true", help="also time the fused op's launch configs")
    ap.add_argument("--cpu-check", action="store_true",
                    help="only check the q GEMM + sumsq variant at a small shape (CPU, TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.cpu_check:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise SystemExit("--cpu-check runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
        res = cpu_check()
        print(json.dumps(res, indent=1))
        raise SystemExit(0 if res["agree"] else 1)
    bad = [s for s in args.shapes.split(",") if s not in SHAPES]
    if bad:
        raise SystemExit(f"unknown shape {bad[0]!r}; choose from {', '.join(SHAPES)}")
    if not 1 <= args.prompt_tokens <= TEXT:
        raise SystemExit(f"--prompt-tokens must be in 1..{TEXT}, got {args.prompt_tokens}")
    if not torch.cuda.is_available():
        raise SystemExit("the timings need a CUDA GPU; without one, --cpu-check runs the checks in the interpreter")
    os.makedirs(args.out, exist_ok=True)
    copy = _copy_gbps()
    data = {"info": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                     "date": time.strftime("%Y-%m-%d"), "copy_GBps_measured": copy,
                     "command": "python3 benchmarks/bench_text_attention.py " + " ".join(os.sys.argv[1:])},
            "text_attention": []}
    for name in args.shapes.split(","):
        row = run_shape(name, args.prompt_tokens, args.sweep)
        fused_ms = row["ms"]["fused, merged keys"]
        row["fused_merged_pct_of_copy"] = 100 * row["floor_bytes"] / (fused_ms * 1e-3) / 1e9 / copy
        data["text_attention"].append(row)
        print(json.dumps(row, indent=1), flush=True)
        torch.cuda.empty_cache()
    path = os.path.join(args.out, "text_attention.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print("wrote", path, charts.save(data, os.path.join(args.out, "text_attention.png")))
    bad = [row["shape"] for row in data["text_attention"]
           if not row["check"]["q GEMM with sumsq vs q GEMM + rstd pass, merged keys"]["agree"]]
    if bad:
        print(f"q GEMM sumsq variant disagrees with the rstd pass at {', '.join(bad)} (see 'check')", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
