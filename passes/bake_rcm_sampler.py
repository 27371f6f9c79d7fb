"""Pass ``bake_rcm_sampler``: unroll TurboDiffusion's rCM few-step loop into one graph.

The (already optimized) denoiser graph ``v = net(x, timestep, context[, y][, clip_fea])``
becomes a sampler graph::

    sample(noise, context[, y][, clip_fea][, step_noise_0 .. step_noise_{N-1}]) -> latents

built as a compiler transformation, not a Python loop (``wan-architecture.md`` §5.2, §5.3):

1. **Unroll.** The denoiser is inlined N times. x_0 = t_0·noise in float64; step i feeds the
   net ``x_i.to(activation dtype)`` and, instead of the timestep placeholder, a constant
   ``[B]`` float32 buffer ``step{i}.timestep`` = bf16(1000·t_i) (988, 932, 852, 608 for the
   default T2V schedule); v = out.double(); then, in float64 and in exactly the order of
   :func:`~turbocompile.sampling.rcm.rcm_sample` (so CPU results match it bit for bit),
   SDE ``x_{i+1} = (1−t_{i+1})·(x_i − t_i·v) + t_{i+1}·ε_{i+1}`` (ε = ``step_noise_i``, fp32)
   or ODE ``x_{i+1} = x_i − (t_i − t_{i+1})·v``. Output ``x_N.float()``.
   Wan2.2 A14B: step i inlines the high- or low-noise expert's graph per
   :func:`~turbocompile.sampling.schedules.rcm_expert_plan` (t_i ≥ boundary → high); the
   experts' weights are stored under ``high.`` / ``low.``.
2. **Constant folding** (:mod:`turbocompile.passes._fold`): everything that depends on no
   input — the sinusoid and time MLP, the projection e0, every block's ``modulation + e0``
   chunks, ``1 + scale``, gates, the head's modulation — is evaluated once now and becomes a
   buffer (``step{i}.<node>``; ``shared.<node>`` when no timestep is involved).
3. **CSE**: the N copies of everything that depends only on ``context`` (text embedding,
   each block's cross-attention K/V projections and k-RMSNorm; image K/V for Wan2.1 I2V)
   are identical after unrolling and merge into one computation per call. The same holds
   when ``fuse_sibling_gemms`` ran first and made the cross K/V of all blocks one GEMM
   (its ``narrow`` slices merge too): that GEMM runs once per call (per expert for A14B).

Stats ``cross_kv_before`` / ``cross_kv_after`` count cross-attention K/V *projections*
(one per block, projection and step before CSE; a fused GEMM counts each member it computes),
``cross_kv_gemms_before`` / ``cross_kv_gemms_after`` the GEMM nodes that compute them.

Where the second expert comes from: ``ctx.extras["experts"] = {"low": GraphModule}`` (and
optionally ``"high"``; default: the graph being baked), each optimized by the same
recipe's earlier passes (``turbocompile.optimize`` prepares this for A14B models).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from turbocompile.capture import graph_device
from turbocompile.errors import TurboCompileError
from turbocompile.options import choice, number
from turbocompile.passbase import Pass, PassResult, register_pass
from turbocompile.passes._fold import drop_unused_attributes, eliminate_common_subexpressions, fold_constants
from turbocompile.passes._graph import get_attr_value, set_attr_value

__all__ = ["BakeRCMSampler", "count_cross_kv", "count_cross_kv_gemms", "sampler_input_specs"]

_CROSS_KV = re.compile(r"(?:^|\.)blocks\.\d+\.cross_attn\.(k|v|k_img|v_img)\.")
_TEXT_EMB = re.compile(r"(?:^|\.)text_embedding\.0\.")
_LINEAR_OPS = ("linear", "w8a8_linear", "w8a8_linear_prequant", "w8a8_linear_prequant_sumsq")


def _is_linear_like(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in (F.linear, torch._C._nn.linear):
        return True
    name = getattr(node.target, "_schema", None)
    return name is not None and name.name.split("::")[-1] in _LINEAR_OPS


def _weight_targets(node: fx.Node) -> list[str]:
    """What a linear-like node computes: its weights' attribute names, or for a GEMM that
    ``fuse_sibling_gemms`` made of several linears one ``<module path>.`` per member (its own
    weight is named after the group, e.g. ``fused_blocks_0_cross_attn_k_and_3_more.qweight``)."""
    members = node.meta.get("tc_fused_members")
    if members:
        return [f"{p}." for p in members]
    return [a.target for a in node.all_input_nodes if a.op == "get_attr"]


def count_linears(graph: fx.Graph, pattern: re.Pattern) -> int:
    """Linear-like nodes (F.linear / W8A8 ops, fused GEMMs once) whose weights match ``pattern``."""
    return sum(1 for n in graph.nodes if _is_linear_like(n) and any(pattern.search(t) for t in _weight_targets(n)))


def count_projections(graph: fx.Graph, pattern: re.Pattern) -> int:
    """Linear projections matching ``pattern`` that ``graph`` computes (a fused GEMM counts each member)."""
    total = 0
    for n in graph.nodes:
        if not _is_linear_like(n):
            continue
        hits = sum(1 for t in _weight_targets(n) if pattern.search(t))
        total += hits if n.meta.get("tc_fused_members") else min(hits, 1)  # weight, scales, bias: one linear
    return total


def count_cross_kv(graph: fx.Graph) -> int:
    """Cross-attention K/V projections (text and image) computed by ``graph``, fused or not."""
    return count_projections(graph, _CROSS_KV)


def count_cross_kv_gemms(graph: fx.Graph) -> int:
    """GEMM nodes of ``graph`` computing cross-attention K/V (one for all blocks once fused)."""
    return count_linears(graph, _CROSS_KV)


def sampler_input_specs(denoiser_specs: dict, steps: int, mode: str) -> dict:
    """name -> (shape, dtype) of the sampler graph's placeholders, in order."""
    x_shape, _ = denoiser_specs["x"]
    specs = {"noise": (tuple(x_shape), torch.float32)}
    for name in ("context", "y", "clip_fea"):
        if name in denoiser_specs:
            specs[name] = (tuple(denoiser_specs[name][0]), denoiser_specs[name][1])
    if mode == "sde":
        for i in range(steps):
            specs[f"step_noise_{i}"] = (tuple(x_shape), torch.float32)
    return specs


