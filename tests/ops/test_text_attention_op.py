"""turbocompile::key_tail_start / ::tail_merged_attention as ops: one-line errors for bad input, fake kernels
(shapes without running), and the torch backend equal to SDPA over every key on a padded prompt."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbocompile.errors import KernelUnavailableError
from turbocompile.ops.text_attention import key_tail_start, tail_merged_attention


def _qkv(B=1, L=9, H=2, D=16, Lk=12, dt=torch.bfloat16):
    return (torch.randn(B, L, H, D).to(dt), torch.randn(B, Lk, H, D).to(dt), torch.randn(B, Lk, H, D).to(dt))


def test_torch_backend_on_a_padded_prompt_equals_sdpa_over_every_key():
    q, k, v = _qkv(B=2, L=21, H=3, D=32, Lk=30)
    k[:, 11:], v[:, 11:] = k[:, 11:12].clone(), v[:, 11:12].clone()
    t = key_tail_start(k, v, backend="torch")
    assert t.tolist() == [[11] * 3] * 2
    out = tail_merged_attention(q, k, v, t, backend="torch")
    want = F.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert ((out.double() - want).norm() / want.norm()).item() < 4e-3


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q, k, v[:, :5]), "k and v must be"),
    (lambda q, k, v: (q, k.float(), v.float()), "one dtype among bfloat16, float16"),
    (lambda q, k, v: (q, k[:, :0], v[:, :0]), "at least one key"),
    (lambda q, k, v: (q[..., :12], k[..., :12], v[..., :12]), "head dim D=12 unsupported; valid choices"),
    (lambda q, k, v: (q[:, :, :1], k, v), "q must be \\[B, L, H, D\\] with k's B, H, D"),
])
def test_bad_shapes_and_dtypes_are_one_line_errors(bad, match):
    q, k, v = bad(*_qkv())
    t = torch.zeros(k.shape[0], k.shape[2] if k.dim() == 4 else 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=match) as err:
        tail_merged_attention(q, k, v, t, backend="torch")
    assert "\n" not in str(err.value)


def test_tail_start_must_be_int32_b_by_h():
    q, k, v = _qkv()
    for t in (torch.zeros(1, 2, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int32)):
        with pytest.raises(ValueError, match="tail_start must be int32 \\[B, H\\] = \\[1, 2\\]"):
            tail_merged_attention(q, k, v, t, backend="torch")


def test_unknown_backend_names_the_choices():
    q, k, v = _qkv()
    with pytest.raises(KernelUnavailableError, match="valid choices: auto, triton, torch"):
        key_tail_start(k, v, backend="cuda")


def test_fake_kernels_give_shapes_without_running():
    q, k, v = (t.to("meta") for t in _qkv(B=2, L=7, H=3, D=64, Lk=512))
    t = key_tail_start(k, v)
    assert t.shape == (2, 3) and t.dtype == torch.int32 and t.device.type == "meta"
    out = tail_merged_attention(q, k, v, t)
    assert out.shape == (2, 7, 3, 64) and out.dtype == torch.bfloat16
