"""The Python API: :func:`optimize` (model + recipe -> graph / artifact) and :func:`load`.

Data flow: resolve the model (built-in name with random weights, checkpoint path, or a
module) -> capture an FX graph for the recipe's video geometry -> run the recipe's passes
-> write an artifact -> ``load`` returns a module obeying the Wan call contract.
"""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from turbocompile.artifact import check_output_dir, load_graph_module, read_manifest, save_artifact
from turbocompile.capture import capture, example_inputs, input_specs, propagate_shapes
from turbocompile.device_scope import device_scope
from turbocompile.errors import ArtifactError, InputError, ModelConfigError, TurboCompileError
from turbocompile.model.config import PRESETS, VideoShape, WanConfig, get_preset
from turbocompile.model.wan import WanModel, init_random_
from turbocompile.passbase import PassContext
from turbocompile.pipeline import PassRecord, check_disabled, disabled_from_env, run_pipeline
from turbocompile.recipe import DEVICES, DTYPES, Recipe, load_recipe

__all__ = ["optimize", "load", "OptimizeResult", "CompiledArtifact", "CompiledWan", "resolve_model", "DTYPE_MAP"]

DTYPE_MAP = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_SEED = 2**63 - 2  # a two-expert model seeds its second expert with seed + 1 (an int64)


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).split(".")[-1]


@dataclass
class OptimizeResult:
    """What :func:`optimize` produced."""

    graph_module: fx.GraphModule
    manifest: dict
    records: list[PassRecord] = field(default_factory=list)
    artifact: Path | None = None

    def cuda_graph(self, example_inputs=None, *, warmup: int = 2):
        """The graph as a :class:`~turbocompile.cuda_graph.CUDAGraphRunner` (captured now, static shapes).

        ``example_inputs`` default: random tensors shaped as the manifest's signature. CUDA only
        (:class:`KernelUnavailableError` otherwise).
        """
        from turbocompile.cuda_graph import CUDAGraphRunner, require_cuda, signature_example_inputs

        dev = next((t.device for t in self.graph_module.buffers()), torch.device("cpu"))
        require_cuda(dev)
        sig = self.manifest["signature"]
        inputs = example_inputs if example_inputs is not None else signature_example_inputs(sig, dev)
        return CUDAGraphRunner(self.graph_module, inputs, warmup=warmup, names=[i["name"] for i in sig["inputs"]],
                               fn=self.eager_runner())

    def eager_runner(self):
        """The graph as a plain callable for eager (no CUDA graph) runs: same call and outputs as
        ``graph_module(...)``, but each turbocompile op is called without the dispatcher
        (:func:`turbocompile.eager.bind`), which saves host time on every op call. Built once and
        cached; ``graph_module`` itself is not changed."""
        from turbocompile.eager import cached_bind

        return cached_bind(self.__dict__, self.graph_module)


DEVICE_ENV = "TURBOCOMPILE_DEVICE"  # default device when neither the call nor the recipe names one


def _pick_device(name: "str | torch.device | None") -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N`` or a torch.device; one-line errors. None: ``TURBOCOMPILE_DEVICE`` when
    set, else cuda when available, else cpu."""
    source = "device"
    if name is None:
        name = os.environ.get(DEVICE_ENV, "").strip() or None
        if name is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        source = DEVICE_ENV
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICES:
        raise ModelConfigError(f"{source} '{name}' is not valid; choose one of {', '.join(DEVICES)} (or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fix = "use --device cpu" if source == "device" else f"set {DEVICE_ENV}=cpu or unset it"
        raise ModelConfigError(f"{source} '{name}' requested but no CUDA GPU is available; {fix}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelConfigError(f"{source} '{name}' is not valid; this machine has {torch.cuda.device_count()} CUDA "
                               f"GPU(s): choose cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def _pick_dtype(name: "str | torch.dtype | None") -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` or the torch.dtype itself; one-line error otherwise."""
    if isinstance(name, torch.dtype) and name in DTYPE_MAP.values():
        return name
    if isinstance(name, str) and name in DTYPE_MAP:
        return DTYPE_MAP[name]
    raise ModelConfigError(f"dtype '{name}' is not valid; choose one of {', '.join(DTYPES)}")


