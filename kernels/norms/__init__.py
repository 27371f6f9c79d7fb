"""Fused norm kernels for the Wan DiT: LayerNorm + AdaLN modulate (optionally after a gated
residual add, optionally with a W8A8 quantization epilogue) and q/k RMSNorm + interleaved RoPE.

``ref`` holds the pure-PyTorch references (imported eagerly by ``turbocompile.ops.norms``);
``triton_layernorm`` and ``triton_rmsnorm_rope`` hold the Triton kernels (imported lazily).
"""
