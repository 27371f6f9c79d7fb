"""Wan DiT configurations: the built-in presets and the video geometry.

Numbers follow ``wan-architecture.md`` §1.1 (Wan2.1 / Wan2.2 configs) and §1.2
(latent and sequence sizes). ``wan-tiny`` is our own small model with the real head
dim (128) that runs in seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from turbocompile.errors import ModelConfigError

__all__ = ["WanConfig", "VideoShape", "PRESETS", "get_preset", "preset_names"]

MODEL_TYPES = ("t2v", "i2v", "ti2v")


@dataclass(frozen=True, kw_only=True)
class WanConfig:
    """Architecture of one Wan DiT (one expert).

    Args:
        name: preset name or a free label.
        model_type: ``t2v``, ``i2v`` (conditioning channels ``y`` concatenated to x) or ``ti2v``.
        dim, ffn_dim, num_heads, num_layers: transformer sizes (head_dim = dim / num_heads).
        in_dim, out_dim: latent channels in (including ``y``'s) and out.
        text_dim, text_len: text-encoder width and the padded prompt length the model is traced for.
        freq_dim: sinusoidal timestep width.
        patch_size: (t, h, w) patch.
        eps: LayerNorm / RMSNorm epsilon.
        image_dim, image_len: CLIP feature width / tokens for Wan2.1 I2V (``has_image_input``).
        vae_stride: latent downsampling (t, h, w) of the matching VAE.
        num_experts: 2 for the Wan2.2 A14B high/low-noise pair, else 1.
        default_frames, default_size: the video the preset is usually run at ((width, height) pixels).
    """

    name: str = "custom"
    model_type: str = "t2v"
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    has_image_input: bool = False
    image_dim: int = 1280
    image_len: int = 257
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    num_experts: int = 1
    default_frames: int = 81
    default_size: tuple[int, int] = (832, 480)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ModelConfigError(
                f"model_type '{self.model_type}' is not valid; choose one of {', '.join(MODEL_TYPES)}"
            )
        for field in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim",
                      "text_len", "freq_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"model config '{field}' must be a positive integer, got {value!r}")
        if self.dim % self.num_heads:
            raise ModelConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.freq_dim % 2:
            raise ModelConfigError(f"freq_dim {self.freq_dim} must be even")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "vae_stride", tuple(int(p) for p in self.vae_stride))
        object.__setattr__(self, "default_size", tuple(int(p) for p in self.default_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Flattened patch width: in_dim · pt · ph · pw."""
        pt, ph, pw = self.patch_size
        return self.in_dim * pt * ph * pw

    @property
    def y_dim(self) -> int:
        """Channels of the I2V conditioning ``y`` (0 for t2v): in_dim − out_dim."""
        return self.in_dim - self.out_dim if self.model_type == "i2v" else 0

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("patch_size", "vae_stride", "default_size"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "WanConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelConfigError(f"unknown model config keys {unknown}; valid keys: {sorted(names)}")
        data = dict(data)
        for key in ("patch_size", "vae_stride", "default_size"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def video_shape(self, frames: int | None = None, size: tuple[int, int] | None = None,
                    batch: int = 1) -> "VideoShape":
        """Latent and token geometry for a video of ``frames`` frames at ``size`` = (width, height)."""
        frames = self.default_frames if frames is None else frames
        width, height = self.default_size if size is None else size
        st, sh, sw = self.vae_stride
        pt, ph, pw = self.patch_size
        if frames < 1 or (frames - 1) % st:
            raise ModelConfigError(f"frames must be 1 + a multiple of {st} (e.g. 81), got {frames}")
        if width % (sw * pw) or height % (sh * ph):
            raise ModelConfigError(
                f"size {width}x{height} must be a multiple of {sw * pw}x{sh * ph} pixels for this model"
            )
        latent_t = 1 + (frames - 1) // st
        if latent_t % pt:
            raise ModelConfigError(f"latent frames {latent_t} not divisible by temporal patch {pt}")
        return VideoShape(batch=batch, frames=frames, width=width, height=height, latent_t=latent_t,
                          latent_h=height // sh, latent_w=width // sw, patch_size=self.patch_size)


@dataclass(frozen=True, kw_only=True)
class VideoShape:
    """Static geometry a graph is captured for."""

    batch: int
    frames: int
    width: int
    height: int
    latent_t: int
    latent_h: int
    latent_w: int
    patch_size: tuple[int, int, int] = (1, 2, 2)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T, H, W) after patchify."""
        pt, ph, pw = self.patch_size
        return (self.latent_t // pt, self.latent_h // ph, self.latent_w // pw)

    @property
    def seq_len(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def latent(self, channels: int) -> tuple[int, int, int, int, int]:
        return (self.batch, channels, self.latent_t, self.latent_h, self.latent_w)

    def to_dict(self) -> dict:
        return {"batch": self.batch, "frames": self.frames, "width": self.width, "height": self.height,
                "latent": [self.latent_t, self.latent_h, self.latent_w], "grid": list(self.grid),
                "seq_len": self.seq_len}


_BIG = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, default_size=(1280, 720))

PRESETS: dict[str, WanConfig] = {
    "wan-tiny": WanConfig(name="wan-tiny", dim=256, ffn_dim=640, num_heads=2, num_layers=2, text_dim=64,
                          text_len=24, default_frames=9, default_size=(128, 128)),
    "wan-tiny-i2v": WanConfig(name="wan-tiny-i2v", model_type="i2v", dim=256, ffn_dim=640, num_heads=2,
                              num_layers=2, in_dim=36, text_dim=64, text_len=24, has_image_input=True,
                              default_frames=9, default_size=(128, 128)),
    "wan-tiny-i2v-a14b": WanConfig(name="wan-tiny-i2v-a14b", model_type="i2v", dim=256, ffn_dim=640, num_heads=2,
                                   num_layers=2, in_dim=36, text_dim=64, text_len=24, num_experts=2,
                                   default_frames=9, default_size=(128, 128)),
    "wan2.1-t2v-1.3b": WanConfig(name="wan2.1-t2v-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(name="wan2.1-t2v-14b", **_BIG),
    "wan2.1-i2v-14b": WanConfig(name="wan2.1-i2v-14b", model_type="i2v", in_dim=36, has_image_input=True,
                                **_BIG),
    "wan2.2-t2v-a14b": WanConfig(name="wan2.2-t2v-a14b", num_experts=2, **_BIG),
    "wan2.2-i2v-a14b": WanConfig(name="wan2.2-i2v-a14b", model_type="i2v", in_dim=36, num_experts=2, **_BIG),
    "wan2.2-ti2v-5b": WanConfig(name="wan2.2-ti2v-5b", model_type="ti2v", dim=3072, ffn_dim=14336,
                                num_heads=24, num_layers=30, in_dim=48, out_dim=48, vae_stride=(4, 16, 16),
                                default_frames=121, default_size=(1280, 704)),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> WanConfig:
    """Return the built-in config called ``name`` (one-line error listing the presets otherwise)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelConfigError(
            f"unknown model '{name}'; built-in models: {', '.join(preset_names())} "
            "(or give a checkpoint file or directory)"
        ) from None
