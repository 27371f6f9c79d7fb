"""SageSLA's attention kernel with and without the FP8-codes epilogue of ``fuse_sagesla_quant``, on a GPU.

The 1.3B ``turbo-fp8`` profile of session 29 put the attention kernel at 883 µs per layer, against 802 µs in
session 24's profile (before the codes epilogue existed), on another H100 instance. This probe times, in one
process and in alternating rounds (so clock drift favours neither), CUDA-graph replays of
  * ``sagesla``: the op writing bf16 output rows,
  * ``sagesla_quant``: the same op writing the o projection's FP8 codes at the per-sample bound,
  * ``sagesla`` + the per-token FP8 quantizer (what the o projection ran before the pass),
and attributes each variant's time to its kernels with torch.profiler, so the attention kernel of the two
epilogues is compared directly.

    python benchmarks/probe_sagesla_qout.py --out $OUT [--shapes 13b,14b] [--rounds 3]

``--only bf16|codes`` runs that op three times at the first shape (a target for ncu, ``-k regex:_sagesla_fwd_gluon``);
``--dump`` writes the cubins of the attention kernels it compiled to --out (``cuobjdump -sass`` reads them).
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import torch
import triton
import triton.testing
from torch.profiler import ProfilerActivity, profile

from _cuda_graph import graphed  # benchmarks/ is the script's directory
from turbocompile.ops.attention import sagesla, sagesla_quant
from turbocompile.ops.w8a8 import quantize_activation

SHAPES = {"13b": (32760, 12), "14b": (75600, 40)}  # L, H at 480p / 720p x 81 frames; D = 128
TOPK = 0.1


def _variants(q, k, v):
    B, L, H, D = q.shape
    return {
        "bf16": lambda: sagesla(q, k, v, topk=TOPK, backend="triton"),
        "codes": lambda: sagesla_quant(q, k, v, topk=TOPK, backend="triton"),
        "bf16+quant": lambda: quantize_activation(sagesla(q, k, v, topk=TOPK, backend="triton").reshape(B * L, H * D),
                                                  "fp8", "per_token", "triton"),
    }


def _kernels_ms(fn, reps: int = 5) -> dict:
    """GPU ms per call of each kernel that ``fn`` (a graph replay) launches, from torch.profiler."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = collections.Counter()
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            out[ev.key[:60]] += ev.device_time_total / 1e3 / reps
    return dict(out.most_common())


def _dump_cubins(out: str, tag: str) -> None:
    """The compiled Gluon attention kernels in Triton's in-process cache, as cubin files."""
    from turbocompile.kernels.sagesla import gluon_attn

    n = 0
    for caches in gluon_attn._sagesla_fwd_gluon.device_caches.values():
        for kern in caches[0].values():
            path = os.path.join(out, f"sagesla_gluon_{tag}_{n}.cubin")
            with open(path, "wb") as f:
                f.write(kern.asm["cubin"])
            print("wrote", path)
            n += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default="13b,14b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("bf16", "codes"), default=None)
    ap.add_argument("--dump", action="store_true")
    a = ap.parse_args()
    if a.only:
        L, H = SHAPES[a.shapes.split(",")[0]]
        q, k, v = (torch.randn(1, L, H, 128, device="cuda").to(torch.bfloat16) for _ in range(3))
        fn = _variants(q, k, v)[a.only]
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        if a.dump:
            _dump_cubins(a.out, a.only)
        return
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "topk": TOPK, "shapes": {}}
    for name in a.shapes.split(","):
        L, H = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, L, H, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
        fns = {key: graphed(fn) for key, fn in _variants(q, k, v).items()}
        times = {key: [] for key in fns}
        for _ in range(a.rounds):
            for key, fn in fns.items():
                times[key].append(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
        kern = {key: _kernels_ms(fn) for key, fn in fns.items()}
        res["shapes"][name] = {"L": L, "H": H, "ms": times, "kernels_ms": kern}
        print(f"== {name} L={L} H={H}")
        for key in fns:
            print(f"  {key:<11} op {min(times[key]):7.3f} ms (rounds {', '.join(f'{t:.3f}' for t in times[key])})")
            for kn, ms in list(kern[key].items())[:6]:
                print(f"      {ms:7.3f} ms  {kn}")
        del fns
        torch.cuda.empty_cache()
    path = os.path.join(a.out, "probe_sagesla_qout.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
