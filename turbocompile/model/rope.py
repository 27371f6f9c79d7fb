"""Real-valued 3D RoPE for the Wan DiT (``wan-architecture.md`` §1.5).

The head dim d is split into complex pairs (2j, 2j+1): the first d_t/2 pairs rotate with
the frame index, the next d_h/2 with the row, the last d_w/2 with the column, where
d_h = d_w = 2·⌊d/6⌋ and d_t = d − 2·d_h (44/42/42 for d = 128). Frequencies are
ω = 10000^(−2j'/d_axis) with j' the pair index local to its axis; positions start at 0.
Angles are computed in float64 and the tables stored as float32, as TurboDiffusion does.
"""

from __future__ import annotations

import torch

__all__ = ["rope_axis_dims", "rope_tables", "apply_rope"]


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels rotated by (time, height, width)."""
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def _axis_freqs(channels: int) -> torch.Tensor:
    return 1.0 / torch.pow(10000.0, torch.arange(0, channels, 2, dtype=torch.float64) / channels)


def rope_tables(grid: tuple[int, int, int], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each float32 ``[L, head_dim // 2]`` for a (T, H, W) token grid.

    Tokens are ordered (t, h, w) with w fastest, matching patchify.
    """
    t, h, w = grid
    d_t, d_h, d_w = rope_axis_dims(head_dim)
    ft = torch.outer(torch.arange(t, dtype=torch.float64), _axis_freqs(d_t))  # [T, d_t/2]
    fh = torch.outer(torch.arange(h, dtype=torch.float64), _axis_freqs(d_h))  # [H, d_h/2]
    fw = torch.outer(torch.arange(w, dtype=torch.float64), _axis_freqs(d_w))  # [W, d_w/2]
    angles = torch.cat(
        [
            ft[:, None, None, :].expand(t, h, w, d_t // 2),
            fh[None, :, None, :].expand(t, h, w, d_h // 2),
            fw[None, None, :, :].expand(t, h, w, d_w // 2),
        ],
        dim=-1,
    ).reshape(t * h * w, head_dim // 2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [B, L, H, d] (float32) by tables [L, 1, d/2] (float32).

    (a, b) → (a·cos − b·sin, a·sin + b·cos) for each pair (x[..., 2j], x[..., 2j+1]).
    The tables come pre-shaped [L, 1, d/2] so that tracing records them as graph
    attributes rather than as sliced constants.
    """
    pairs = x.unflatten(-1, (-1, 2))
    a = pairs[..., 0]
    b = pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
