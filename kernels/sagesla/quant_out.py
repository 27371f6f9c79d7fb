"""SageSLA's output as the o projection's FP8 input: the per-sample bound and the epilogue's codes.

The o projection (``w8a8_linear`` FP8, per-token activations) quantizes each token at its abs-max / 448, a
pass over the attention output that the attention kernel itself cannot do: a token's heads live in
different programs. With one scale per *sample*, ``bound_b / 448`` where bound_b bounds every output of
sample b (``ref.output_bound_ref``: SageSLA's output is a convex combination of value rows, up to P's
e4m3 rounding, plus the linear branch's proj_l), each program writes its head's FP8 codes directly.

* :func:`sample_bound` (``_sample_bound_kernel``, one program per sample): bound_b from the V scales that
  `prepare` made anyway (``vscale [B*H, D] = max|v| / 448 + eps``: max over the sample's heads and
  channels, times 448) and proj_l (``R = max_r Σ_c |W[r, c]|``, ``max |b|``), with the quantizer's two
  correctly rounded quotients ``448 / bound_b`` and ``bound_b / 448`` (the scale): the attention epilogue
  then divides nothing (an IEEE division there is a subroutine call, whose saved registers spilled the
  Gluon epilogue). One small launch; the pass it replaces read and wrote the whole output.
* :func:`fp8_codes`: the attention epilogue's tile, rounded to the model dtype as the unfused graph stores
  it, then ``e4m3_rne(clamp(x · (448 / bound_b), ±448))`` (the per-token quantizer's formula at the
  bound); the interpreter rounds on the grid itself (its own casts truncate).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..norms.triton_rounding import round_e4m3, round_to
from .pdl import pdl_enter, pdl_launch_kwargs
from .ref import P8_SLACK

__all__ = ["sample_bound", "fp8_codes", "stored_f32"]

_GAIN = 1.0 + P8_SLACK  # exact in fp32 (17/16)


@triton.jit
def _sample_bound_kernel(
    vscale_ptr,  # [B*H, D] fp32 FP8 V scales, contiguous
    w_ptr,  # [D, D] proj_l weight (out, in), any float dtype (HAS_W)
    b_ptr,  # [D] proj_l bias, any float dtype (HAS_B)
    out_ptr,  # [3, B] fp32 out: bound, 448 / bound, bound / 448
    H, B, stride_wo, stride_wi, gain,
    HEAD_D: tl.constexpr, HB: tl.constexpr, WB: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, PDL: tl.constexpr,
):
    """bound[b] = 448 · max vscale[b·H .. b·H+H-1, :] · (gain + R) + max|bias| (`ref.output_bound_ref`) and
    its two quotients by 448, each correctly rounded (`div_rn`, as the reference's true divisions)."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    d = tl.arange(0, HEAD_D)
    hs = tl.arange(0, HB)
    base = vscale_ptr + b.to(tl.int64) * H * HEAD_D
    vm = tl.zeros([HB, HEAD_D], tl.float32)  # scales are > 0
    for h0 in range(0, H, HB):
        rows = h0 + hs
        vm = tl.maximum(vm, tl.load(base + rows[:, None] * HEAD_D + d[None, :], mask=(rows < H)[:, None], other=0.0))
    cap = tl.max(tl.max(vm, axis=1), axis=0) * 448.0
    if HAS_W:  # R = the largest row sum of |W|, WB rows at a time
        rs = tl.zeros([WB], tl.float32)
        for r0 in range(0, HEAD_D, WB):
            r = r0 + tl.arange(0, WB)
            w = tl.load(w_ptr + r[:, None] * stride_wo + d[None, :] * stride_wi).to(tl.float32)
            rs = tl.maximum(rs, tl.sum(tl.abs(w), axis=1))
        gain = gain + tl.max(rs, axis=0)
    bound = cap * gain
    if HAS_B:
        bound = bound + tl.max(tl.abs(tl.load(b_ptr + d).to(tl.float32)), axis=0)
    qmax = tl.full([1], 448.0, tl.float32)
    bvec = tl.zeros([1], tl.float32) + bound
    one = tl.arange(0, 1)
    tl.store(out_ptr + b + one, bvec)
    tl.store(out_ptr + B + b + one, tl.math.div_rn(qmax, bvec))
    tl.store(out_ptr + 2 * B + b + one, tl.math.div_rn(bvec, qmax))


def sample_bound(vscale: torch.Tensor, batch: int, proj_weight: torch.Tensor | None,
                 proj_bias: torch.Tensor | None, pdl: bool = False) -> torch.Tensor:
    """fp32 ``[3, B]``: the output bounds, ``448 / bound`` and ``bound / 448`` (the scales), from `prepare`'s
    ``vscale [B*H, D]`` (contiguous) and proj_l (weight ``[D, D]``, bias ``[D]``, either None), one launch;
    ``pdl``: launch as a chained kernel (`pdl`). Row 0 equals ``ref.output_bound_ref(v, proj_weight,
    proj_bias)`` up to the fp32 order of R's row sums."""
    BH, D = vscale.shape
    out = torch.empty(3, batch, device=vscale.device, dtype=torch.float32)
    w = proj_weight if proj_weight is not None else vscale  # placeholders the kernel never reads
    bias = proj_bias if proj_bias is not None else vscale
    H = BH // batch
    _sample_bound_kernel[(batch,)](
        vscale, w, bias, out, H, batch, w.stride(0), w.stride(-1), _GAIN,
        HEAD_D=D, HB=max(2, min(16, triton.next_power_of_2(H))), WB=16, HAS_W=proj_weight is not None,
        HAS_B=proj_bias is not None, PDL=pdl, num_warps=4, **pdl_launch_kwargs(pdl))
    return out


@triton.jit
def stored_f32(o, dt: tl.constexpr, EXACT: tl.constexpr):
    """The values of fp32 ``o`` as a ``dt`` tensor stores them (RNE), as fp32. GPU: the hardware cast, and
    bf16 back through its bits (a cast pair could be folded away); EXACT (interpreter): bit rounding, its
    own 16-bit casts truncate."""
    if EXACT:
        return round_to(o, dt)
    elif dt == tl.bfloat16:
        return (o.to(dt).to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return o.to(dt).to(tl.float32)


@triton.jit
def fp8_codes(o, inv, dt: tl.constexpr, EXACT: tl.constexpr):
    """e4m3 codes of the output tile ``o`` (fp32) stored as ``dt`` first, at ``inv`` = 448 / bound (the
    quantizer's correctly rounded reciprocal): ``e4m3_rne(clamp(x · inv, ±448))``."""
    y = tl.minimum(tl.maximum(stored_f32(o, dt, EXACT) * inv, -448.0), 448.0)
    if EXACT:  # the interpreter's e4m3 cast does not round to nearest even: round on the grid first
        y = round_e4m3(y)
    return y.to(tl.float8e4nv)
