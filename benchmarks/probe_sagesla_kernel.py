"""A profiler target: the SageSLA attention kernel alone (operands prepared once) at a Wan shape,
launched a few times after warm-up, for `ncu` (which reads the hardware counters of one launch):

    ncu --clock-control none -k regex:sagesla_fwd -s 2 -c 1 --set full -o $OUT/rep \\
        python3 benchmarks/probe_sagesla_kernel.py 13b-dense [gluon|triton]

Shapes: 13b-dense / 13b-topk (B1 H12 L32760 D128, top-k 1.0 / 0.1), 14b-topk (B1 H40 L75600 D128).
Extra `key=value` arguments are passed to `launch_attn` (ints where they parse) to profile a variant.
"""

import sys

import torch

from turbocompile.kernels.sagesla.triton_attn import launch_attn
from turbocompile.kernels.sagesla.triton_prep import prepare

SHAPES = {"13b-dense": (32760, 12, 1.0), "13b-topk": (32760, 12, 0.1), "14b-topk": (75600, 40, 0.1)}
name = sys.argv[1] if len(sys.argv) > 1 else "13b-dense"
kernel = sys.argv[2] if len(sys.argv) > 2 else "gluon"
extra = {}
for arg in sys.argv[3:]:
    key, val = arg.split("=", 1)
    extra[key] = int(val) if val.lstrip("-").isdigit() else val
if name not in SHAPES:
    raise SystemExit(f"unknown shape {name!r}; valid: {', '.join(SHAPES)}")
L, H, topk = SHAPES[name]
torch.manual_seed(0)
q, k, v = (torch.randn(1, L, H, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
prep = prepare(q, k, v, topk, 64, 128, "int8-fp8", False)
for _ in range(4):
    launch_attn(q, k, v, prep, None, None, 64, 128, kernel=kernel, **extra)
torch.cuda.synchronize()
