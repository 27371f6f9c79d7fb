"""SageSLA sparse forward with the linear branch fused into the epilogue.

Grid (Qb, B*H); query block fastest so programs running together share one head's K/V in L2.
Each program:
  1. loads its q tile [BLOCK_M, D] straight from [B, L, H, D] and quantizes it to INT8 in
     registers (one scale per block_q rows: the program's tile IS the quantization group);
  2. loops over the T selected key blocks of its LUT row (ascending, so only the last one can
     be the partial tail block: the loop is peeled and only the last iteration is masked):
     s = float(q_i8 · k_i8ᵀ) · q_scale · k_scale[j] · sm_scale · log2e, online exp2 softmax,
     P̃ = 448·p cast to e4m3, pv = dot(P̃, V_fp8) into a fresh fp32 tile, acc = acc·α + pv
     (two-level accumulation: Triton does not fold `acc + dot` on sm90 fp8, §4.3 of the spec);
  3. epilogue: o_s = acc · v_scale / (448 · l); linear branch φ(q)·KV / (1e-5 + φ(q)·ksum)
     (q tile reloaded), proj_l (bf16 dot, fp32 bias), o = o_s + o_l written to [B, L, H, D].
QUANT: 0 = plain bf16/fp16 SLA (K, V read from the inputs), 1 = int8-fp8, 2 = int8-fp16.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_prep import INTERPRET, dot_acc, prepare, round_e4m3

LOG2E = 1.4426950408889634


@triton.jit
def _attn_step(
    acc, m_i, l_i, q, qk_mul, j, L,
    kbase, vbase, kscale_ptr, stride_kl, stride_kd, stride_vl, stride_vd,
    offs_n, offs_d,
    BLOCK_N: tl.constexpr, QUANT: tl.constexpr, TAIL: tl.constexpr, EXACT_FP8: tl.constexpr,
):
    cols = j * BLOCK_N + offs_n
    kptrs = kbase + cols[:, None].to(tl.int64) * stride_kl + offs_d[None, :] * stride_kd
    vptrs = vbase + cols[:, None].to(tl.int64) * stride_vl + offs_d[None, :] * stride_vd
    if TAIL and QUANT == 0:  # quantized K/V are zero padded to Lpad; raw inputs are not
        kt = tl.load(kptrs, mask=cols[:, None] < L, other=0.0)
        vt = tl.load(vptrs, mask=cols[:, None] < L, other=0.0)
    else:
        kt = tl.load(kptrs)
        vt = tl.load(vptrs)
    if QUANT == 0:
        s = dot_acc(q, tl.trans(kt), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), EXACT_FP8) * qk_mul
    else:
        s = tl.dot(q, tl.trans(kt)).to(tl.float32) * (qk_mul * tl.load(kscale_ptr + j))
    if TAIL:
        s = tl.where(cols[None, :] < L, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if QUANT == 1:
        pq = p * 448.0
        if EXACT_FP8:
            pq = round_e4m3(pq)
        pv = tl.dot(pq.to(tl.float8e4nv), vt)
    else:
        pv = dot_acc(p.to(vt.dtype), vt, tl.zeros(acc.shape, dtype=tl.float32), EXACT_FP8)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _sagesla_fwd_kernel(
    q_ptr,  # [B, L, H, D] bf16/fp16
    k_ptr,  # QUANT: [B*H, Lpad, D] int8 | raw k [B, L, H, D]
    v_ptr,  # QUANT 1/2: [B*H, D, Lpad] e4m3/fp16 | raw v [B, L, H, D]
    kscale_ptr,  # [B*H, Kb] fp32
    vscale_ptr,  # [B*H, D] fp32 (QUANT == 1)
    lut_ptr,  # [B*H, Qb, T] int32, ascending
    kv_ptr,  # [B*H, D, D] q dtype  φ(k)ᵀ v
    ksum_ptr,  # [B*H, D] fp32     Σ φ(k)
    w_ptr,  # [D, D] proj_l weight (out, in), q dtype
    bias_ptr,  # [D] fp32
    o_ptr,  # [B, L, H, D]
    H, L, Qb, Kb, T, qk_scale,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    QUANT: tl.constexpr, LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, EXACT_FP8: tl.constexpr,
):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m[:, None] < L
    qptrs = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh \
        + offs_m[:, None].to(tl.int64) * stride_ql + offs_d[None, :] * stride_qd
    qx = tl.load(qptrs, mask=row_ok, other=0.0)
    if QUANT == 0:
        q = qx
        qk_mul = qk_scale
    else:
        qf = qx.to(tl.float32)
        q_scale = tl.max(tl.max(tl.abs(qf), axis=1), axis=0) / 127.0 + 1e-7
        y = qf / q_scale
        q = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int8)
        qk_mul = qk_scale * q_scale

    if QUANT == 0:
        kbase = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
        vbase = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
    else:
        kbase = k_ptr + bh.to(tl.int64) * stride_kh
        vbase = v_ptr + bh.to(tl.int64) * stride_vh
    kscale_base = kscale_ptr + bh * Kb
    lut_base = lut_ptr + (bh * Qb + i).to(tl.int64) * T

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    for t in range(T - 1):
        j = tl.load(lut_base + t)
        acc, m_i, l_i = _attn_step(
            acc, m_i, l_i, q, qk_mul, j, L, kbase, vbase, kscale_base,
            stride_kl, stride_kd, stride_vl, stride_vd, offs_n, offs_d,
            BLOCK_N, QUANT, False, EXACT_FP8)
    j = tl.load(lut_base + T - 1)  # the largest selected block: the only one that may be partial
    acc, m_i, l_i = _attn_step(
        acc, m_i, l_i, q, qk_mul, j, L, kbase, vbase, kscale_base,
        stride_kl, stride_kd, stride_vl, stride_vd, offs_n, offs_d,
        BLOCK_N, QUANT, True, EXACT_FP8)

    if QUANT == 1:
        vs = tl.load(vscale_ptr + bh * HEAD_D + offs_d)
        o = acc * (vs[None, :] / 448.0) / l_i[:, None]
    else:
        o = acc / l_i[:, None]

    if LINEAR:
        # φ(q) = softmax over the head dim of the (unquantized) q tile.
        qf2 = qx.to(tl.float32)
        e = tl.exp(qf2 - tl.max(qf2, axis=1)[:, None])
        phi = e / tl.sum(e, axis=1)[:, None]
        kvm = tl.load(kv_ptr + bh.to(tl.int64) * HEAD_D * HEAD_D + offs_d[:, None] * HEAD_D + offs_d[None, :])
        ks = tl.load(ksum_ptr + bh * HEAD_D + offs_d)
        num = dot_acc(phi.to(qx.dtype), kvm, tl.zeros(o.shape, dtype=tl.float32), EXACT_FP8)
        den = 1e-5 + tl.sum(phi * ks[None, :], axis=1)
        ol = (num / den[:, None]).to(qx.dtype)
        # proj_l: o_l Wᵀ, W stored (out, in); load Wᵀ[in, out] = W[out, in].
        wt = tl.load(w_ptr + offs_d[None, :] * HEAD_D + offs_d[:, None])
        o = dot_acc(ol, wt, o, EXACT_FP8)
    if HAS_BIAS:
        o += tl.load(bias_ptr + offs_d)[None, :]
    optrs = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh \
        + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :] * stride_od
    tl.store(optrs, o.to(o_ptr.dtype.element_ty), mask=row_ok)


def sagesla_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: float,
    proj_weight: torch.Tensor | None, proj_bias: torch.Tensor | None,
    block_q: int, block_k: int, quant: str,
    num_warps: int | None = None, num_stages: int | None = None,
) -> torch.Tensor:
    """Prep passes + sparse forward. q, k, v [B, L, H, D] with any strides (passed to the
    kernels, never copied). Inputs are assumed validated by the op."""
    prep = prepare(q, k, v, topk, block_q, block_k, quant, proj_weight is not None)
    return launch_attn(q, k, v, prep, proj_weight, proj_bias, block_q, block_k, num_warps, num_stages)


def launch_attn(q, k, v, prep, proj_weight, proj_bias, block_q, block_k, num_warps=None, num_stages=None):
    """The sparse forward alone, on the operands made by :func:`prepare`."""
    B, L, H, D = q.shape
    linear = proj_weight is not None
    out = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype)
    qnt = prep["quant"]
    if qnt:
        Lpad = prep["Lpad"]
        kq, vq = prep["kq"], prep["vq"]
        kstr = (0, Lpad * D, D, 1)
        vstr = (0, D * Lpad, 1, Lpad)
    else:
        kq, vq = k, v
        kstr = (k.stride(0), k.stride(2), k.stride(1), k.stride(3))
        vstr = (v.stride(0), v.stride(2), v.stride(1), v.stride(3))
    if linear:
        kv, ksum = prep["kv"].to(q.dtype), prep["ksum"]  # [B*H, D, D] in the input dtype, as TD
        w = proj_weight.to(q.dtype).contiguous()
    else:
        kv = ksum = w = prep["vscale"]
    bias = proj_bias.float().contiguous() if proj_bias is not None else prep["vscale"]
    if num_warps is None:
        num_warps = 4 if block_q <= 64 else 8
    if num_stages is None:
        num_stages = 4  # H200: s3 and s4 within run-to-run noise (±5%); s2 no better; 8 warps 2x slower
    grid = (prep["Qb"], B * H)
    _sagesla_fwd_kernel[grid](
        q, kq, vq, prep["kscale"], prep["vscale"], prep["lut"], kv, ksum, w, bias, out,
        H, L, prep["Qb"], prep["Kb"], prep["T"], LOG2E / math.sqrt(D),
        *q.stride(), *kstr, *vstr, *out.stride(),
        BLOCK_M=block_q, BLOCK_N=block_k, HEAD_D=D,
        QUANT=qnt, LINEAR=linear, HAS_BIAS=proj_bias is not None, EXACT_FP8=INTERPRET,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
