"""Triton kernels: the tail start of repeated keys, and attention with that tail merged.

* ``_key_tail_start_kernel``: one program per (batch, head, BLOCK_R rows) compares its rows of k
  and v with the last row and atomic-maxes the largest differing index + 1 into n (the tail
  start of :func:`..ref.key_tail_start_ref`; zeroed first). (One program per head scanning all
  512 rows added about 36 us per call at Wan-1.3B's 12 heads on an H200; this takes 9 us.)
* ``_tail_merged_attn_kernel``: FlashAttention-style forward (online softmax in the exp2
  domain, fp32 statistics, P rounded to the value dtype for the P·V product, as SDPA's
  flash / cuDNN kernels do) over keys 0 .. n only. Key n carries the tail's multiplicity
  m = Lk - n as ``+ log2(m)`` on its (already log2-scaled) logit, so the loop runs
  ceil((n + 1) / BLOCK_N) key blocks instead of ceil(Lk / BLOCK_N): the padding of a short
  prompt costs one key. The trip count is read from device memory, so one CUDA graph serves
  every prompt length.

Layouts are the model's own ``[B, L, H, D]`` (any strides with a unit last stride).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from turbocompile.kernels.norms.triton_rounding import round_to
from turbocompile.ops._backend import triton_interpret

__all__ = ["DEFAULT_CONFIG", "attention_configs", "head_attention", "key_tail_start_triton",
           "tail_merged_attention_triton"]

_LOG2E = 1.4426950408889634


@triton.jit
def _key_tail_start_kernel(k_ptr, v_ptr, n_ptr, LK, H,
                           skb, skl, skh, svb, svl, svh,
                           D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (b·H + h, j): rows j·BLOCK_R .. of head h compared with the last row; atomic max of the
    largest differing index + 1 into n[b, h] (zeroed by the caller)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    d = tl.arange(0, D)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    # compared as fp32 values (exact for 16-bit floats; the CPU interpreter compares 16-bit floats as bits)
    k_last = tl.load(k_base + (LK - 1) * skl + d).to(tl.float32)
    v_last = tl.load(v_base + (LK - 1) * svl + d).to(tl.float32)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < LK
    kt = tl.load(k_base + r[:, None] * skl + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    vt = tl.load(v_base + r[:, None] * svl + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    # float comparison: NaN differs from everything (never merged); -0.0 equals 0.0 (same products)
    diff = (kt != k_last[None, :]) | (vt != v_last[None, :])
    row_differs = tl.max(diff.to(tl.int32), axis=1) > 0
    best = tl.max(tl.where(row_differs & ok, r + 1, 0), axis=0)
    if best > 0:
        tl.atomic_max(n_ptr + bh, best)


@triton.jit
def head_attention(qn, k_base, v_base, n_tail, LK, skl, svl, qk_scale, d,
                   HAS_TAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DH: tl.constexpr,
                   DOT_F32: tl.constexpr):
    """softmax(qn · Kᵀ · qk_scale) · V of BLOCK_M query rows over one head's keys (k_base / v_base: the
    head's first key row; rows strided by skl / svl, channels d): FlashAttention-style online softmax in
    the exp2 domain (qk_scale includes log2 e), fp32 statistics, P rounded to V's dtype for the P·V
    product. With HAS_TAIL only keys 0 .. n_tail count, key n_tail with logit + log2(LK - n_tail) (the
    merged tail); else all LK keys. Returns fp32 [BLOCK_M, DH]."""
    if HAS_TAIL:
        kv_end = tl.minimum(n_tail + 1, LK)
        tail_bias = tl.log2(tl.maximum(LK - n_tail, 1).to(tl.float32))
    else:
        kv_end = LK
        tail_bias = 0.0
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DH], tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        live = rn < kv_end
        kt = tl.load(k_base + rn[:, None] * skl + d[None, :], mask=live[:, None], other=0.0)
        if DOT_F32:  # the CPU interpreter multiplies 16-bit float operands as their raw bits
            s = tl.dot(qn.to(tl.float32), tl.trans(kt.to(tl.float32))) * qk_scale
        else:
            s = tl.dot(qn, tl.trans(kt)) * qk_scale
        if HAS_TAIL:
            s = s + tl.where(rn == n_tail, tail_bias, 0.0)[None, :]
        s = tl.where(live[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + rn[:, None] * svl + d[None, :], mask=live[:, None], other=0.0)
        if DOT_F32:
            acc = tl.dot(round_to(p, vt.dtype), vt.to(tl.float32), acc * alpha[:, None])
        else:
            acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
        m_i = m_new
    return acc / l_i[:, None]


@triton.jit
def _tail_merged_attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, n_ptr,
                             L, LK, H, qk_scale,
                             sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
                             D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n = tl.load(n_ptr + bh)  # tail start: keys n .. LK-1 are key n, m = LK - n times
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + h * sqh + rm[:, None] * sql + d[None, :], mask=rm[:, None] < L, other=0.0)
    out = head_attention(q, k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh, n, LK, skl, svl, qk_scale, d,
                         True, BLOCK_M, BLOCK_N, D, DOT_F32)
    tl.store(o_ptr + b * sob + h * soh + rm[:, None] * sol + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rm[:, None] < L)


# The launch config. Not autotuned: the work depends on the tail start, which is data (an autotuner
# would tune for whatever prompt came first). 64-row query tiles x 64-key blocks, 4 warps, 2 stages was
# the fastest of ``attention_configs`` at every prompt length from 16 to 512 real tokens, at Wan-1.3B
# and Wan-14B shapes (H200, RESULTS.md session 23): several small programs per SM hide each one's loads.
DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def attention_configs() -> list:
    """Launch configs compared by ``benchmarks/probe_cross.py --merged``: 128-row query tiles on two
    warpgroups (the Hopper shape) and 64-row tiles, key blocks of 64 or 128."""
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        # small tiles, several programs per SM (loads of one under another's math)
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    ]


def key_tail_start_triton(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k, v ``[B, Lk, H, D]`` (unit last stride) -> int32 ``[B, H]`` tail starts."""
    B, Lk, H, D = k.shape
    n = torch.zeros(B, H, device=k.device, dtype=torch.int32)
    if B * H == 0:
        return n
    block_r = 16 if triton_interpret() else 32
    _key_tail_start_kernel[(B * H, triton.cdiv(Lk, block_r))](
        k, v, n, Lk, H, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), D=D,
        BLOCK_R=block_r, num_warps=4)
    return n


def tail_merged_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tail_start: torch.Tensor,
                                 config: dict | None = None) -> torch.Tensor:
    """Attention of q ``[B, L, H, D]`` over k, v ``[B, Lk, H, D]`` with keys ``tail_start[b, h]`` ..
    merged (int32 ``[B, H]``, contiguous); output ``[B, L, H, D]`` contiguous in q's dtype.
    ``config``: ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}`` instead of :data:`DEFAULT_CONFIG`
    (the CPU interpreter uses 16 x 16 tiles unless given one)."""
    B, L, H, D = q.shape
    Lk = k.shape[1]
    out = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    qk_scale = _LOG2E / math.sqrt(D)
    args = (q, k, v, out, tail_start, L, Lk, H, qk_scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2))
    if config is None:
        config = {"BLOCK_M": 16, "BLOCK_N": 16, "num_stages": 1} if triton_interpret() else DEFAULT_CONFIG
    cfg = {**DEFAULT_CONFIG, **config}
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), B * H)
    _tail_merged_attn_kernel[grid](*args, D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                   DOT_F32=triton_interpret(), num_warps=cfg["num_warps"],
                                   num_stages=cfg["num_stages"])
    return out
