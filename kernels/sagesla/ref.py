"""Pure-PyTorch reference of SageSLA attention (TurboDiffusion main-branch semantics).

Everything is computed in float32; quantization is *simulated* (fake-quant: quantize, then
dequantize) so that the reference sees the same rounding as the Triton kernels:

* block map: mean-pooled q per query block, mean-pooled ``k - mean_L(k)`` per key block,
  score ``q̄ · k̄ᵀ`` (no scale), keep ``max(1, int(topk * Kb))`` key blocks per query block;
* sparse branch: ``softmax(q kᵀ / √D) v`` restricted to the kept key blocks;
* linear branch over all keys: ``φ = softmax over D``,
  ``o_l = φ(q) (φ(k)ᵀ v) / (1e-5 + φ(q) · Σ_L φ(k))``, then ``proj_l`` (absent = zero);
* output ``o_s + o_l`` in the input dtype, layout ``[B, L, H, D]``.

Quantization ("int8-fp8"): Q int8 per (b, h, block_q rows), K int8 per (b, h, block_k rows)
of the mean-smoothed k, ``scale = amax / 127 + 1e-7``, round half away from zero; V FP8 e4m3
per (b, h, channel) with ``scale = amax / 448 + 1e-7`` (we use scale_max 448, the full e4m3
range; TurboDiffusion uses 2.25, which puts ~0.7% of a channel's range into e4m3 subnormals);
P as e4m3 with the static 448 scaling (row sums use the unrounded P). "int8-fp16": V and P
in fp16. "none": no quantization (plain SLA).

Quantized output (:func:`sagesla_quant_ref`, the ``turbocompile::sagesla_quant`` op): the output as the
o projection's per-token FP8 input, every token of sample b at the scale ``bound_b / 448`` of
:func:`output_bound_ref`, an upper bound of the sample's outputs known from v and proj_l alone.

Memory traffic (why this is a reference, not a kernel): every tensor is transposed and
upcast to fp32 (3 copies of q, k, v at 2x their size), the sparse branch materialises a
[B, H, rows, L] fp32 score matrix per chunk of query blocks, i.e. O(L²) bytes per head
instead of O(density · L²) work and O(L·D) bytes for the fused kernels.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "QUANT_MODES",
    "num_kept_blocks",
    "block_lut_ref",
    "quant_int8_blocks",
    "quant_fp8",
    "linear_branch_ref",
    "sagesla_ref",
    "output_bound_ref",
    "sagesla_quant_ref",
]

QUANT_MODES = ("int8-fp8", "int8-fp16", "none")
FP8_MAX = 448.0
EPS_SCALE = 1e-7
EPS_LINEAR = 1e-5
# Relative round-up allowed for P̃'s e4m3 rounding in the output bound (3 mantissa bits; see output_bound_ref).
P8_SLACK = 2.0 ** -4


def num_kept_blocks(topk: float, n_key_blocks: int) -> int:
    """Key blocks kept per query block: ``max(1, int(topk * Kb))`` (floor, as TurboDiffusion)."""
    return max(1, min(n_key_blocks, int(topk * n_key_blocks)))


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over rows of each ``block`` of x [B, H, L, D] (divides by the actual row count)."""
    B, H, L, D = x.shape
    nb = math.ceil(L / block)
    pad = nb * block - L
    xs = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, nb, block, D).sum(3)
    cnt = torch.full((nb,), float(block), device=x.device)
    cnt[-1] = L - (nb - 1) * block
    return xs / cnt[:, None]


def block_lut_ref(q: torch.Tensor, k: torch.Tensor, topk: float, block_q: int, block_k: int) -> torch.Tensor:
    """Selected key blocks, ascending, int64 [B, H, Qb, T]; q, k are [B, L, H, D]."""
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2)
    kf = kf - kf.mean(dim=2, keepdim=True)  # smooth-K (for the prediction only)
    scores = _pool(qf, block_q) @ _pool(kf, block_k).transpose(-1, -2)  # [B, H, Qb, Kb]
    t = num_kept_blocks(topk, scores.shape[-1])
    idx = torch.topk(scores, t, dim=-1, sorted=False).indices
    return torch.sort(idx, dim=-1).values