def _check_call_options(rec: Recipe, *, seed, disable, expert) -> tuple[str, ...]:
    """Validate optimize's plain options before any work; returns the pass names to disable."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise ModelConfigError(f"seed {seed!r} is not valid; choose an integer from 0 to {_MAX_SEED}")
    if expert not in (None, "high", "low"):
        raise ModelConfigError(f"expert {expert!r} is not valid; choose one of high, low")
    if disable is None:
        disable = ()
    elif isinstance(disable, str):  # one name, not its letters
        disable = (disable,)
    elif not all(isinstance(d, str) for d in disable):
        raise ModelConfigError(f"disable: expected pass names, got {disable!r}")
    disabled = tuple(disable) + disabled_from_env()
    check_disabled(disabled, [p.name for p in rec.passes])
    return disabled


def resolve_model(model: Any, *, dtype: torch.dtype | None, device: torch.device, seed: int = 0,
                  expert: str | None = None, allow_quantized: bool = False,
                  progress: bool = False) -> tuple[WanModel, dict, dict]:
    """Turn ``model`` into a canonical WanModel; returns (model, source description, extras)."""
    if expert is not None and isinstance(model, (str, Path)) and str(model) in PRESETS \
            and PRESETS[str(model)].num_experts != 2:
        raise ModelConfigError(f"--expert applies to two-expert (Wan2.2 A14B) models; '{model}' has one expert")
    if isinstance(model, WanModel):
        # work on a copy: optimizing must not change the caller's model (dtype, device, config)
        m = copy.deepcopy(model)
        if dtype is not None:
            m = m.to(dtype)
        return m.to(device), {"kind": "module", "class": "WanModel"}, {}
    if isinstance(model, nn.Module):
        from turbocompile.checkpoints import load_model

        m, info = load_model(model, dtype=dtype, device=device, allow_quantized=allow_quantized)
        return m, {"kind": "module", "class": type(model).__name__, "layout": info.layout}, dict(info.extras)
    if isinstance(model, (str, Path)):
        text = str(model)
        if text in PRESETS:
            cfg = get_preset(text)
            dt = dtype or torch.bfloat16
            with torch.device(device):
                m = WanModel(cfg)
            init_random_(m, seed)  # drawn on `device`
            m = m.to(dtype=dt)
            m.init_non_persistent_buffers()
            return m, {"kind": "builtin", "name": text, "seed": seed,
                       "weights": "random (built-in model, not trained weights)"}, {}
        if Path(text).exists():
            from turbocompile.checkpoints import load_model

            m, info = load_model(text, dtype=dtype, device=device, expert=expert,
                                 allow_quantized=allow_quantized)
            return m, {"kind": "checkpoint", "path": str(Path(text).resolve()), "layout": info.layout,
                       "expert": info.expert}, dict(info.extras)
        raise ModelConfigError(
            f"model '{text}' is neither a built-in model ({', '.join(sorted(PRESETS))}) nor an existing "
            "checkpoint file or directory"
        )
    raise ModelConfigError(f"cannot optimize an object of type {type(model).__name__}; give a built-in model "
                           "name, a checkpoint path, a WanModel or a diffusers WanTransformer3DModel")


def _video_shape(cfg: WanConfig, recipe: Recipe) -> tuple[WanConfig, VideoShape]:
    mo = recipe.model
    if mo.text_len is not None:
        cfg = cfg.replace(text_len=mo.text_len)
    try:
        shape = cfg.video_shape(frames=mo.frames, size=mo.size_tuple, batch=mo.batch)
    except TurboCompileError as exc:
        raise ModelConfigError(f"recipe model overrides: {exc}") from None
    return cfg, shape


def _num_experts(model: Any) -> int:
    """Experts of a built-in name or checkpoint directory (1 for anything else)."""
    if isinstance(model, (str, Path)):
        if str(model) in PRESETS:
            return PRESETS[str(model)].num_experts
        from turbocompile.checkpoints.io import expert_dirs

        p = Path(model)
        if p.is_dir() and expert_dirs(p):  # original, diffusers or TurboDiffusion two-expert layouts
            return 2
    return 1


def _check_pass_configs(passes, cfg: WanConfig) -> None:
    """Every pass's options against the model config, before any slow work (`Pass.check_config`)."""
    for p in passes:
        p.check_config(cfg)


