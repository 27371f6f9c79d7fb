"""diffusers drop-in: an optimized artifact as a ``WanPipeline`` transformer, rCM as its scheduler.

::

    from turbocompile.integrations.diffusers import to_diffusers_pipeline
    pipe = to_diffusers_pipeline("out/wan-1.3b-turbo", pipe)       # WanPipeline from diffusers
    video = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).frames

* :class:`TurboWanTransformer` — a thin ``nn.Module`` with what ``WanPipeline`` calls:
  ``forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
  attention_kwargs=None, return_dict=False)``, ``.dtype``, ``.config`` (patch_size,
  in_channels, out_channels), ``.device`` and a no-op ``cache_context``. For I2V,
  ``hidden_states`` is diffusers' ``cat([latents, condition])``: it is split into x and y.
* :class:`RCMScheduler` — a ``SchedulerMixin``/``ConfigMixin`` scheduler implementing
  TurboDiffusion's rCM update (float64 state, bf16-rounded timesteps, SDE or ODE).

``WanPipeline`` starts from unscaled noise ε0 while rCM starts at x_0 = t_0·ε0, and diffusers
has no hook for that in Wan pipelines: when the scheduler is linked to the transformer
(:func:`to_diffusers_pipeline` does it), the transformer asks the scheduler to scale its
first-step input (:meth:`RCMScheduler.scale_model_input`), and the scheduler's first
``step`` treats ``sample`` as ε0. With that, the pipeline reproduces
:func:`~turbocompile.sampling.rcm.rcm_sample` exactly when the artifact is float32 (for
bf16 artifacts x passes float64 → float32 (``.dtype``) → bf16: a double rounding that can
move rare ties by one bf16 ulp). Baked *sampler* artifacts are not denoisers and cannot
be used as a transformer: optimize a denoiser recipe for diffusers.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Sequence

import torch
from torch import nn

from turbocompile.errors import InputError

try:  # diffusers is optional: the adapter works without it, the scheduler needs it
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
    _HAVE_DIFFUSERS = True
except ImportError:  # pragma: no cover - exercised only without diffusers
    _HAVE_DIFFUSERS = False
    ConfigMixin = SchedulerMixin = object  # type: ignore[misc,assignment]

    def register_to_config(fn):  # type: ignore[no-redef]
        return fn

__all__ = ["TurboWanTransformer", "RCMScheduler", "to_diffusers_pipeline"]


class _Output:
    def __init__(self, sample):
        self.sample = sample

    def __getitem__(self, i):
        return (self.sample,)[i]


class TurboWanTransformer(nn.Module):
    """Adapter making a turbocompile denoiser (``CompiledWan`` or any Wan-contract module) look
    like diffusers' ``WanTransformer3DModel`` to ``WanPipeline``.

    Args:
        denoiser: ``denoiser(x, timestep, context[, y=..., clip_fea=...]) -> velocity``.
        config: the denoiser's :class:`~turbocompile.model.config.WanConfig`.
        activation_dtype: dtype the denoiser computes in (x is cast to it; ``.dtype`` reports
            float32 so the pipeline keeps latents and prompt embeddings in float32).
    """

    def __init__(self, denoiser, config, activation_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.denoiser = denoiser
        self.wan_config = config
        self.activation_dtype = activation_dtype
        self.scheduler_link = None
        i2v = config.model_type == "i2v"
        self.config = SimpleNamespace(
            patch_size=tuple(config.patch_size), in_channels=config.in_dim, out_channels=config.out_dim,
            num_attention_heads=config.num_heads, attention_head_dim=config.head_dim, text_dim=config.text_dim,
            freq_dim=config.freq_dim, ffn_dim=config.ffn_dim, num_layers=config.num_layers,
            image_dim=config.image_dim if config.has_image_input else None, i2v=i2v,
        )

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        for t in self.buffers():
            return t.device
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):  # noqa: ARG002 - diffusers' cache hook API
        """No caching hooks: a compiled graph has none to configure."""
        yield

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                attention_kwargs=None, return_dict: bool = False, **kwargs):
        if attention_kwargs:
            raise InputError(f"attention_kwargs {sorted(attention_kwargs)} are not supported by a compiled graph")
        cfg = self.wan_config
        x, y = hidden_states, None
        if cfg.model_type == "i2v":
            if x.shape[1] != cfg.in_dim:
                raise InputError(f"hidden_states has {x.shape[1]} channels; this I2V model expects latents+condition "
                                 f"= {cfg.in_dim}")
            x, y = x[:, :cfg.out_dim], x[:, cfg.out_dim:]
        if self.scheduler_link is not None:
            x = self.scheduler_link.scale_model_input(x, timestep)
        if timestep.dim() == 0:
            timestep = timestep.expand(x.shape[0])
        if timestep.dim() != 1:
            raise InputError(f"timestep of shape {list(timestep.shape)} (per-token timesteps) is not supported; "
                             "expected [B]")
        kw = {}
        if y is not None:
            kw["y"] = y.to(self.activation_dtype)
        if encoder_hidden_states_image is not None:
            kw["clip_fea"] = encoder_hidden_states_image.to(self.activation_dtype)
        out = self.denoiser(x.to(self.activation_dtype), timestep.float(),
                            encoder_hidden_states.to(self.activation_dtype), **kw).float()
        return _Output(out) if return_dict else (out,)


class RCMScheduler(SchedulerMixin, ConfigMixin):
    """TurboDiffusion's rCM few-step sampler as a diffusers scheduler (``wan-architecture.md`` §5.2).

    ``set_timesteps(N)`` (N in 1..4) builds the schedule; ``timesteps`` are bf16(1000·t_i) as
    float32 (what the net sees), ``sigmas`` the RF times t_0..t_N. ``step`` keeps the state in
    float64: the first call takes ``sample`` = ε0 and sets x_0 = t_0·ε0; SDE
    x_{i+1} = (1−t_{i+1})(x_i − t_i·v) + t_{i+1}·ε_{i+1}, ODE x_{i+1} = x_i − (t_i − t_{i+1})·v.
    The last step returns float32 (like ``rcm_sample``). SDE noise comes from ``step_noise``
    (set with :meth:`set_noise`), else a float32 ``torch.randn`` from ``generator`` (the step's
    argument, else the one given to :meth:`set_noise`) on the sample's device.
    """

    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, sigma_max: float = 80.0,
                 mid_times: Sequence[float] = (1.5, 1.4, 1.0), mode: str = "sde"):
        if not _HAVE_DIFFUSERS:  # pragma: no cover
            raise ImportError("RCMScheduler needs diffusers (pip install diffusers)")
        if mode not in ("sde", "ode"):
            raise InputError(f"rCM mode must be one of sde, ode, got {mode!r}")
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0, dtype=torch.float64)
        self.num_inference_steps = None
        self._ts: list[float] = []
        self._step_index = None
        self._begin_index = None
        self._x = None
        self._generator = None
        self._step_noise = None
        self.init_noise_sigma = 1.0

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def set_noise(self, generator: torch.Generator | None = None,
                  step_noise: Sequence[torch.Tensor] | None = None) -> None:
        """Source of the SDE step noise for the next sampling run."""
        self._generator = generator
        self._step_noise = None if step_noise is None else list(step_noise)

    def set_timesteps(self, num_inference_steps: int, device=None, **kwargs):
        from turbocompile.sampling.schedules import SamplingError, rcm_schedule, rcm_timesteps_bf16

        try:
            ts = rcm_schedule(num_inference_steps, self.config.sigma_max, self.config.mid_times)
        except SamplingError as exc:
            raise InputError(f"RCMScheduler: {exc}") from None
        self._ts = ts
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(rcm_timesteps_bf16(ts[:-1]), dtype=torch.float32, device=device)
        self.sigmas = torch.tensor(ts, dtype=torch.float64)
        self._step_index = None
        self._x = None
        if self._step_noise is not None and len(self._step_noise) != num_inference_steps:
            raise InputError(f"step_noise holds {len(self._step_noise)} tensors; {num_inference_steps} steps need "
                             f"{num_inference_steps}")

    def _index(self) -> int:
        if self._step_index is None:
            return self._begin_index or 0
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:  # noqa: ARG002
        """The net input: t_0·ε0 (float64) at the first step, ``sample`` after."""
        if self._index() == 0:
            return self._ts[0] * sample.double()
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        if not self._ts:
            raise InputError("RCMScheduler.step called before set_timesteps")
        i = self._index()
        t, t_next = self._ts[i], self._ts[i + 1]
        x = self._ts[0] * sample.double() if i == 0 else sample.double()
        v = model_output.double()
        if self.config.mode == "sde":
            if self._step_noise is not None:
                eps = self._step_noise[i].to(sample.device)
            else:
                gen = generator if generator is not None else self._generator
                eps = torch.randn(sample.shape, generator=gen, dtype=torch.float32, device=sample.device)
            x = (1.0 - t_next) * (x - t * v) + t_next * eps.double()
        else:
            x = x - (t - t_next) * v
        self._step_index = i + 1
        if self._step_index == len(self._ts) - 1:
            x = x.float()
        if not return_dict:
            return (x,)
        return SchedulerOutput(prev_sample=x)

    def __len__(self):
        return self.config.num_train_timesteps


def to_diffusers_pipeline(artifact_or_module, pipe, *, scheduler: "RCMScheduler | None | bool" = True,
                          sigma_max: float | None = None, mode: str = "sde", device=None):
    """Put an optimized denoiser into ``pipe`` (a diffusers ``WanPipeline``) and return ``pipe``.

    Args:
        artifact_or_module: artifact directory, a ``CompiledWan`` from :func:`turbocompile.load`,
            or a ``(denoiser, WanConfig, activation_dtype)`` tuple.
        scheduler: ``True`` installs a new :class:`RCMScheduler` (σ_max 80 T2V / 200 I2V unless
            ``sigma_max``), an instance installs that one, ``False``/``None`` keeps the pipeline's.
    """
    from turbocompile.api import CompiledWan, load

    if isinstance(artifact_or_module, tuple):
        den, cfg, dt = artifact_or_module
    else:
        module = artifact_or_module
        if not isinstance(module, nn.Module):
            module = load(module, device=device)
        if not isinstance(module, CompiledWan):
            raise InputError("a baked sampler artifact cannot serve as a diffusers transformer; optimize a denoiser "
                             "recipe (without bake_rcm_sampler) for diffusers")
        den, cfg, dt = module, module.config, module.activation_dtype
    transformer = TurboWanTransformer(den, cfg, dt)
    pipe.transformer = transformer
    if scheduler is True:
        sm = sigma_max if sigma_max is not None else (200.0 if cfg.model_type == "i2v" else 80.0)
        scheduler = RCMScheduler(sigma_max=sm, mode=mode)
    if scheduler:
        pipe.scheduler = scheduler
        transformer.scheduler_link = scheduler
    return pipe
