"""A profiler target: the fused LayerNorm-modulate + per-token quantization kernel at Wan-14B 720p
shapes (B1 L75600 D5120 bf16), launched a few times after warm-up, for `ncu` (which reads the
hardware counters of one launch):

    ncu --clock-control none -k regex:_ln_rows_kernel -c 1 --section SpeedOfLight \\
        --section WarpStateStats --section Occupancy python3 benchmarks/probe_norm_quant.py int8
"""

import sys

import torch

from turbocompile.kernels.norms.triton_layernorm import ln_modulate_triton, residual_ln_modulate_triton

fmt = sys.argv[1] if len(sys.argv) > 1 else "int8"
residual = len(sys.argv) > 2 and sys.argv[2] == "res"
L, D = 75600, 5120
x = torch.randn(1, L, D, device="cuda").to(torch.bfloat16)
y = torch.randn_like(x)
gate, sh, sc = (torch.randn(1, 1, D, device="cuda") * 0.1 for _ in range(3))
for _ in range(3):
    if residual:
        residual_ln_modulate_triton(x, y, gate, None, None, sh, sc, 1e-6, x.dtype, quant=(fmt, "per_token"))
    else:
        ln_modulate_triton(x, None, None, sh, sc, 1e-6, x.dtype, quant=(fmt, "per_token"))
torch.cuda.synchronize()

# `... probe_norm_quant.py int8 [res] --sass OUT_DIR`: also write the compiled kernel's SASS and an
# opcode histogram (instructions in the per-row body, by opcode), to count the work per element.
if "--sass" in sys.argv:
    import collections
    import os
    import re

    from turbocompile.kernels.norms import triton_layernorm as tln

    out_dir = sys.argv[sys.argv.index("--sass") + 1]
    kern = tln.LAST_KERNEL["kernel"]
    sass = kern.asm.get("sass") or ""
    tag = f"{fmt}{'_res' if residual else ''}"
    with open(os.path.join(out_dir, f"sass_ln_quant_{tag}.txt"), "w") as fh:
        fh.write(sass)
    ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
    print(f"SASS {tag}: {sum(ops.values())} instructions, registers {kern.n_regs}, spills {kern.n_spills}")
    for op, n in ops.most_common(40):
        print(f"  {op:12s} {n}")