def _capture_and_run(wan: WanModel, rec: Recipe, dt, dev, extras, passes, *, strict, progress, verify, seed,
                     disabled, log):
    """Capture ``wan`` for the recipe's geometry and run ``passes``: (graph, pass records, context)."""
    cfg, shape = _video_shape(wan.config, rec)
    if cfg is not wan.config:
        wan.config = cfg
    _check_pass_configs(passes, cfg)
    if log:
        log(f"capturing {cfg.name} for {shape.width}x{shape.height}, {shape.frames} frames "
            f"(L={shape.seq_len}) in {_dtype_name(dt)} on {dev}")
    gm = capture(wan, shape)
    specs = input_specs(cfg, shape, dt)
    propagate_shapes(gm, specs)
    ctx = PassContext(model_config=cfg, video_shape=shape, dtype=dt, device=dev, extras=extras,
                      strict=strict, progress=progress, input_specs=dict(specs))
    verify_inputs = None
    if verify:
        if any(p.is_meta for p in wan.parameters()):
            raise ModelConfigError("--verify needs real weights; the model is on the meta device")
        verify_inputs = example_inputs(cfg, shape, seed=seed, device=dev, dtype=dt)
    gm, records = run_pipeline(gm, passes, ctx, input_specs=specs, verify_inputs=verify_inputs,
                               disabled=disabled, log=log)
    if extras.get("proj_l") and not any(r.name == "sagesla_attention" and r.status == "ran" for r in records):
        msg = (f"the checkpoint's SLA proj_l weights ({len(extras['proj_l'])} blocks) are not used: only the "
               "sagesla_attention pass runs the linear branch they belong to (add it to the recipe)")
        warnings.warn(msg, stacklevel=3)
        if log:
            log(f"warning: {msg}")
    return gm, records, ctx


