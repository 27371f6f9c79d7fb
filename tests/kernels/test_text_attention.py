"""Merged padding keys: the Triton kernels (interpreter on CPU, compiled on a GPU) vs the references, and
the references vs plain attention over every key when the tail really is one repeated key."""

from __future__ import annotations

import math

import pytest
import torch

from tests._env import kernel_device, triton_runs_here
from turbocompile.kernels.text_attention import ref
from turbocompile.ops.text_attention import key_tail_start, tail_merged_attention

DEV = kernel_device()
needs_triton = pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _full_attention64(q, k, v):
    """fp64 softmax attention over every key, [B, L, H, D]."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (torch.softmax(s, -1) @ vd).transpose(1, 2)


def _padded_kv(B, Lk, H, D, n, dt=torch.bfloat16, seed=0):
    """k, v whose rows n.. repeat one row (per head), as Wan's zero-padded prompt produces."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Lk, H, D, generator=g) * 1.5
    v = torch.randn(B, Lk, H, D, generator=g) + 0.3
    if n < Lk:
        pad_k, pad_v = torch.randn(B, 1, H, D, generator=g), torch.randn(B, 1, H, D, generator=g)
        k[:, n:] = pad_k
        v[:, n:] = pad_v
    return k.to(dt), v.to(dt)


# ----------------------------------------------------------------------------- references
@pytest.mark.parametrize("n", [0, 1, 5, 23, 24])
def test_reference_equals_attention_over_every_key(n):
    B, L, H, D, Lk = 2, 19, 3, 32, 24
    q = torch.randn(B, L, H, D).to(torch.bfloat16)
    k, v = _padded_kv(B, Lk, H, D, n)
    t = ref.key_tail_start_ref(k, v)
    # the repeated run starts at n (the last row is its own run of one when nothing repeats)
    assert torch.equal(t, torch.full((B, H), min(n, Lk - 1), dtype=torch.int32))
    out = ref.tail_merged_attention_ref(q, k, v, t)
    assert rel(out, _full_attention64(q, k, v)) < 4e-3  # bf16 output rounding only


def test_reference_tail_start_is_per_batch_and_head_and_never_merges_nan():
    k, v = _padded_kv(2, 10, 2, 16, 4)
    k[1, :, 0] = k[1, 9, 0]  # batch 1 head 0: every row repeats -> 0
    v[1, :, 0] = v[1, 9, 0]
    v[0, 7, 1, 3] += 1.0  # batch 0 head 1: row 7 differs in v only -> 8
    assert ref.key_tail_start_ref(k, v).tolist() == [[4, 8], [0, 4]]
    k[1, 9, 1, 0] = float("nan")  # NaN never equals itself: no row matches the last -> 10
    assert ref.key_tail_start_ref(k, v).tolist() == [[4, 8], [0, 10]]
    k, v = _padded_kv(1, 6, 1, 16, 2)
    k[0, 2:, 0, 0] = 0.0
    k[0, 3, 0, 0] = -0.0  # -0.0 == 0.0: the same products, so the row still merges
    assert ref.key_tail_start_ref(k, v).tolist() == [[2]]


def test_reference_any_tail_start_is_a_weighted_attention():
    """For any n (rows need not repeat), keys n.. count as Lk - n copies of key n."""
    B, L, H, D, Lk = 1, 7, 2, 16, 9
    q, k, v = (torch.randn(B, s, H, D, dtype=torch.float64) for s in (L, Lk, Lk))
    for n in range(Lk + 1):
        t = torch.full((B, H), n, dtype=torch.int32)
        got = ref.tail_merged_attention_ref(q, k, v, t)
        if n == Lk:
            want = _full_attention64(q, k, v)
        else:  # explicit copies of key n
            reps = torch.cat([torch.arange(n), torch.full((Lk - n,), n)])
            want = _full_attention64(q, k[:, reps], v[:, reps])
        assert rel(got, want) < 1e-6, n


# ----------------------------------------------------------------------------- kernels
@needs_triton
@pytest.mark.parametrize("B,Lk,H,D,n", [(2, 40, 3, 64, 13), (1, 24, 2, 128, 0), (1, 33, 2, 32, 33),
                                        (1, 1, 1, 16, 0), (2, 77, 2, 64, 76), (1, 512, 2, 64, 100)])
