"""Where one eager W8A8 TMA GEMM launch spends its host time, layer by layer (session 33).

An eager (no CUDA graph) 1.3B `turbo-fp8` forward is host-bound on the lent H100 machine: 181 GEMM
launches dominate it. For the FP8 per-token x per-channel GEMM at 32760x1536->1536 this times, in host µs
per call behind a GPU sleep (``_host.per_call_us``; the queue never drains), each layer alone:

* ``op``: ``torch.ops.turbocompile.w8a8_linear_prequant``'s body as the eager runner calls it;
* ``wrapper``: ``w8a8_gemm_triton`` (dispatch rule + ``w8a8_gemm_tma``);
* ``descriptors``: ``torch.empty`` of y + the three ``TensorDescriptor.from_tensor`` calls;
* ``autotuned``: the autotuned kernel's ``kernel[grid](...)`` with prepared arguments;
* ``jit``: the same kernel launched through ``JITFunction`` with the tuned config (no autotuner);
* ``wrapper_autotuner``: ``wrapper`` with ``_tuned_launch.MEMO_PICKS`` off (``Autotuner.run`` on every
  launch, as before session 33);
* ``noop_1`` / ``noop_24``: a Triton kernel that does nothing, with 1 and 24 runtime arguments (the launch
  floor of ``JITFunction.run`` on this host).
Rounds are interleaved (the host's speed drifts by 2x between repeats). A cProfile of 200 ``wrapper`` calls
follows. With ``--forward``, an eager (no CUDA graph) Wan2.1-1.3B ``turbo-fp8`` forward (100-token prompt,
``OptimizeResult.eager_runner``) is timed with the picks remembered and without, interleaved: wall ms
(synchronised) and host ms (enqueued behind a GPU sleep).

    python3 benchmarks/probe_launch_layers.py [--forward] --out $OUT
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats

import torch
import triton
import triton.language as tl
from _host import build_forward, enqueue_ms, header, per_call_us, wall_ms  # benchmarks/ is the script's directory

from turbocompile.kernels.w8a8 import _tuned_launch
from turbocompile.kernels.w8a8 import triton_gemm_tma as tg
from turbocompile.kernels.w8a8.triton_gemm import w8a8_gemm_triton
from turbocompile.kernels.w8a8.triton_quant import quantize_triton
from turbocompile.ops._registry import implementation
from turbocompile.ops.w8a8 import quantize_weight

REPS = 100


@triton.jit
def _noop1(a):
    pass


@triton.jit
def _noop24(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11,
            C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forward", action="store_true", help="also A/B an eager 1.3B turbo-fp8 forward")
    a = ap.parse_args()
    m, k, n = 32760, 1536, 1536
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qx, sx = quantize_triton(x, "fp8", "per_token")
    qw, sw = quantize_weight(torch.randn(n, k, device="cuda") * 0.03, "fp8", "per_channel")
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1

    def wrapper():
        return w8a8_gemm_triton(qx, sx, qw, sw, b, "per_token", "per_channel", torch.bfloat16, use_tma=True)

    op_body = implementation(torch.ops.turbocompile.w8a8_linear_prequant.default)

    def op():
        return op_body(qx, sx, qw, sw, b, "fp8", "per_token", "per_channel", torch.bfloat16, "auto")

    y = wrapper()  # autotunes
    ref = y.clone()
    tuned = tg._tuned_kernel(False)
    best = tuned.best_config
    nsm = torch.cuda.get_device_properties(0).multi_processor_count

    def descriptors():
        yy = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
        return (tg.TensorDescriptor.from_tensor(qx, [64, 128]), tg.TensorDescriptor.from_tensor(qw, [64, 128]),
                tg.TensorDescriptor.from_tensor(yy, [64, 64]), yy)

    ad, wd, yd, yy = descriptors()
    args = (ad, wd, yd, sx, sw, b, sw, m, n, k, min(triton.next_power_of_2(m), 8192), sx.stride(0), sw.stride(0), 0,
            None, sw, sw, 1, 0, 0, 0)
    meta = dict(IS_FP8=True, FP8_PROMOTE=tg.FP8_PROMOTE, GELU_SHORT=tg.GELU_CODES_SHORT, HAS_BIAS=True,
                OUT_KIND=tg._OUT_KIND[torch.bfloat16], ACTIVATION=0, ROUND_BF16=False, NATIVE=tg._em.gelu_native(False),
                AMAX_MODE=0, RESIDUAL=tg._em.RESIDUAL_IDS["none"], RES_TMA=False, GATE_MODE=0,
                GRANULE=tg.AMAX_GRANULE, NUM_SMS=nsm, FLATTEN=tg.FLATTEN)

    def grid(c):
        return (min(nsm, triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"])),)

    def autotuned():
        tuned[grid](*args, **meta)

    cfg = dict(best.all_kwargs())
    tg._set_block_shapes({"a_desc": ad, "w_desc": wd, "y_desc": yd, "r_desc": None, **cfg})
    g = grid(cfg)

    def jit():
        tg._w8a8_gemm_tma_kernel[g](*args, **meta, **cfg)

    jit()
    torch.cuda.synchronize()
    same_jit = torch.equal(yy, ref)
    t = torch.empty(16, device="cuda")
    ints = list(range(1, 13))

    def noop_1():
        _noop1[(1,)](t)

    def noop_24():
        _noop24[(1,)](*([t] * 12), *ints, C0=1, C1=2, C2=3, C3=4)

    def wrapper_autotuner():
        _tuned_launch.MEMO_PICKS = False
        try:
            return wrapper()
        finally:
            _tuned_launch.MEMO_PICKS = True

    layers = {"op": op, "wrapper": wrapper, "wrapper_autotuner": wrapper_autotuner, "descriptors": descriptors,
              "autotuned": autotuned, "jit": jit, "noop_1": noop_1, "noop_24": noop_24}
    res = header(shape=[m, k, n], best_config=str(best), reps=REPS, jit_output_equal=same_jit, rounds=[])
    print(res, flush=True)
    for r in range(a.rounds):
        row = {name: per_call_us(fn, REPS, sleep_ms=1500.0) for name, fn in layers.items()}
        res["rounds"].append(row)
        print(f"round {r}: " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()) + "  (host us per call)", flush=True)
    res["median_us"] = {name: sorted(rw[name] for rw in res["rounds"])[len(res["rounds"]) // 2] for name in layers}
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3000 * 2.0e6))
    prof.enable()
    for _ in range(200):
        wrapper()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    res["cprofile_tottime"] = s.getvalue()
    print(s.getvalue())
    print("median:", res["median_us"])
    if a.forward:
        res["forward"] = _forward_ab(a.rounds)
    with open(os.path.join(a.out, "probe_launch_layers.json"), "w") as f:
        json.dump(res, f, indent=2)


def _forward_ab(rounds: int) -> dict:
    """Eager 1.3B turbo-fp8 forward with the GEMM picks remembered (on) and Autotuner.run per launch (off)."""
    built, inputs = build_forward("wan2.1-t2v-1.3b", "turbo-fp8", prompt_tokens=100)
    run = built.eager_runner()
    outs = {}
    rows = []
    with torch.no_grad():
        for memo in (False, True):
            _tuned_launch.MEMO_PICKS = memo
            run(*inputs)
            outs[memo] = run(*inputs).float()
        for r in range(rounds):
            for memo in (False, True):
                _tuned_launch.MEMO_PICKS = memo
                host, valid = enqueue_ms(lambda: run(*inputs), 2000.0)
                row = {"round": r, "memo": memo, "wall_ms": wall_ms(lambda: run(*inputs), 5), "host_ms": host,
                       "host_valid": valid}
                rows.append(row)
                print(f"forward round {r} memo {memo}: wall {row['wall_ms']:.2f} ms  host {host:.2f} ms "
                      f"(valid {valid})", flush=True)
    _tuned_launch.MEMO_PICKS = True
    out = {"rows": rows, "outputs_equal": torch.equal(outs[False], outs[True])}
    for memo in (False, True):
        w = sorted(x["wall_ms"] for x in rows if x["memo"] == memo)
        h = sorted(x["host_ms"] for x in rows if x["memo"] == memo)
        out[f"median_wall_ms_memo_{memo}"], out[f"median_host_ms_memo_{memo}"] = w[len(w) // 2], h[len(h) // 2]
    print("forward:", {k: v for k, v in out.items() if k != "rows"}, flush=True)
    return out


if __name__ == "__main__":
    main()
