"""Cross-attention over text keys whose trailing run is one repeated key (a prompt's padding).

Wan pads every prompt's T5 embedding with zero rows up to ``text_len`` (512). Each of those rows
goes through the same row-wise layers, so the K and V rows of all padding tokens are equal bit
for bit, and softmax attention over m equal keys is attention over one of them with its logit
raised by ln(m). ``ref`` holds the PyTorch references; ``triton_tail_merged`` the Triton kernels
(imported lazily); ``triton_norm_attn_quant`` the fused cross-attention (q RMSNorm, attention, FP8 codes for
the o projection) of the ``fuse_text_attention`` pass.
"""
