"""Loaded sampler artifacts (``bake_rcm_sampler``) and the one-call "generate latents" API.

* :class:`CompiledSampler` — what :func:`turbocompile.load` returns for a manifest of kind
  ``"sampler"``: ``module.sample(noise, context, *, y=None, clip_fea=None, generator=None,
  step_noise=None) -> latents`` (float32). The whole N-step loop is ONE graph call.
* :func:`generate` — the Python twin of ``turbocompile run``: load an artifact (sampler or
  denoiser), draw the noise from a seed, sample (baked rCM, Python rCM loop, or the teacher's
  Euler/UniPC with CFG), return the latents.

Progress: ``progress=True`` (the CLI's default) ticks a bar of N steps as each step's state (the
nodes ``rcm_state_<i>``) is computed; the graph runs as the same generated code either way
(identical results), with a GPU synchronisation per step for the bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn

from turbocompile.api import CompiledArtifact
from turbocompile.device_scope import device_scope
from turbocompile.errors import ArtifactError, InputError

__all__ = ["CompiledSampler", "generate", "GenerateResult"]



class CompiledSampler(CompiledArtifact):
    """A baked rCM sampler: ``sample(noise, context, *, y=None, clip_fea=None, generator=None,
    step_noise=None, progress=False) -> latents`` (float32, shaped like ``noise``).

    ``noise`` is ε0 (x_0 = t_0·ε0 inside). SDE step noise is drawn exactly as
    :func:`~turbocompile.sampling.rcm.rcm_sample` draws it — fp32 ``torch.randn(noise.shape,
    generator=generator)`` on noise's device at every step, the last included — unless
    ``step_noise`` (N tensors) is given. The batch and geometry are those baked in.
    """

    def __init__(self, gm: fx.GraphModule, manifest: dict):
        self.sampler = dict(manifest["sampler"])
        self.steps = int(self.sampler["steps"])
        self.mode = self.sampler["mode"]
        super().__init__(gm, manifest)

    def _check_signature(self) -> None:
        names = self.input_names
        steps = [n for n in names if n.startswith("step_noise_")]
        if names[:2] != ["noise", "context"] or not set(names[2:]) - set(steps) <= {"y", "clip_fea"} \
                or (self.mode == "sde" and len(steps) != self.steps):
            raise ArtifactError(f"sampler artifact inputs {names} do not match its baked schedule "
                                f"({self.steps} steps, {self.mode})")

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return self._input_shapes["noise"]

    def _check(self, name: str, value) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{name} must be a tensor, got {type(value).__name__}")
        want = self._input_shapes[name]
        if tuple(value.shape) != want:
            raise InputError(f"{name} has shape {list(value.shape)}; this sampler artifact is baked for "
                             f"{list(want)} (batch and video geometry are fixed)")
        if not value.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {value.dtype}")
        return value

    def sample(self, noise, context, *, y=None, clip_fea=None, generator: torch.Generator | None = None,
               step_noise: Sequence[torch.Tensor] | None = None, progress: bool = False) -> torch.Tensor:
        """Run the baked sampler; see the class docstring."""
        self._check("noise", noise)
        args = [noise.float(), self._check("context", context)]
        for name, val in (("y", y), ("clip_fea", clip_fea)):
            if name in self.input_names:
                if val is None:
                    raise InputError(f"this sampler needs '{name}' (inputs: {', '.join(self.input_names)})")
                args.append(self._check(name, val))
            elif val is not None:
                raise InputError(f"this sampler takes no '{name}' (inputs: {', '.join(self.input_names)})")
        if self.mode == "sde":
            if step_noise is None:
                step_noise = [torch.randn(noise.shape, generator=generator, dtype=torch.float32, device=noise.device)
                              for _ in range(self.steps)]
            step_noise = list(step_noise)
            if len(step_noise) != self.steps:
                raise InputError(f"step_noise must hold {self.steps} tensors (one per baked step), got "
                                 f"{len(step_noise)}")
            for i, e in enumerate(step_noise):
                args.append(self._check(f"step_noise_{i}", e).float())
        elif step_noise is not None:
            raise InputError("step_noise is only used by SDE samplers; this one is baked with mode 'ode'")
        device = self.device
        args = [a.to(device) for a in args]
        with torch.no_grad(), device_scope(device):
            if not progress:
                return self.run_graph(*args)
            from tqdm.auto import tqdm

            with tqdm(total=self.steps, desc="rCM steps", unit="step") as bar:
                if not isinstance(self.graph_module, fx.GraphModule):  # a CUDA-graph replay: one call
                    out = self.graph_module(*args)
                    bar.update(self.steps)
                    return out
                return _run_with_progress(self.__dict__, self.graph_module, bar, args)

    def forward(self, noise, context, **kwargs):
        return self.sample(noise, context, **kwargs)


class _StepTicker:
    """``tick``, the callback after each step's state node: waits for the GPU (so the bar shows finished
    steps), then ticks the bar of the call in progress."""

    def __init__(self):
        self.bar = None

    def tick(self, value):
        if isinstance(value, torch.Tensor) and value.is_cuda:
            torch.cuda.current_stream(value.device).synchronize()
        self.bar.update(1)


def _run_with_progress(holder: dict, gm: fx.GraphModule, bar, args) -> torch.Tensor:
    """Run the baked graph, ticking ``bar`` as each step's state ``rcm_state_<i>`` is computed.

    The same generated code as a plain eager call (:func:`turbocompile.eager.bind`, identical
    results) with a callback after each state node, generated once and kept in ``holder`` (the
    sampler's ``__dict__``) with the callback object, which each call points at its own bar. Graphs
    without the named states (older artifacts) tick once at the end.
    """
    from turbocompile.eager import cached_bind

    ticker = holder.setdefault("_tc_step_ticker", _StepTicker())
    states = {n.name: ticker.tick for n in gm.graph.nodes if n.name.startswith("rcm_state_")}
    run = cached_bind(holder, gm, after=states, slot="_tc_eager_progress")
    ticker.bar = bar
    try:
        out = run(*args)
    finally:
        ticker.bar = None
    if not states:
        bar.update(bar.total)
    return out


class GenerateResult:
    """Latents plus what produced them (written as safetensors metadata by the CLI)."""

    def __init__(self, latents: torch.Tensor, metadata: dict[str, str]):
        self.latents = latents
        self.metadata = metadata


def read_conditioning(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pt`` file (``context`` required; ``y``, ``clip_fea``,
    ``negative_context`` optional)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"context file '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is a user input problem
        raise InputError(f"cannot read context file '{path}': {type(exc).__name__}: {exc}") from None
    if isinstance(data, torch.Tensor):
        data = {"context": data}
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InputError(f"context file '{path}' must hold a mapping of tensors (context[, y, clip_fea, "
                         "negative_context])")
    if "context" not in data:
        raise InputError(f"context file '{path}' has no 'context' tensor (found: {', '.join(sorted(data)) or 'none'})")
    allowed = {"context", "y", "clip_fea", "negative_context"}
    extra = sorted(set(data) - allowed)
    if extra:
        raise InputError(f"context file '{path}' has unknown tensor '{extra[0]}'; allowed: {', '.join(sorted(allowed))}")
    return dict(data)


def generate(artifact, conditioning: "dict | str | Path", *, seed: int = 0, steps: int | None = None,
             frames: int | None = None, size: tuple[int, int] | None = None, teacher: str | None = None,
             guidance: float | None = None, shift: float | None = None, sigma_max: float | None = None,
             mode: str | None = None,
             device: str | None = None, progress: bool = False, cuda_graph: bool = False) -> GenerateResult:
    """Sample latents from an artifact (path or loaded module); the Python ``turbocompile run``.

    Args:
        artifact: artifact directory, or a module returned by :func:`turbocompile.load`.
        conditioning: dict or file with ``context`` [B, Lc, text_dim] (and ``y``, ``clip_fea``,
            ``negative_context`` when needed).
        seed: seeds ε0 and the SDE step noise (one generator on the run device, as TD does).
        steps: sampler steps; for a sampler artifact it must equal the baked count (default
            it); for a denoiser, rCM default 4, teacher default 50.
        frames, size: optional check against the artifact's baked geometry (width, height).
        teacher: ``None`` (rCM), ``"euler"`` or ``"unipc"`` (denoiser artifacts only; needs
            ``negative_context`` unless guidance is 1).
        cuda_graph: replay a CUDA graph captured at load (the baked sampler, or the denoiser that the rCM
            loop calls) instead of launching every kernel from Python: CUDA only, the artifact's batch, not
            with a teacher (classifier-free guidance runs the denoiser at twice the batch). Same kernels, so
            the same latents; an eager run is host-bound where the host launches kernels slower than the
            GPU runs them. A loaded module passed as ``artifact`` is switched to its CUDA graph for good
            (:meth:`~turbocompile.api.CompiledArtifact.enable_cuda_graph`).
    """
    from turbocompile.api import CompiledWan, load
    from turbocompile.sampling import euler_sample, rcm_sample, unipc_sample
    from turbocompile.sampling.schedules import SamplingError

    if cuda_graph and teacher is not None:
        raise InputError(f"--cuda-graph does not combine with --teacher {teacher}: classifier-free guidance runs the "
                         "denoiser at twice the batch the graph is captured for (drop one of the two)")
    if isinstance(artifact, (CompiledSampler, CompiledWan)):
        module = artifact.enable_cuda_graph() if cuda_graph else artifact
    else:
        module = load(artifact, device=device, cuda_graph=cuda_graph)
    manifest = module.manifest
    cond = read_conditioning(conditioning) if not isinstance(conditioning, dict) else dict(conditioning)
    if "context" not in cond:
        raise InputError("conditioning has no 'context' tensor")
    _check_conditioning(cond)
    vs = manifest["model"]["video_shape"]
    if frames is not None and frames != vs["frames"]:
        raise InputError(f"--frames {frames} does not match the artifact, which is specialised for {vs['frames']} "
                         "frames (re-optimize for another geometry)")
    if size is not None and tuple(size) != (vs["width"], vs["height"]):
        raise InputError(f"--size {size[0]}x{size[1]} does not match the artifact, which is specialised for "
                         f"{vs['width']}x{vs['height']}")
    run_device = module.device if isinstance(module, CompiledSampler) else _module_device(module)
    gen = torch.Generator(device=run_device).manual_seed(int(seed))
    context = cond["context"].to(run_device)
    y = cond.get("y")
    clip_fea = cond.get("clip_fea")
    y = None if y is None else y.to(run_device)
    clip_fea = None if clip_fea is None else clip_fea.to(run_device)
    meta = {"seed": str(seed), "artifact": str(artifact if not isinstance(artifact, nn.Module) else "<module>")}
    if teacher is None and (guidance is not None or shift is not None):
        raise InputError("--guidance and --shift apply to the teacher samplers only (give --teacher euler|unipc)")
    if teacher is not None and mode is not None:
        raise InputError("--mode applies to rCM sampling, not to the teacher samplers")
    guidance = 5.0 if guidance is None else guidance
    shift = 5.0 if shift is None else shift
    try:
        if isinstance(module, CompiledSampler):
            if teacher is not None:
                raise InputError(f"this artifact is a baked rCM sampler; --teacher {teacher} needs a denoiser artifact")
            if mode is not None and mode != module.mode:
                raise InputError(f"--mode {mode} differs from the mode '{module.mode}' baked into this sampler "
                                 "artifact (re-optimize with bake_rcm_sampler mode to change it)")
            if steps is not None and steps != module.steps:
                raise InputError(f"--steps {steps} differs from the {module.steps} steps baked into this sampler "
                                 "artifact (re-optimize with bake_rcm_sampler steps to change it)")
            noise = torch.randn(module.noise_shape, generator=gen, dtype=torch.float32, device=run_device)
            if context.shape[0] != module.noise_shape[0]:
                raise InputError(f"context has batch {context.shape[0]}; this sampler is baked for batch "
                                 f"{module.noise_shape[0]}")
            latents = module.sample(noise, context, y=y, clip_fea=clip_fea, generator=gen, progress=progress)
            meta.update(sampler="rcm-baked", steps=str(module.steps), mode=module.mode,
                        sigma_max=str(module.sampler["sigma_max"]))
        else:
            cfg = module.config
            batch = context.shape[0]
            ch = cfg.out_dim if cfg.model_type == "i2v" else cfg.in_dim
            lat = vs.get("latent") or [None, None, None]
            noise = torch.randn((batch, ch, *lat), generator=gen, dtype=torch.float32, device=run_device)
            if teacher is None:
                n = 4 if steps is None else steps
                sm = sigma_max if sigma_max is not None else (200.0 if cfg.model_type == "i2v" else 80.0)
                mode = mode or "sde"
                latents = rcm_sample(module, noise, context, steps=n, sigma_max=sm, mode=mode, generator=gen,
                                     y=y, clip_fea=clip_fea, net_dtype=module.activation_dtype, progress=progress)
                meta.update(sampler="rcm-loop", steps=str(n), mode=mode, sigma_max=str(sm))
            else:
                n = 50 if steps is None else steps
                fn = {"euler": euler_sample, "unipc": unipc_sample}.get(teacher)
                if fn is None:
                    raise InputError(f"teacher '{teacher}' is not valid; choose one of euler, unipc")
                neg = cond.get("negative_context")
                if neg is None and guidance != 1.0:
                    raise InputError(f"--teacher {teacher} with guidance {guidance} needs 'negative_context' in the "
                                     "context file (or --guidance 1)")
                latents = fn(module, noise, context, steps=n, shift=shift, guidance=guidance,
                             negative_context=None if neg is None else neg.to(run_device), y=y, clip_fea=clip_fea,
                             progress=progress)
                meta.update(sampler=f"teacher-{teacher}", steps=str(n), guidance=str(guidance), shift=str(shift))
    except SamplingError as exc:
        raise InputError(str(exc)) from None
    return GenerateResult(latents.float().cpu(), meta)


def _check_conditioning(cond: dict) -> None:
    """One-line errors for conditioning that would only show up as NaN latents or as a confusing
    shape error from the wrong forward: non-finite values, a negative prompt shaped unlike the prompt."""
    for name, t in cond.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"conditioning tensor '{name}' has NaN or inf values")
    neg, ctx = cond.get("negative_context"), cond["context"]
    if isinstance(ctx, torch.Tensor) and ctx.dim() != 3:
        raise InputError(f"context has shape {list(ctx.shape)}; expected [B, Lc, text_dim]")
    if isinstance(neg, torch.Tensor) and isinstance(ctx, torch.Tensor) and neg.shape != ctx.shape:
        raise InputError(f"negative_context has shape {list(neg.shape)}; it must match context's "
                         f"{list(ctx.shape)}")


def _module_device(module: nn.Module) -> torch.device:
    for t in module.buffers():
        return t.device
    for t in module.parameters():
        return t.device
    return torch.device("cpu")
