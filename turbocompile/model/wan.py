"""The canonical Wan DiT, written to be traced by torch.fx.

Math: ``wan-architecture.md`` §1.4. Precision map: TurboDiffusion's (§1.7), made explicit
with casts instead of autocast. With activation dtype ``dt`` (the dtype of the block
weights, bf16 in deployment, float32 for exact tests):

* timestep sinusoid in float64 → float32; time MLP, projection and modulation in float32;
* LayerNorms computed in float32 and rounded to ``dt``; AdaLN modulation in float32 → ``dt``;
* q/k RMSNorm normalised in float32, rounded to ``dt``, then multiplied by the weight;
* RoPE in float32; attention and all block GEMMs in ``dt``;
* residual stream in ``dt`` (``x + y·bf16(gate)``); head (LN, modulation, Linear) in float32;
* output velocity float32 ``[B, out_dim, T, H, W]``.

Tracing rules followed here: static shapes (the token grid is a Python tuple fixed at
capture), no data-dependent Python control flow, no complex dtypes, no in-place writes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from turbocompile.model.config import WanConfig
from turbocompile.model.rope import apply_rope, rope_tables

__all__ = ["WanModel", "sinusoid_freqs"]


def _weight_dtype(module: nn.Module) -> torch.dtype:
    """dtype of ``module.weight`` as a Python constant, also while tracing.

    ``module.weight`` is a Proxy under torch.fx; the parameter dict lookup is not, so the
    activation dtype is baked into the graph as a constant instead of a ``getattr`` node.
    """
    return module._parameters["weight"].dtype


def sinusoid_freqs(freq_dim: int) -> torch.Tensor:
    """ω_i = 10000^(−i/half) for i < half = freq_dim/2, float64."""
    half = freq_dim // 2
    return torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)


class WanRMSNorm(nn.Module):
    """RMSNorm over the whole feature dim: ``dt(z·rsqrt(mean(z²)+eps)) · w``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dt = _weight_dtype(self)  # static activation dtype (a Python constant under tracing)
        zf = z.float()
        normed = zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(dt) * self.weight


