"""Where the Gluon SageSLA kernel's FP8-codes epilogue (QOUT) loses its time at Wan-1.3B: diagnostic variants of
its ``_store_codes`` built from the kernel's source by text edits (never shipped), timed against the bf16-output
kernel in alternating rounds, CUDA-graph replays of the attention kernel alone (``prepare`` runs once).

Variants: ``bf16`` (QOUT off), ``codes`` (as shipped: the sample's two bound quotients loaded before the key
loop), ``late`` (those loads in the epilogue, as first shipped), ``noround`` (no bf16 rounding before the scale),
``noscale`` (no per-token scale stores). Correctness is not checked for the diagnostic variants.

    python benchmarks/probe_qout_variants.py --out $OUT [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

import torch
import triton
import triton.testing

from _cuda_graph import graphed  # benchmarks/ is the script's directory
from turbocompile.kernels.sagesla import gluon_attn
from turbocompile.kernels.sagesla.triton_attn import _fp8_out_buffers
from turbocompile.kernels.sagesla.triton_prep import prepare

EDITS = {
    "codes": [],
    "late": [('''            c_inv = gl.load(bound_ptr + nb + b)
            c_scale = gl.load(bound_ptr + 2 * nb + b)''', '''            c_inv = bound_ptr + nb + b
            c_scale = bound_ptr + 2 * nb + b'''),
             ('''        if dt == gl.bfloat16:  # back through the bits''', '''        inv = gl.load(inv)
        scale = gl.load(scale)
        if dt == gl.bfloat16:  # back through the bits''')],
    "noround": [('''            x = (o.to(dt).to(gl.uint16, bitcast=True).to(gl.uint32) << 16).to(gl.float32, bitcast=True)''',
                 '''            x = o''')],
    "noscale": [('''mask=row_ok & (h == 0))''', '''mask=row_ok & (h < 0))''')],
}


def _variant_module(name: str, edits):
    src = open(gluon_attn.__file__).read()
    src = src.replace("from .pdl import", "from turbocompile.kernels.sagesla.pdl import")
    for old, new in edits:
        if old not in src:
            raise SystemExit(f"variant {name}: the text to replace is not in gluon_attn.py:\n{old}")
        src = src.replace(old, new)
    path = os.path.join(tempfile.mkdtemp(), f"gluon_attn_{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"gluon_attn_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--L", type=int, default=32760)
    ap.add_argument("--H", type=int, default=12)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, a.L, a.H, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    prep = prepare(q, k, v, 0.1, 64, 128, "int8-fp8", False)
    out = torch.empty_like(q)
    qout = _fp8_out_buffers(q, prep, None, None)
    fns = {"bf16": graphed(lambda: gluon_attn.launch_gluon(q, out, prep, 64, 128, None, None, None))}
    for name, edits in EDITS.items():
        mod = _variant_module(name, edits)
        fns[name] = graphed(lambda mod=mod: mod.launch_gluon(q, out, prep, 64, 128, None, None, None, qout=qout))
    times = {name: [] for name in fns}
    for _ in range(a.rounds):
        for name, fn in fns.items():
            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "L": a.L, "H": a.H, "ms": times}
    for name, ts in times.items():
        print(f"{name:<9} {min(ts):7.4f} ms  (rounds {', '.join(f'{t:.4f}' for t in ts)})")
    with open(os.path.join(a.out, "probe_qout_variants.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