def quant_int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Fake-quant x [B, H, L, D] fp32 to int8 per block of ``block`` rows (dequantized fp32)."""
    B, H, L, D = x.shape
    nb = math.ceil(L / block)
    xp = torch.nn.functional.pad(x, (0, 0, 0, nb * block - L)).reshape(B, H, nb, block * D)
    scale = xp.abs().amax(-1, keepdim=True) / 127.0 + EPS_SCALE
    y = xp / scale
    y = torch.sign(y) * torch.floor(y.abs() + 0.5)  # round half away from zero (as the kernel)
    return (y.clamp(-127, 127) * scale).reshape(B, H, nb * block, D)[:, :, :L]


def quant_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the e4m3 grid (RN, saturating at ±448)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def linear_branch_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Linear-attention branch over all keys, fp32, [B, H, L, D] in and out (after proj_l)."""
    pq = torch.softmax(q, dim=-1)
    pk = torch.softmax(k, dim=-1)
    kv = pk.transpose(-1, -2) @ v  # [B, H, D, D]
    ksum = pk.sum(dim=2, keepdim=True)  # [B, H, 1, D]
    o = (pq @ kv) / (EPS_LINEAR + (pq * ksum).sum(-1, keepdim=True))
    if proj_weight is None:
        return torch.zeros_like(o) if proj_bias is None else torch.zeros_like(o) + proj_bias.float()
    o = o @ proj_weight.float().t()
    if proj_bias is not None:
        o = o + proj_bias.float()
    return o