def test_key_tail_start_kernel_matches_reference(B, Lk, H, D, n):
    k, v = _padded_kv(B, Lk, H, D, n)
    k, v = k.to(DEV), v.to(DEV)
    if n < Lk - 1 and Lk > 3:  # one head where a single element of one tail row differs in v
        v[0, Lk - 2, H - 1, D - 1] += 1.0
    got = key_tail_start(k, v, backend="triton")
    assert got.dtype == torch.int32 and got.shape == (B, H)
    assert torch.equal(got.cpu(), ref.key_tail_start_ref(k.cpu(), v.cpu()))


@needs_triton
def test_key_tail_start_kernel_nan_and_strided_inputs():
    B, Lk, H, D = 1, 20, 2, 32
    k, v = _padded_kv(B, Lk, H, D, 6)
    k[0, 19, 1, 5] = float("nan")
    k[0, 2:, 0, 0] = 0.0
    k[0, 4, 0, 0] = -0.0  # equals 0.0 as a value: still merged
    kv = torch.cat([k, v], dim=-1).to(DEV)  # k and v as strided views of one [B, Lk, H, 2D] tensor
    got = key_tail_start(kv[..., :D], kv[..., D:], backend="triton").cpu()
    assert got.tolist() == [[6, 20]]  # head 1: a NaN in the last row matches no row, not even itself


@needs_triton
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L,H,D,Lk,n", [
    (2, 37, 3, 64, 40, 13),   # odd L, tail inside the first key block
    (1, 20, 2, 128, 24, 0),   # every key repeats: one key
    (1, 33, 2, 32, 24, 24),   # nothing repeats (the last row is a tail of one)
    (1, 5, 1, 16, 1, 0),      # one key, tiny L
    (2, 50, 2, 64, 77, 70),   # tail in a later key block, Lk not a multiple of any block
])
def test_attention_kernel_matches_attention_over_every_key(dt, B, L, H, D, Lk, n):
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(B, L, H, D, generator=g) * 1.2).to(dt).to(DEV)
    k, v = _padded_kv(B, Lk, H, D, n, dt)
    k, v = k.to(DEV), v.to(DEV)
    t = key_tail_start(k, v, backend="triton")
    out = tail_merged_attention(q, k, v, t, backend="triton")
    assert out.dtype == dt and out.shape == (B, L, H, D)
    full = _full_attention64(q.cpu(), k.cpu(), v.cpu())
    # P is rounded to the value dtype for the P·V product (as SDPA's kernels do): ~2^-9 relative in bf16
    assert rel(out.cpu(), full) < (1e-2 if dt == torch.bfloat16 else 3e-3)
    assert rel(out.cpu(), ref.tail_merged_attention_ref(q, k, v, t).cpu()) < (1e-2 if dt == torch.bfloat16 else 3e-3)


@needs_triton
def test_attention_kernel_any_tail_start_and_model_layout():
    """Arbitrary tail starts per (batch, head), q/k/v as [B, L, H, D] views of [B, L, H·D] rows (the model's
    layout), large logits (softmax must subtract its running max)."""
    B, L, H, D, Lk = 2, 29, 2, 64, 36
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(B, L, H * D, generator=g) * 4).to(torch.bfloat16).to(DEV).unflatten(-1, (H, D))
    kv = torch.randn(B, Lk, 2 * H * D, generator=g).to(torch.bfloat16).to(DEV)
    k, v = kv[..., :H * D].unflatten(-1, (H, D)), kv[..., H * D:].unflatten(-1, (H, D))
    t = torch.tensor([[0, 17], [35, 36]], dtype=torch.int32, device=DEV)
    out = tail_merged_attention(q, k, v, t, backend="triton")
    want = ref.tail_merged_attention_ref(q, k, v, t)
    assert torch.isfinite(out).all()
    assert rel(out.cpu(), want.cpu()) < 1e-2


@needs_triton
def test_attention_kernel_zero_queries_and_outliers():
    B, L, H, D, Lk = 1, 18, 1, 32, 30
    q = torch.zeros(B, L, H, D, dtype=torch.bfloat16)
    q[0, 3] = 60.0  # one row with a huge logit range
    k, v = _padded_kv(B, Lk, H, D, 9)
    q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)
    t = key_tail_start(k, v, backend="triton")
    out = tail_merged_attention(q, k, v, t, backend="triton").cpu()
    full = _full_attention64(q.cpu(), k.cpu(), v.cpu())
    assert torch.isfinite(out).all()
    assert rel(out, full) < 1e-2
    # a zero query weighs every key equally: the 21 padding copies carry 21/30 of the weight
    even = full[0, 0, 0]
    assert rel(out[0, 0, 0], even) < 1e-2