@register_pass
class BakeRCMSampler(Pass):
    """Unroll the rCM sampler over the denoiser graph; fold step constants; share context work."""

    name = "bake_rcm_sampler"
    description = "bake the rCM few-step sampler into the graph (unroll, constant-fold, CSE)"
    requires = frozenset({"shapes"})
    provides = frozenset({"sampler"})
    after = frozenset({"w8a8", "fused_norms", "sparse_attention", "gemm_epilogues", "sibling_gemms",
                       "merged_padding_keys"})

    @dataclass(frozen=True, kw_only=True)
    class Options:
        steps: int = number(4, min=1, max=4, doc="rCM sampler steps")
        sigma_max: float | None = number(None, min=1e-6, doc="TrigFlow sigma_max (null: 80 for t2v, 200 for i2v)")
        mid_times: tuple[float, ...] = (1.5, 1.4, 1.0)
        mode: str = choice("sde", ("sde", "ode"), "sde (TurboDiffusion default) or ode (Euler)")
        boundary: float = number(0.9, min=0.0, max=1.0, doc="Wan2.2 expert switch on RF t (t >= boundary: high)")

        def __post_init__(self):
            """The schedule is checked here, in the recipe, not after capture (σ_max = null: both defaults)."""
            from turbocompile.sampling.schedules import rcm_schedule

            for sigma_max in ([self.sigma_max] if self.sigma_max is not None else [80.0, 200.0]):
                try:
                    rcm_schedule(self.steps, sigma_max, self.mid_times)
                except TurboCompileError as exc:
                    raise ValueError(str(exc)) from None

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        from turbocompile.sampling.schedules import rcm_expert_plan, rcm_schedule, rcm_timesteps_bf16

        o = self.options
        cfg = ctx.model_config
        sigma_max = o.sigma_max if o.sigma_max is not None else (200.0 if cfg.model_type == "i2v" else 80.0)
        ts = rcm_schedule(o.steps, sigma_max, o.mid_times)
        net_ts = rcm_timesteps_bf16(ts[:-1])

        experts = dict(ctx.extras.get("experts") or {})
        # two experts when the config says so, or when optimize handed over a low-noise graph (a checkpoint
        # whose config matches no two-expert preset): never bake one of two given experts silently
        n_exp = 2 if "low" in experts else int(getattr(cfg, "num_experts", 1))
        if n_exp == 2:
            if "low" not in experts:
                raise TurboCompileError(
                    f"{cfg.name} has two experts (high/low noise) and a baked sampler needs both: give the directory "
                    "holding both (high_noise_model/ + low_noise_model/, transformer/ + transformer_2/, or "
                    "TurboDiffusion's -high/-low .pth pair), not one expert")
            graphs = {"high": experts.get("high", gm), "low": experts["low"]}
            plan = rcm_expert_plan(ts, o.boundary)
            names = ["high", "low"]
        else:
            graphs = {"": gm}
            plan = [0] * o.steps
            names = [""]

        den_specs = dict(ctx.input_specs) if ctx.input_specs else {
            n.target: (tuple(n.meta["val"].shape), n.meta["val"].dtype) for n in gm.graph.nodes
            if n.op == "placeholder"}
        for key, g in graphs.items():
            got = [n.target for n in g.graph.nodes if n.op == "placeholder"]
            if got != list(den_specs):
                raise TurboCompileError(f"expert graph '{key or 'main'}' has inputs {got}, expected {list(den_specs)}")
        if "timestep" not in den_specs or "x" not in den_specs:
            raise TurboCompileError(f"bake_rcm_sampler needs a denoiser graph (x, timestep, context...), got inputs "
                                    f"{list(den_specs)}; is a sampler already baked?")
        x_shape = tuple(den_specs["x"][0])
        batch = x_shape[0]
        act_dtype = ctx.dtype
        device = graph_device(gm)

        # -- 1. unroll ------------------------------------------------------------------
        attrs: dict[str, torch.Tensor] = {}     # new attribute name -> tensor
        specs = sampler_input_specs(den_specs, o.steps, o.mode)
        g = fx.Graph()
        ph = {name: g.placeholder(name) for name in specs}
        noise_d = g.call_method("double", (ph["noise"],))
        x = g.call_function(operator.mul, (ts[0], noise_d))
        x.meta["tc_rcm_state"] = 0      # float64 state x_i (tests read the intermediate states)
        for i in range(o.steps):
            t, t_next = ts[i], ts[i + 1]
            key = names[plan[i]]
            src = graphs[key]
            prefix = f"{key}." if key else ""
            tname = f"step{i}.timestep"
            attrs[tname] = torch.full((batch,), float(net_ts[i]), dtype=torch.float32, device=device)
            t_node = g.get_attr(tname)
            t_node.meta["tc_step"] = i
            x_in = g.call_method("to", (x, act_dtype))
            env: dict[fx.Node, fx.Node] = {}
            out = None
            for node in src.graph.nodes:
                if node.op == "placeholder":
                    special = {"x": x_in, "timestep": t_node}
                    env[node] = special[node.target] if node.target in special else ph[node.target]
                elif node.op == "output":
                    out = fx.node.map_arg(node.args[0], lambda n: env[n])
                else:
                    new = g.node_copy(node, lambda n: env[n])
                    if node.op == "get_attr":
                        new.target = prefix + node.target
                        if new.target not in attrs:
                            attrs[new.target] = get_attr_value(src, node.target)
                    new.meta["tc_step"] = i
                    new.meta["tc_expert"] = key or "main"
                    env[node] = new
            v = g.call_method("double", (out,))
            if o.mode == "sde":
                tv = g.call_function(operator.mul, (t, v))
                diff = g.call_function(operator.sub, (x, tv))
                scaled = g.call_function(operator.mul, (1.0 - t_next, diff))
                eps = g.call_method("double", (ph[f"step_noise_{i}"],))
                noise_term = g.call_function(operator.mul, (t_next, eps))
                # named rcm_state_<i+1>: the loaded sampler ticks its per-step progress bar on these
                x = g.create_node("call_function", operator.add, (scaled, noise_term), name=f"rcm_state_{i + 1}")
            else:
                dv = g.call_function(operator.mul, (t - t_next, v))
                x = g.create_node("call_function", operator.sub, (x, dv), name=f"rcm_state_{i + 1}")
            x.meta["tc_rcm_state"] = i + 1
        g.output(g.call_method("float", (x,)))

        # swap the graph and the attributes in place (the pipeline keeps this GraphModule)
        for name, tensor in attrs.items():
            if "." in name and name.split(".")[0] in ("high", "low") or name.startswith("step"):
                set_attr_value(gm, name, tensor)
        gm.graph = g
        unrolled_nodes = len(g.nodes)
        kv_before, kv_gemms_before = count_cross_kv(g), count_cross_kv_gemms(g)
        text_before = count_linears(g, _TEXT_EMB)

        # -- 2./3. CSE (shares context work, dedups weight reads) then constant folding ----
        removed = eliminate_common_subexpressions(g)
        const_names = _const_namer()
        fold = fold_constants(gm, const_names)
        removed += eliminate_common_subexpressions(g)
        g.eliminate_dead_code()
        g.lint()
        dropped = drop_unused_attributes(gm)
        gm.recompile()

        kv_after = count_cross_kv(g)
        silu_left = sum(1 for n in g.nodes if n.op == "call_function" and n.target in (F.silu, torch.sigmoid))
        ts_left = sum(1 for n in g.nodes if n.op == "get_attr" and n.target.endswith(".timestep"))

        ctx.input_specs = specs
        ctx.artifact_kind = "sampler"
        ctx.dynamic_batch = False
        ctx.manifest_extra["sampler"] = {
            "type": "rcm",
            "steps": o.steps,
            "sigma_max": sigma_max,
            "mid_times": list(o.mid_times),
            "mode": o.mode,
            "timesteps": {"t": ts, "net": net_ts},
            "expert_plan": [names[p] or "main" for p in plan],
            "boundary": o.boundary,
            "noise_shape": list(x_shape),
            "activation_dtype": str(act_dtype).split(".")[-1],
        }
        gm.meta.setdefault("turbocompile", {})["inputs"] = list(specs)
        stats = {
            "steps": o.steps,
            "mode": o.mode,
            "timesteps": net_ts,
            "expert_plan": "".join("HL"[p] if n_exp == 2 else "M" for p in plan),
            "unrolled_nodes": unrolled_nodes,
            "final_nodes": len(g.nodes),
            "folded_constants": len(fold.folded),
            "folded_aliases": fold.aliased,
            "folded_bytes": fold.bytes,
            "cse_removed": removed,
            "cross_kv_before": kv_before,
            "cross_kv_after": kv_after,
            "cross_kv_gemms_before": kv_gemms_before,
            "cross_kv_gemms_after": count_cross_kv_gemms(g),
            "text_embedding_before": text_before,
            "text_embedding_after": count_linears(g, _TEXT_EMB),
            "time_embedding_evals_left": silu_left,
            "timestep_buffers_left": ts_left,
            "dropped_attributes": dropped,
        }
        notes = [f"rCM {o.mode} {o.steps} steps, sigma_max {sigma_max}: net timesteps {net_ts}"]
        return PassResult(True, stats, notes)