def sagesla_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: float,
    proj_weight: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
    block_q: int = 64, block_k: int = 128, quant: str = "int8-fp8",
    chunk_elems: int = 1 << 26,
) -> torch.Tensor:
    """SageSLA forward, reference. q, k, v [B, L, H, D] -> [B, L, H, D] in q's dtype.

    ``chunk_elems`` bounds the fp32 score matrix materialised per chunk of query blocks.
    """
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quant '{quant}'; valid choices: {', '.join(QUANT_MODES)}")
    B, L, H, D = q.shape
    lut = block_lut_ref(q, k, topk, block_q, block_k)  # [B, H, Qb, T]
    Qb, Kb = lut.shape[2], math.ceil(L / block_k)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]

    if quant == "none":
        qd, kd, vd = qf, kf, vf
    else:
        qd = quant_int8_blocks(qf, block_q)
        kd = quant_int8_blocks(kf - kf.mean(dim=2, keepdim=True), block_k)  # smoothing: softmax-invariant
        if quant == "int8-fp8":
            vs = vf.abs().amax(dim=2, keepdim=True) / FP8_MAX + EPS_SCALE  # per (b, h, channel)
            vd = quant_fp8(vf / vs) * vs
        else:
            vd = vf.half().float()

    keep = torch.zeros(B, H, Qb, Kb, dtype=torch.bool, device=q.device)
    keep.scatter_(-1, lut, True)
    key_keep = keep.repeat_interleave(block_k, dim=-1)[..., :L]  # [B, H, Qb, L]

    o_s = torch.empty_like(qf)
    sm_scale = 1.0 / math.sqrt(D)
    qb_per_chunk = max(1, chunk_elems // max(1, B * H * block_q * L))
    for c0 in range(0, Qb, qb_per_chunk):
        c1 = min(Qb, c0 + qb_per_chunk)
        r0, r1 = c0 * block_q, min(L, c1 * block_q)
        s = (qd[:, :, r0:r1] @ kd.transpose(-1, -2)) * sm_scale  # [B, H, rows, L]
        mask = key_keep[:, :, c0:c1].repeat_interleave(block_q, dim=2)[:, :, : r1 - r0]
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.exp(s - s.amax(-1, keepdim=True))
        denom = p.sum(-1, keepdim=True)
        if quant == "int8-fp8":
            p = quant_fp8(p * FP8_MAX) / FP8_MAX  # P̃ in e4m3 with the static 448 scale
        elif quant == "int8-fp16":
            p = p.half().float()
        o_s[:, :, r0:r1] = (p @ vd) / denom

    o = o_s + linear_branch_ref(qf, kf, vf, proj_weight, proj_bias)
    return o.transpose(1, 2).to(q.dtype)


def output_bound_ref(v: torch.Tensor, proj_weight: torch.Tensor | None = None,
                     proj_bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[B]``: ``bound_b = V_b · (1 + 2^-4 + R) + Bmax``, an upper bound of |SageSLA output| per sample.

    ``V_b = 448 · max_{h,c} vs[b, h, c]`` with the kernels' FP8 V scales ``vs = max_L |v| / 448 + 1e-7``
    (true division, as the kernels' ``div_rn``): every FP8 value code·vs is at most 448·vs <= V_b, and
    V_b >= max |v[b]|. ``R = max_r Σ_c |W[r, c]|`` (0 without proj_l), ``Bmax = max |bias|`` (0 without).

    Why it bounds the output, per branch (any quant mode; int8-fp8 is the tight case):

    * sparse: ``o_s = Σ_j P̃8_j v̂_j / Σ_j P̃_j`` with P̃8 = e4m3(P̃) in the numerator and the unrounded P̃ in
      the normalizer (the kernels' l, the reference's denom). A convex combination of v̂ rows but for that
      rounding: e4m3 rounds a normal P̃ (>= 2^-6) up by at most the factor 18/17 (just above 1 + 2^-4 in a
      binade, up to 1 + 2^-3) and a subnormal one by at most 2^-10 absolute, while the row's largest
      P̃ is 448 (so l >= 448): ``|o_s| <= V_b (18/17 + n 2^-10 / 448)`` for n keys of P̃ < 2^-6, within
      the factor 1 + 2^-4 = 17/16 for n <= 1686 (every rounding going up at once). The online softmax
      rescales numerator and l alike (α <= 1), which keeps both bounds.
    * linear: ``o_l = φ(q)·(KV·Wᵀ) / (1e-5 + φ(q)·Σφ(k)) + b``, KV = Σ_j φ(k_j)ᵀ v_j with φ >= 0, so
      ``|KV[c, e]| <= max|v| Σφ(k)_c`` and ``|o_l[r] - b_r| <= max|v| R (den - 1e-5) / den < max|v| R``:
      the 1e-5 only shrinks it.

    Not covered: the kernels' roundings (KV, W, KVW and φ(q) to the model dtype, each <= 2^-9; the output
    to the model dtype, 2^-9; the Hopper FP8 accumulator) and subnormal P̃ beyond the count above. They
    cost nothing while |o| <= bound · 29/28: e4m3's top binade has steps of 32, so 448 < x <= 464 rounds
    to 448 anyway and the clamp (the GPU's saturating cast) changes no code. That holds with every rounding
    going up for up to ~18 000 keys of P̃ < 2^-6 per row (top-k 0.1 attends at most 7 680 keys at Wan-14B).
    """
    vmax = v.abs().amax(dim=1).float()  # [B, H, D]
    vs = vmax / torch.full_like(vmax, FP8_MAX) + EPS_SCALE  # the kernels' FP8 V scales (a true division)
    cap = vs.amax(dim=(1, 2)) * FP8_MAX  # [B]
    gain = torch.full_like(cap, 1.0 + P8_SLACK)
    if proj_weight is not None:
        gain = gain + proj_weight.float().abs().sum(dim=1).amax()
    bound = cap * gain
    if proj_bias is not None:
        bound = bound + proj_bias.float().abs().amax()
    return bound


def sagesla_quant_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: float,
    proj_weight: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
    block_q: int = 64, block_k: int = 128, quant: str = "int8-fp8",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SageSLA's output as FP8 codes at one scale per sample. q, k, v ``[B, L, H, D]``.

    ``o = sagesla_ref(...)`` in q's dtype (as the unfused graph stores it), then the per-token quantizer's
    FP8 formula with the amax replaced by :func:`output_bound_ref`'s bound of the token's sample:
    ``codes = e4m3_rne(clamp(o · (448 / bound_b), ±448))``, ``scale = bound_b / 448``.

    Returns:
        ``(codes [B*L, H*D] float8_e4m3fn, scales float32 [B*L, 1])``, what ``w8a8_linear_prequant`` takes
        with ``format="fp8"`` and per-token activation scales.
    """
    from turbocompile.kernels.w8a8.ref import codes_at_amax_ref, dequant_scale_ref

    B, L, H, D = q.shape
    o = sagesla_ref(q, k, v, topk, proj_weight, proj_bias, block_q, block_k, quant)
    a = output_bound_ref(v, proj_weight, proj_bias).repeat_interleave(L).unsqueeze(1)  # [B*L, 1]
    return codes_at_amax_ref(o.reshape(B * L, H * D).float(), a, "fp8"), dequant_scale_ref(a, "fp8")