class WanSelfAttention(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = WanRMSNorm(d, cfg.eps)
        self.norm_k = WanRMSNorm(d, cfg.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dt = _weight_dtype(self.norm_q)
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        q = apply_rope(q.float(), cos, sin).to(dt)
        k = apply_rope(k.float(), cos, sin).to(dt)
        # [B, L, H, d] -> [B, H, L, d] for SDPA; the sagesla pass replaces this whole
        # transpose / sdpa / transpose pattern with one op on [B, L, H, d].
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(a.transpose(1, 2).flatten(2))


class WanCrossAttention(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = WanRMSNorm(d, cfg.eps)
        self.norm_k = WanRMSNorm(d, cfg.eps)
        self.has_image_input = cfg.has_image_input
        if cfg.has_image_input:
            self.k_img = nn.Linear(d, d)
            self.v_img = nn.Linear(d, d)
            self.norm_k_img = WanRMSNorm(d, cfg.eps)

    def _attend(self, q, k, v):
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return a.transpose(1, 2).flatten(2)

    def forward(self, x, ctx, ctx_img=None):
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(ctx)).unflatten(-1, heads)
        v = self.v(ctx).unflatten(-1, heads)
        out = self._attend(q, k, v)
        if self.has_image_input:
            k_img = self.norm_k_img(self.k_img(ctx_img)).unflatten(-1, heads)
            v_img = self.v_img(ctx_img).unflatten(-1, heads)
            out = out + self._attend(q, k_img, v_img)
        return self.o(out)


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.dim = d
        self.eps = cfg.eps
        self.self_attn = WanSelfAttention(cfg)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def _norm_modulate(self, x, shift, scale):
        dt = _weight_dtype(self.norm3)
        ln = F.layer_norm(x.float(), (self.dim,), eps=self.eps).to(dt)
        return (ln.float() * (1 + scale) + shift).to(dt)

    def forward(self, x, e0, ctx, ctx_img, cos, sin):
        dt = _weight_dtype(self.norm3)
        m = self.modulation.float() + e0  # [B, 6, D] float32
        shift_a, scale_a, gate_a = m[:, 0:1], m[:, 1:2], m[:, 2:3]
        shift_f, scale_f, gate_f = m[:, 3:4], m[:, 4:5], m[:, 5:6]

        y = self.self_attn(self._norm_modulate(x, shift_a, scale_a), cos, sin)
        x = x + y * gate_a.to(dt)
        h = F.layer_norm(x.float(), (self.dim,), self.norm3.weight.float(), self.norm3.bias.float(),
                         eps=self.eps).to(dt)
        x = x + self.cross_attn(h, ctx, ctx_img)
        y = self.ffn(self._norm_modulate(x, shift_f, scale_f))
        return x + y * gate_f.to(dt)


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        pt, ph, pw = cfg.patch_size
        self.dim = cfg.dim
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * pt * ph * pw)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        m = self.modulation.float() + e.unsqueeze(1)  # [B, 2, D]; the head uses e, not e0
        shift, scale = m[:, 0:1], m[:, 1:2]
        h = F.layer_norm(x.float(), (self.dim,), eps=self.eps) * (1 + scale) + shift
        return F.linear(h, self.head.weight.float(), self.head.bias.float())


class WanImageEmbedding(nn.Module):
    """Wan2.1 I2V CLIP projection ``img_emb.proj``: LN, Linear, GELU, Linear, LN."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(cfg.image_dim), nn.Linear(cfg.image_dim, cfg.image_dim), nn.GELU(),
            nn.Linear(cfg.image_dim, cfg.dim), nn.LayerNorm(cfg.dim),
        )

    def forward(self, clip_fea, dt):
        n0, l1, _, l3, n4 = self.proj
        h = F.layer_norm(clip_fea.float(), n0.normalized_shape, n0.weight.float(), n0.bias.float(), n0.eps)
        h = F.gelu(F.linear(h.to(dt), l1.weight, l1.bias))
        h = F.linear(h, l3.weight, l3.bias)
        return F.layer_norm(h.float(), n4.normalized_shape, n4.weight.float(), n4.bias.float(), n4.eps).to(dt)


class WanModel(nn.Module):
    """Canonical Wan DiT (one expert).

    Call contract: ``model(x, timestep, context, *, y=None, clip_fea=None) -> velocity`` with
    x ``[B, C, T, H, W]``, timestep ``[B]`` on the 0–1000 scale, context ``[B, Lc, text_dim]``,
    y the I2V conditioning channels (concatenated to x inside), clip_fea ``[B, 257, 1280]``
    for Wan2.1 I2V; returns float32 ``[B, out_dim, T, H, W]``.

    State-dict keys are the original Wan keys, except ``patch_embedding.weight`` which is
    stored as a Linear ``[D, in_dim·pt·ph·pw]`` (TurboDiffusion's layout; feature order
    (c, kt, kh, kw)).
    """

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.patch_embedding = nn.Linear(cfg.patch_dim, d)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)
        if cfg.has_image_input:
            self.img_emb = WanImageEmbedding(cfg)
        self.register_buffer("time_freqs", sinusoid_freqs(cfg.freq_dim), persistent=False)
        self._rope_cache: dict = {}

    # -- helpers ---------------------------------------------------------------------
    @property
    def activation_dtype(self) -> torch.dtype:
        """Dtype of the residual stream and block GEMMs (that of the block weights)."""
        return _weight_dtype(self.text_embedding[0])

    def _apply(self, fn, *args, **kwargs):
        # ``.to(dtype)`` would round the float64 sinusoid frequencies; they are a pure
        # function of the config, so recompute them on the new device instead.
        out = super()._apply(fn, *args, **kwargs)
        self.time_freqs = sinusoid_freqs(self.config.freq_dim).to(self.time_freqs.device)
        self._rope_cache.clear()
        return out

    def init_non_persistent_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute buffers not stored in checkpoints, on the weights' device (or ``device``).

        Needed after building on the meta device and loading with ``assign=True``, where the
        buffer would otherwise stay on meta.
        """
        if device is None:
            device = self.text_embedding[0]._parameters["weight"].device
        self.time_freqs = sinusoid_freqs(self.config.freq_dim).to(device)
        self._rope_cache.clear()

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, str(device))
        if key not in self._rope_cache:
            cos, sin = rope_tables(grid, self.config.head_dim)
            self._rope_cache[key] = (cos[:, None, :].to(device), sin[:, None, :].to(device))
        return self._rope_cache[key]

    def grid_of(self, x: torch.Tensor) -> tuple[int, int, int]:
        pt, ph, pw = self.config.patch_size
        return (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)

    # -- forward ---------------------------------------------------------------------
    def forward(self, x, timestep, context, *, y=None, clip_fea=None):
        grid = self.grid_of(x)
        cos, sin = self.rope(grid, x.device)
        return self.forward_static(x, timestep, context, y=y, clip_fea=clip_fea, grid=grid, cos=cos, sin=sin)

    def forward_static(self, x, timestep, context, *, y, clip_fea, grid, cos, sin):
        """Forward with the token grid given as Python ints (what capture traces)."""
        cfg = self.config
        dt = self.activation_dtype
        t, h, w = grid
        pt, ph, pw = cfg.patch_size
        seq = t * h * w

        if cfg.model_type == "i2v":
            x = torch.cat([x, y], dim=1)
        # patchify [B, C, T, H, W] -> [B, L, C·pt·ph·pw], feature order (c, kt, kh, kw)
        x = x.to(dt).reshape(-1, cfg.in_dim, t, pt, h, ph, w, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(-1, seq, cfg.patch_dim)
        x = self.patch_embedding(x)

        # time embedding: float64 sinusoid -> float32 MLP (weights upcast explicitly)
        arg = timestep.double()[:, None] * self.time_freqs
        sinus = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).float()
        te0, te2 = self.time_embedding[0], self.time_embedding[2]
        e = F.linear(F.silu(F.linear(sinus, te0.weight.float(), te0.bias.float())),
                     te2.weight.float(), te2.bias.float())
        tp = self.time_projection[1]
        e0 = F.linear(F.silu(e), tp.weight.float(), tp.bias.float()).unflatten(1, (6, cfg.dim))

        ctx = self.text_embedding(context.to(dt))
        ctx_img = self.img_emb(clip_fea, dt) if cfg.has_image_input else None

        for block in self.blocks:
            x = block(x, e0, ctx, ctx_img, cos, sin)

        out = self.head(x, e)  # [B, L, pt·ph·pw·out] float32, feature order (kt, kh, kw, c)
        out = out.reshape(-1, t, h, w, pt, ph, pw, cfg.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(-1, cfg.out_dim, t * pt, h * ph, w * pw)


def init_random_(model: WanModel, seed: int = 0) -> WanModel:
    """Deterministic random weights at a scale that keeps activations O(1) (for built-in models).

    Values are drawn on the parameters' device (a CUDA generator for CUDA models, so a 14B
    model initialises in seconds); the same seed gives the same weights on the same device type.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
            if name.endswith(".weight") and p.ndim == 2:
                vals = noise / math.sqrt(p.shape[1])
            elif name.endswith(("norm_q.weight", "norm_k.weight", "norm_k_img.weight")):
                # q/k are RMS-normalised to unit scale: with weights ~1 the attention logits
                # q·k/√d would have std ≈ √d ≈ 11 (an argmax-like softmax no trained Wan has);
                # ~d^-1/4 keeps them O(1).
                vals = (1.0 + 0.1 * noise) * p.shape[0] ** -0.25 * 2 ** 0.25
            elif "norm" in name and name.endswith("weight"):
                vals = 1.0 + 0.1 * noise
            else:
                vals = 0.1 * noise
            p.copy_(vals.to(p.dtype))
    return model
