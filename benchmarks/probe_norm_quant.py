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