def _const_namer():
    """Buffer name of a folded node: step{i}.<node> if it depends on a step timestep, else shared.<node>."""
    def steps_of(node: fx.Node, memo: dict) -> frozenset:
        if node in memo:
            return memo[node]
        if node.op == "get_attr":
            m = re.match(r"step(\d+)\.timestep$", node.target)
            out = frozenset({int(m.group(1))}) if m else frozenset()
        else:
            out = frozenset()
            for a in node.all_input_nodes:
                out = out | steps_of(a, memo)
        memo[node] = out
        return out

    memo: dict = {}

    def name_for(node: fx.Node) -> str:
        deps = steps_of(node, memo)
        base = re.sub(r"[^A-Za-z0-9_]", "_", node.name)
        stack = list(node.meta.get("nn_module_stack", {}).values())
        if stack:  # e.g. "blocks.3" from "model.blocks.3.norm3"-style qualnames
            path = str(stack[-1][0] if isinstance(stack[-1], tuple) else stack[-1])
            path = re.sub(r"^model\.", "", path)
            path = ".".join(p for p in path.split(".") if re.fullmatch(r"[A-Za-z0-9_]+", p))
            if path:
                base = f"{path}.{base}"
        if len(deps) == 1:
            return f"step{next(iter(deps))}.{base}"
        return f"shared.{base}"

    return name_for