def optimize(
    model: Any,
    recipe: "str | Path | Recipe | dict",
    out: str | Path | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    seed: int = 0,
    verify: bool = False,
    disable: Sequence[str] = (),
    overwrite: bool = False,
    strict: bool = False,
    expert: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> OptimizeResult:
    """Capture ``model``, run ``recipe``'s passes and (if ``out``) write an artifact.

    Args:
        model: built-in model name (random weights), checkpoint file/directory, WanModel,
            or diffusers ``WanTransformer3DModel``.
        recipe: recipe YAML path, built-in recipe name, dict or :class:`Recipe`.
        out: artifact directory to write (atomically); None keeps the result in memory.
        dtype: ``float32`` / ``bfloat16`` / ``float16``; overrides the recipe (default bfloat16).
        device: ``cpu`` / ``cuda`` / ``cuda:N``; overrides the recipe (default: ``TURBOCOMPILE_DEVICE`` when set,
            else cuda when available).
        seed: seed of built-in random weights and of verification inputs.
        verify: compare every pass's output with the graph before it on random inputs.
        disable: pass names to skip (bisecting); ``TURBOCOMPILE_DISABLE_PASSES`` adds more.
        overwrite: replace an existing artifact at ``out``.
        expert: ``high`` / ``low`` for Wan2.2 A14B checkpoints.

    Example:
        >>> res = optimize("wan-tiny", "baseline", "out/wan-tiny", dtype="float32")  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    rec = load_recipe(recipe)
    disabled = _check_call_options(rec, seed=seed, disable=disable, expert=expert)
    dt = _pick_dtype(dtype or rec.model.dtype or "bfloat16")
    dev = _pick_device(device or rec.model.device)
    if out is not None:
        check_output_dir(out, overwrite)  # before any work: nothing is lost, nothing is wasted
    if isinstance(model, (str, Path)) and str(model) in PRESETS:  # the config is known: check before building
        _check_pass_configs(rec.instantiate_passes(), PRESETS[str(model)])
    with device_scope(dev):  # build-time kernels (calibration, folding, --verify) run on dev
        needs_int8 = any(p.name == "w8a8_linear" for p in rec.passes)
        bakes = any(p.name == "bake_rcm_sampler" for p in rec.passes)
        low_gm = None
        if bakes and _num_experts(model) == 2 and "bake_rcm_sampler" not in disabled:
            # Wan2.2 A14B: the baked sampler switches experts mid-schedule, so both experts are
            # optimized (every pass but the bake) and the low-noise one handed to the bake pass.
            if expert is not None:
                raise ModelConfigError("a baked sampler uses both Wan2.2 experts; do not pass --expert")
            if log:
                log("optimizing the low-noise expert")
            low, _, low_extras = resolve_model(model, dtype=dt, device=dev, seed=seed + 1, expert="low",
                                               allow_quantized=needs_int8, progress=progress)
            low_passes = [p for p in rec.instantiate_passes() if p.name != "bake_rcm_sampler"]
            low_gm, _, _ = _capture_and_run(low, rec, dt, dev, low_extras, low_passes, strict=strict,
                                            progress=progress, verify=False, seed=seed, disabled=disabled, log=None)
            expert = "high"
        wan, source, extras = resolve_model(model, dtype=dt, device=dev, seed=seed, expert=expert,
                                            allow_quantized=needs_int8, progress=progress)
        if low_gm is not None:
            extras = dict(extras, experts={"low": low_gm})
            source = dict(source, experts=["high", "low"])
        gm, records, ctx = _capture_and_run(wan, rec, dt, dev, extras, rec.instantiate_passes(), strict=strict,
                                            progress=progress, verify=verify, seed=seed, disabled=disabled, log=log)
    cfg, shape = ctx.model_config, ctx.video_shape
    out_val = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0].meta["val"]
    specs = ctx.input_specs
    manifest = {
        "turbocompile_version": _version("turbocompile"),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"config": cfg.to_dict(), "source": source, "video_shape": shape.to_dict()},
        "recipe": rec.to_dict(),
        "passes": [r.to_dict() for r in records],
        "signature": {
            "inputs": [{"name": k, "shape": list(s), "dtype": _dtype_name(d)} for k, (s, d) in specs.items()],
            "output": {"shape": list(out_val.shape), "dtype": _dtype_name(out_val.dtype)},
            "activation_dtype": _dtype_name(dt),
            "dynamic_batch": ctx.dynamic_batch,
        },
        "kind": ctx.artifact_kind,
        **ctx.manifest_extra,
        "optimize_seconds": None,
    }
    result = OptimizeResult(graph_module=gm, manifest=manifest, records=records)
    manifest["optimize_seconds"] = round(time.perf_counter() - t_start, 3)
    if out is not None:
        if log:
            log(f"writing artifact {out}")
        result.artifact = save_artifact(gm, out, manifest, shard_size_mb=rec.export.shard_size_mb,
                                        overwrite=overwrite, progress=progress)
    return result


class CompiledArtifact(nn.Module):
    """Base of loaded artifacts: the rebuilt graph, its manifest and the input signature."""

    def __init__(self, gm: fx.GraphModule, manifest: dict):
        super().__init__()
        self.graph_module = gm
        self.manifest = manifest
        sig = manifest["signature"]
        self.input_names = [i["name"] for i in sig["inputs"]]
        self._input_shapes = {i["name"]: tuple(i["shape"]) for i in sig["inputs"]}
        self.config = WanConfig.from_dict(manifest["model"]["config"])
        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        if placeholders != self.input_names:
            raise ArtifactError(f"manifest signature inputs {self.input_names} do not match the graph's inputs "
                                f"{placeholders}")
        self._check_signature()

    def _check_signature(self) -> None:
        """Kind-specific signature checks (subclasses)."""

    @property
    def activation_dtype(self) -> torch.dtype:
        return DTYPE_MAP[self.manifest["signature"]["activation_dtype"]]

    @property
    def device(self) -> torch.device:
        for t in self.graph_module.buffers():
            return t.device
        return torch.device("cpu")

    def run_graph(self, *args):
        """Run the graph: the CUDA-graph replay once captured, else eagerly with each turbocompile op
        called without the dispatcher (:func:`turbocompile.eager.bind`; the ops themselves when
        ``torch.compile`` is tracing the call)."""
        gm = self.graph_module
        if not isinstance(gm, fx.GraphModule) or torch.compiler.is_compiling():
            return gm(*args)
        with device_scope(self.device):  # Triton launches on the current device (cuda:N artifacts)
            return self._eager_runner()(*args)

    def _eager_runner(self):
        from turbocompile.eager import cached_bind

        return cached_bind(self.__dict__, self.graph_module)

    @property
    def cuda_graph(self) -> bool:
        """Whether calls replay a captured CUDA graph (see :meth:`enable_cuda_graph`)."""
        from turbocompile.cuda_graph import CUDAGraphRunner

        return isinstance(self.graph_module, CUDAGraphRunner)

    def enable_cuda_graph(self, example_inputs=None, *, warmup: int = 2):
        """Capture the graph into a CUDA graph now and replay it on every call; returns self.

        Shapes become fixed to the signature's (or ``example_inputs``'): another batch size is an
        :class:`InputError`. Warm-up runs (Triton compilation/autotuning) happen before capture.
        Raises :class:`KernelUnavailableError` unless the artifact is on a CUDA device.
        """
        from turbocompile.cuda_graph import CUDAGraphRunner, require_cuda, signature_example_inputs

        if self.cuda_graph:
            return self
        require_cuda(self.device)
        inputs = example_inputs if example_inputs is not None else signature_example_inputs(
            self.manifest["signature"], self.device)
        self.graph_module = CUDAGraphRunner(self.graph_module, inputs, warmup=warmup, names=self.input_names,
                                            fn=self._eager_runner())
        return self


class CompiledWan(CompiledArtifact):
    """A loaded denoiser artifact obeying the Wan call contract.

    ``module(x, timestep, context, *, y=None, clip_fea=None) -> velocity`` (float32
    ``[B, out_dim, T, H, W]``). Inputs are checked against the artifact's signature (the
    batch may differ from the captured one); one-line :class:`InputError` otherwise.
    """

    def _check_signature(self) -> None:
        names = self.input_names
        if names[:3] != ["x", "timestep", "context"] or not set(names[3:]) <= {"y", "clip_fea"}:
            raise ArtifactError(f"denoiser artifact inputs {names} do not follow the call contract "
                                "(x, timestep, context[, y][, clip_fea])")

    def _check(self, name: str, value, batch: int | None):
        want = self._input_shapes[name]
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{name} must be a tensor, got {type(value).__name__}")
        got = tuple(value.shape)
        if len(got) != len(want) or got[1:] != want[1:] or (batch is not None and got[0] != batch):
            exp = ("B",) + want[1:]
            raise InputError(f"{name} has shape {list(got)}; this artifact expects [{', '.join(map(str, exp))}]"
                             f"{f' with B={batch}' if batch is not None else ''}")
        if not value.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {value.dtype}")

    def forward(self, x, timestep, context, *, y=None, clip_fea=None):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"x must be a tensor, got {type(x).__name__}")
        batch = x.shape[0] if x.dim() == 5 else None
        self._check("x", x, None)
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor([float(timestep)] * batch)
        if timestep.dim() == 0:
            timestep = timestep.expand(batch)
        if tuple(timestep.shape) != (batch,):
            raise InputError(f"timestep has shape {list(timestep.shape)}; expected [{batch}] (0–1000 scale)")
        self._check("context", context, batch)
        args = [x, timestep.float(), context]
        for name, val in (("y", y), ("clip_fea", clip_fea)):
            if name in self.input_names:
                if val is None:
                    raise InputError(f"this model needs '{name}' (see the call contract)")
                self._check(name, val, batch)
                args.append(val)
            elif val is not None:
                raise InputError(f"this model takes no '{name}' (inputs: {', '.join(self.input_names)})")
        args = [a.to(self.device) for a in args]
        return self.run_graph(*args)


def _retarget_dtype(gm: fx.GraphModule, src: torch.dtype, dst: torch.dtype) -> None:
    """Change the activation dtype of a graph: dtype constants and tensors of ``src`` become ``dst``.

    The precision map's float32/float64 islands use ``.float()`` / ``.double()`` and float32
    tensors, so they are untouched when ``src`` is bf16/fp16. For a float32 artifact only
    ``.to(float32)`` casts (the activation casts) and float32 weights *inside blocks* move.
    """
    def swap(a):
        if isinstance(a, torch.dtype) and a == src:
            return dst
        if isinstance(a, (list, tuple)):
            return type(a)(swap(x) for x in a)
        if isinstance(a, dict):
            return {k: swap(v) for k, v in a.items()}
        return a

    for node in gm.graph.nodes:
        node.args = swap(node.args)
        node.kwargs = swap(node.kwargs)
    for name, buf in list(gm.named_buffers()):
        if buf.dtype == src and not name.startswith(("rope_", "time_freqs")):
            mod = gm.get_submodule(name.rpartition(".")[0]) if "." in name else gm
            setattr(mod, name.rpartition(".")[2], buf.to(dst))
    gm.recompile()


def _has_sagesla(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and "turbocompile.sagesla" in str(n.target) for n in gm.graph.nodes)


def load(path: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         verify_checksums: bool = True, cuda_graph: bool = False) -> CompiledWan:
    """Load an artifact written by :func:`optimize` (or ``turbocompile optimize``).

    Args:
        path: artifact directory.
        device: where to put the weights (default: ``TURBOCOMPILE_DEVICE`` when set, else cuda when available,
            else cpu).
        dtype: activation dtype to run in (default: the artifact's). Changing it is exact
            only in the sense of re-rounding weights; quantized weights are never touched.
        verify_checksums: check every file's sha256 (a truncated or edited file is refused).
        cuda_graph: capture the graph into a CUDA graph at load (warm-up + capture, see
            :meth:`CompiledArtifact.enable_cuda_graph`); shapes are then fixed to the signature's.
            CUDA only: :class:`KernelUnavailableError` on a CPU device.

    Example:
        >>> m = load("out/wan-tiny")  # doctest: +SKIP
        >>> v = m(x, t, ctx)           # doctest: +SKIP
    """
    dst = None if dtype is None else _pick_dtype(dtype)
    device = str(_pick_device(device))
    manifest = read_manifest(path, verify_checksums=verify_checksums)
    if cuda_graph:
        from turbocompile.cuda_graph import require_cuda

        require_cuda(torch.device(device))
    kind = manifest.get("kind", "denoiser")
    if kind not in ("denoiser", "sampler"):
        raise ArtifactError(f"artifact kind '{kind}' is not supported; known kinds: denoiser, sampler")
    try:
        gm = load_graph_module(path, manifest, device=device)
        if kind == "sampler":
            from turbocompile.sampling.compiled import CompiledSampler

            sampler = CompiledSampler(gm, manifest).eval()
            if dst is not None and dst != sampler.activation_dtype:
                raise ArtifactError(f"a baked sampler runs in the dtype it was built for "
                                    f"({_dtype_name(sampler.activation_dtype)}); re-optimize for {_dtype_name(dst)}")
            return sampler.enable_cuda_graph() if cuda_graph else sampler
        module = CompiledWan(gm, manifest)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"artifact manifest lacks or has a malformed entry: {exc}") from None
    if dst is not None:
        src = module.activation_dtype
        if dst == torch.float32 and src != dst and _has_sagesla(gm):
            raise ArtifactError(f"{path}: its SageSLA attention takes bfloat16 or float16 inputs; load it with dtype "
                                f"bfloat16 or float16, or re-optimize with dtype float32 (which casts around the op)")
        if dst != src:
            _retarget_dtype(gm, src, dst)
            module.manifest = dict(manifest, signature=dict(manifest["signature"], activation_dtype=_dtype_name(dst)))
    module = module.eval()
    return module.enable_cuda_graph() if cuda_graph else module
