import math

import pytest
import torch

from turbocompile.errors import ModelConfigError
from turbocompile.model.config import PRESETS, get_preset
from turbocompile.model.rope import apply_rope, rope_axis_dims, rope_tables


def test_presets_match_the_published_configs():
    c = get_preset("wan2.1-t2v-1.3b")
    assert (c.dim, c.ffn_dim, c.num_heads, c.num_layers, c.head_dim) == (1536, 8960, 12, 30, 128)
    c = get_preset("wan2.1-t2v-14b")
    assert (c.dim, c.ffn_dim, c.num_heads, c.num_layers) == (5120, 13824, 40, 40)
    assert get_preset("wan2.2-i2v-a14b").in_dim == 36 and get_preset("wan2.2-i2v-a14b").num_experts == 2
    assert get_preset("wan-tiny").head_dim == 128


@pytest.mark.parametrize("size,frames,seq", [((832, 480), 81, 32760), ((1280, 720), 81, 75600),
                                             ((1280, 704), 81, 73920)])
def test_sequence_lengths(size, frames, seq):
    assert get_preset("wan2.1-t2v-14b").video_shape(frames=frames, size=size).seq_len == seq


def test_5b_geometry():
    assert get_preset("wan2.2-ti2v-5b").video_shape().seq_len == 27280


def test_bad_geometry_and_names():
    with pytest.raises(ModelConfigError, match="frames"):
        get_preset("wan-tiny").video_shape(frames=8)
    with pytest.raises(ModelConfigError, match="multiple"):
        get_preset("wan-tiny").video_shape(size=(100, 128))
    with pytest.raises(ModelConfigError, match="wan-tiny"):
        get_preset("nope")
    assert sorted(PRESETS)


def test_rope_split_and_against_complex_reference():
    assert rope_axis_dims(128) == (44, 42, 42)
    grid = (3, 4, 5)
    cos, sin = rope_tables(grid, 128)
    assert cos.shape == (60, 64) and cos.dtype == torch.float32
    # independent float64 complex formulation of §1.5
    d_t, d_h, _ = 44, 42, 42

    def freqs(n):
        return 1.0 / 10000 ** (torch.arange(0, n, 2, dtype=torch.float64) / n)

    pos = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    ang = torch.cat([pos[:, :1] * freqs(d_t), pos[:, 1:2] * freqs(d_h), pos[:, 2:] * freqs(d_h)], -1)
    x = torch.randn(2, 60, 3, 128, dtype=torch.float64)
    xc = torch.view_as_complex(x.reshape(2, 60, 3, 64, 2))
    ref = torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[None, :, None, :]).reshape(2, 60, 3, 128)
    out = apply_rope(x.float(), cos[:, None], sin[:, None])
    assert (out.double() - ref).abs().max() < 1e-5
    assert math.isclose(ang[59, 0].item(), 2.0)
