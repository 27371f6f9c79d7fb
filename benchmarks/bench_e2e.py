"""End-to-end DiT forward benchmark (issue 8 (b), (d), (e)): eager bf16, torch.compile bf16, and
turbocompile with passes added one at a time, on random weights at a real Wan config.

Weights do not change speed, so random weights are used (said in the output). Every variant is timed
in the same process against the eager baseline measured in the same run. Writes JSON (+ a PNG chart of
time, speed-up and peak memory, ``charts.py``, when matplotlib is present) to --out.

    python benchmarks/bench_e2e.py --model wan2.1-t2v-1.3b --size 832x480 --frames 81 --out $OUT
    python benchmarks/bench_e2e.py --model wan-tiny --device cpu --variants eager,baseline   # smoke test

Variant ``original`` times the original sampling run itself (50 steps × CFG = 100 eager forwards, once), so
the sampler's speed-up needs no extrapolation where that run fits in one command (Wan-1.3B: about 67 s).

With --td-proj-l the turbocompile variants are optimized from a TurboDiffusion-layout checkpoint of the
same random weights plus random SLA ``proj_l`` layers, so SageSLA runs its linear branch as it does
for TurboDiffusion's fine-tuned checkpoints (without proj_l, e.g. original Wan weights, the branch is
zero and skipped). Their outputs then differ from eager by that branch (cos is not an accuracy figure).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time

import torch

import turbocompile  # noqa: E402
from turbocompile.capture import example_inputs  # noqa: E402
from turbocompile.metrics import compare  # noqa: E402
from turbocompile.model.config import get_preset  # noqa: E402
from turbocompile.model.wan import WanModel, init_random_  # noqa: E402
from turbocompile.recipe import builtin_recipes, load_recipe  # noqa: E402

from _clocks import ClockSampler  # noqa: E402  (benchmarks/ is the script's directory)
from _host import pad_prompt  # noqa: E402

_FP8_EPI = [{"name": "w8a8_linear", "options": {"format": "fp8"}}, "fuse_norms", "fuse_gemm_epilogues",
            {"name": "sagesla_attention", "options": {"topk": 0.1}}]
_QKV_ONLY = {"name": "fuse_sibling_gemms", "options": {"include": ["blocks.*.self_attn.*"]}}
_RCM4 = {"name": "bake_rcm_sampler", "options": {"steps": 4}}
# + the gated residuals in the o / cross-o / ffn.2 GEMM epilogues (opt-in: measured slower, session 13)
_FP8_EPI_RES = [*_FP8_EPI[:3], "fuse_residual_epilogues", *_FP8_EPI[3:]]
# ffn.2's FP8 per-token scales rounded up to powers of two (the GELU GEMM writes FP8 codes)
_POW2_EPI = {"name": "fuse_gemm_epilogues", "options": {"quant_scale": "pow2"}}
_FP8_EPI_POW2 = [*_FP8_EPI[:2], _POW2_EPI, *_FP8_EPI[3:]]
_FP8_EPI_RES_POW2 = [*_FP8_EPI[:2], _POW2_EPI, *_FP8_EPI_RES[3:]]
# ffn.2's FP8 scales from an upper bound known before the GEMM (the GELU GEMM writes the final codes)
_FP8_EPI_BOUND = [*_FP8_EPI[:2], {"name": "fuse_gemm_epilogues", "options": {"quant_scale": "bound"}},
                  *_FP8_EPI[3:]]

# name -> recipe passes (None = not a turbocompile variant)
VARIANTS = {
    "eager": None,
    "compile": None,
    # the original sampling run, measured: 50 steps x CFG = 100 eager forwards (cond + uncond per step) and a
    # flow-matching Euler update in fp32 (Wan's UniPC update is as cheap: a few elementwise ops per step)
    "original": None,
    "baseline": [],
    "w8a8_int8": [{"name": "w8a8_linear", "options": {"format": "int8"}}],
    "w8a8_int8+norms": [{"name": "w8a8_linear", "options": {"format": "int8"}}, "fuse_norms"],
    "w8a8_int8+norms+sagesla": [{"name": "w8a8_linear", "options": {"format": "int8"}}, "fuse_norms",
                                {"name": "sagesla_attention", "options": {"topk": 0.1}}],
    "w8a8_fp8": [{"name": "w8a8_linear", "options": {"format": "fp8"}}],
    "w8a8_fp8+norms": [{"name": "w8a8_linear", "options": {"format": "fp8"}}, "fuse_norms"],
    "w8a8_fp8+norms+sagesla": [{"name": "w8a8_linear", "options": {"format": "fp8"}}, "fuse_norms",
                               {"name": "sagesla_attention", "options": {"topk": 0.1}}],
    # the whole 4-step rCM sampler baked into one graph (4 forwards + updates), timed per call
    "rcm4_int8+norms+sagesla": [{"name": "w8a8_linear", "options": {"format": "int8"}}, "fuse_norms",
                                {"name": "sagesla_attention", "options": {"topk": 0.1}},
                                {"name": "bake_rcm_sampler", "options": {"steps": 4}}],
    # + GEMM epilogue fusion (ffn.0 GEMM + GELU + ffn.2's per-token quantization)
    "w8a8_int8+norms+sagesla+epi": [{"name": "w8a8_linear", "options": {"format": "int8"}}, "fuse_norms",
                                    "fuse_gemm_epilogues", {"name": "sagesla_attention", "options": {"topk": 0.1}}],
    "rcm4_int8+norms+sagesla+epi": [{"name": "w8a8_linear", "options": {"format": "int8"}}, "fuse_norms",
                                    "fuse_gemm_epilogues", {"name": "sagesla_attention", "options": {"topk": 0.1}},
                                    {"name": "bake_rcm_sampler", "options": {"steps": 4}}],
    "w8a8_fp8+norms+sagesla+epi": [{"name": "w8a8_linear", "options": {"format": "fp8"}}, "fuse_norms",
                                   "fuse_gemm_epilogues", {"name": "sagesla_attention", "options": {"topk": 0.1}}],
    "rcm4_fp8+norms+sagesla+epi": [{"name": "w8a8_linear", "options": {"format": "fp8"}}, "fuse_norms",
                                   "fuse_gemm_epilogues", {"name": "sagesla_attention", "options": {"topk": 0.1}},
                                   {"name": "bake_rcm_sampler", "options": {"steps": 4}}],
    # + horizontal fusion of the self-attention q, k, v GEMMs only (session 10's fuse_sibling_gemms)
    "w8a8_fp8+norms+sagesla+epi+qkv": [*_FP8_EPI, _QKV_ONLY],
    "rcm4_fp8+norms+sagesla+epi+qkv": [*_FP8_EPI, _QKV_ONLY, _RCM4],
    # + fuse_sibling_gemms' default groups: also every block's cross-attention K/V as one GEMM
    "w8a8_fp8+norms+sagesla+epi+siblings": [*_FP8_EPI, "fuse_sibling_gemms"],
    # + SageSLA's block pooling inside the q/k RMSNorm+RoPE kernels (turbo-fp8 until session 13)
    "w8a8_fp8+norms+sagesla+epi+pool+siblings": [*_FP8_EPI, "fuse_attention_pooling", "fuse_sibling_gemms"],
    "rcm4_fp8+norms+sagesla+epi+pool+siblings": [*_FP8_EPI, "fuse_attention_pooling", "fuse_sibling_gemms", _RCM4],
    # + x + y·gate of the residual norms in the epilogues of the GEMMs producing y
    "w8a8_fp8+norms+sagesla+epi+res+pool+siblings": [*_FP8_EPI_RES, "fuse_attention_pooling", "fuse_sibling_gemms"],
    "rcm4_fp8+norms+sagesla+epi+res+pool+siblings": [*_FP8_EPI_RES, "fuse_attention_pooling", "fuse_sibling_gemms",
                                                     _RCM4],
    # + pow2 scales for ffn.2's input, with and without the residual epilogues (turbo-fp8: without)
    "w8a8_fp8+norms+sagesla+epi+pool+siblings+pow2": [*_FP8_EPI_POW2, "fuse_attention_pooling", "fuse_sibling_gemms"],
    "rcm4_fp8+norms+sagesla+epi+pool+siblings+pow2": [*_FP8_EPI_POW2, "fuse_attention_pooling", "fuse_sibling_gemms",
                                                      _RCM4],
    "w8a8_fp8+norms+sagesla+epi+pool+siblings+bound": [*_FP8_EPI_BOUND, "fuse_attention_pooling",
                                                       "fuse_sibling_gemms"],
    "rcm4_fp8+norms+sagesla+epi+pool+siblings+bound": [*_FP8_EPI_BOUND, "fuse_attention_pooling",
                                                       "fuse_sibling_gemms", _RCM4],
    "w8a8_fp8+norms+sagesla+epi+res+pool+siblings+pow2": [*_FP8_EPI_RES_POW2, "fuse_attention_pooling",
                                                          "fuse_sibling_gemms"],
    "rcm4_fp8+norms+sagesla+epi+res+pool+siblings+pow2": [*_FP8_EPI_RES_POW2, "fuse_attention_pooling",
                                                          "fuse_sibling_gemms", _RCM4],
}
# + the prompt padding's equal cross-attention keys merged into one (pays with --prompt-tokens < text_len)
VARIANTS["w8a8_fp8+norms+sagesla+epi+pool+siblings+bound+merge"] = [
    *VARIANTS["w8a8_fp8+norms+sagesla+epi+pool+siblings+bound"], "merge_padding_keys"]
VARIANTS["rcm4_fp8+norms+sagesla+epi+pool+siblings+bound+merge"] = [
    *VARIANTS["w8a8_fp8+norms+sagesla+epi+pool+siblings+bound"], "merge_padding_keys", _RCM4]
# + cross-attention's q RMSNorm, attention and the o projection's quantizer as one kernel (fuse_text_attention),
# with and without the merged padding keys
for _base in ("w8a8_fp8+norms+sagesla+epi+pool+siblings+bound", "w8a8_fp8+norms+sagesla+epi+pool+siblings+bound+merge"):
    VARIANTS[_base + "+textq"] = [*VARIANTS[_base], "fuse_text_attention"]
    VARIANTS[_base.replace("w8a8_", "rcm4_", 1) + "+textq"] = [*VARIANTS[_base], "fuse_text_attention", _RCM4]
    # the same with the q RMSNorm's statistic from the q GEMM's epilogue instead of an rstd pass over z (opt-in;
    # session 27 ran the 14B sampler as "+textq_rstd", which is today's "+textq")
    _ssq = {"name": "fuse_text_attention", "options": {"sumsq_from_gemm": True}}
    VARIANTS[_base + "+textq_ssq"] = [*VARIANTS[_base], _ssq]
    VARIANTS[_base.replace("w8a8_", "rcm4_", 1) + "+textq_ssq"] = [*VARIANTS[_base], _ssq, _RCM4]
# + self-attention's output written by SageSLA's epilogue as the o projection's FP8 codes at one scale per sample
# (fuse_sagesla_quant: no per-token quantizer pass over the attention output). "...+merge+textq+slaq" is turbo-fp8
# since this pass; "...+merge+textq" the recipe before it.
for _base in ("w8a8_fp8+norms+sagesla+epi+pool+siblings+bound+textq",
              "w8a8_fp8+norms+sagesla+epi+pool+siblings+bound+merge+textq"):
    VARIANTS[_base + "+slaq"] = [*VARIANTS[_base], "fuse_sagesla_quant"]
    VARIANTS[_base.replace("w8a8_", "rcm4_", 1) + "+slaq"] = [*VARIANTS[_base], "fuse_sagesla_quant", _RCM4]
# every shipped forward recipe under its own name ("turbo-int8", "turbo-fp8", ...: the passes `turbocompile optimize
# MODEL <name>` runs), and "rcm4:<name>" for the same passes with the 4-step sampler baked in (sampler labels start
# with "rcm", as the speed-ups below expect); names that are already variants above keep their meaning
for _rname, _rpath in builtin_recipes().items():
    _rpasses = load_recipe(_rpath).to_dict()["passes"]
    if any(p["name"] == "bake_rcm_sampler" for p in _rpasses):
        continue
    VARIANTS.setdefault(_rname, _rpasses)
    VARIANTS["rcm4:" + _rname] = [*_rpasses, _RCM4]
# "<variant>+cudagraph": the same recipe, replayed from a captured CUDA graph (OptimizeResult.cuda_graph)
CUDA_GRAPH_SUFFIX = "+cudagraph"
# "<variant>+dispatch": eager, calling OptimizeResult.graph_module itself, whose op calls go through the
# dispatcher (how eager variants ran before session 25); a plain "<variant>" runs OptimizeResult.eager_runner(),
# as loaded artifacts do
DISPATCH_SUFFIX = "+dispatch"
# "+gelu_<form>" anywhere in a variant name: run it with that GELU epilogue form of
# kernels/w8a8/_epilogue_math.GELU_NATIVE_FORMS instead of the current default, same process
# ("+gelu_ex2rcp": the session-9 default "ex2_rcp")
GELU_TAGS = {"+gelu_ex2rcp": "ex2_rcp", "+gelu_tanh": "tanh"}
# "+gelu_long" anywhere in a variant name: ffn.0's GELU + FP8 codes epilogue in its long form (before session 28;
# kernels/w8a8/triton_gemm_tma.GELU_CODES_SHORT off), same process
GELU_LONG_TAG = "+gelu_long"
# "+nofold" anywhere in a variant name: fuse_gemm_epilogues with bound_in_norm off (ffn.2's bound row scales from
# their own kernel, as before session 28, instead of the norm that quantizes ffn.0's input)
NO_FOLD_TAG = "+nofold"
# "+textk_triton" anywhere in a variant name: the fused cross-attention's attention step on its Triton kernel (as
# before session 30) instead of the Gluon one that "auto" picks on Hopper, same process
TEXT_TRITON_TAG = "+textk_triton"
_NO_FOLD = {"flag": False}  # set per variant by main(), read where the recipe is built


def _recipe_passes(base_name: str) -> list:
    """The variant's passes; with the +nofold tag, every fuse_gemm_epilogues entry gets bound_in_norm: false."""
    passes = VARIANTS[base_name]
    if not _NO_FOLD["flag"]:
        return passes
    out = []
    for p in passes:
        if p == "fuse_gemm_epilogues" or (isinstance(p, dict) and p.get("name") == "fuse_gemm_epilogues"):
            opts = dict(p.get("options", {})) if isinstance(p, dict) else {}
            p = {"name": "fuse_gemm_epilogues", "options": {**opts, "bound_in_norm": False}}
        out.append(p)
    return out


def _gelu_form_of(label: str) -> tuple[str, str | None]:
    """(label without its GELU tag, the form it names or None); longest tag first."""
    for tag in sorted(GELU_TAGS, key=len, reverse=True):
        if tag in label:
            return label.replace(tag, ""), GELU_TAGS[tag]
    return label, None


def timed(fn, device, warmup=2, reps=5):
    """Median wall time (ms) of fn() with device synchronisation."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--td-proj-l", action="store_true",
                    help="optimize from a TurboDiffusion checkpoint with random SLA proj_l (linear branch on)")
    ap.add_argument("--sagesla-tune", default=None,
                    help='JSON overrides of SageSLA\'s preparation knobs (triton_prep.DEFAULT_TUNE), e.g. \'{"lin_gluon": 0}\'')
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="real prompt length: context rows from this one on are zero, as Wan pads a prompt's T5 "
                         "embedding to text_len (default: every row random, i.e. no padding)")
    ap.add_argument("--clocks", action="store_true",
                    help="sample the SM clock and board power (nvidia-smi) while each variant is timed")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    with ClockSampler() if args.clocks else contextlib.nullcontext() as clocks:
        args.clock_sampler = clocks
        _main(args)


def _main(args):
    dev = args.device
    if args.sagesla_tune:
        from turbocompile.kernels.sagesla.triton_prep import DEFAULT_TUNE

        overrides = json.loads(args.sagesla_tune)
        unknown = sorted(set(overrides) - set(DEFAULT_TUNE))
        if unknown:
            raise SystemExit(f"--sagesla-tune: unknown knobs {unknown}; valid: {', '.join(sorted(DEFAULT_TUNE))}")
        DEFAULT_TUNE.update(overrides)
    cfg = get_preset(args.model)
    size = tuple(int(v) for v in args.size.split("x")) if args.size else None
    shape = cfg.video_shape(frames=args.frames, size=size)
    recipe_model = {"dtype": "bfloat16", "device": dev, "frames": shape.frames,
                    "size": f"{shape.width}x{shape.height}"}
    print(f"torch {torch.__version__}, triton {turbocompile.api._version('triton')}, "
          f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}", flush=True)
    print(f"model {cfg.name} (RANDOM weights), {shape.width}x{shape.height}x{shape.frames}, L={shape.seq_len}",
          flush=True)
    inp = example_inputs(cfg, shape, seed=0, device=dev, dtype=torch.bfloat16)
    if args.prompt_tokens is not None:
        pad_prompt(inp, cfg, args.prompt_tokens)
        print(f"context: {args.prompt_tokens} prompt tokens, zero-padded to {cfg.text_len}", flush=True)
    args_in = list(inp.values())
    args.model_src = _td_checkpoint(cfg, args.out) if args.td_proj_l else args.model
    results = {"model": cfg.name, "weights": "random" + (", TurboDiffusion layout + random proj_l" if args.td_proj_l
                                                         else ""), "video": shape.to_dict(), "torch": torch.__version__,
               "triton": turbocompile.api._version("triton"),
               "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "variants": {},
               "sagesla_tune": json.loads(args.sagesla_tune) if args.sagesla_tune else {},
               "prompt_tokens": args.prompt_tokens,
               "date": time.strftime("%Y-%m-%d", time.gmtime()),
               "command": "python3 benchmarks/bench_e2e.py " + " ".join(args.argv)}
    ref_out = None
    eager_ms = None
    for label in args.variants.split(","):
        name, form = _gelu_form_of(label)
        long_codes = GELU_LONG_TAG in name
        _NO_FOLD["flag"] = NO_FOLD_TAG in name
        text_triton = TEXT_TRITON_TAG in name
        name = name.replace(GELU_LONG_TAG, "").replace(NO_FOLD_TAG, "").replace(TEXT_TRITON_TAG, "")
        base_name = name
        for suffix in (CUDA_GRAPH_SUFFIX, DISPATCH_SUFFIX):
            base_name = base_name[: -len(suffix)] if base_name.endswith(suffix) else base_name
        if base_name not in VARIANTS or (base_name != name and VARIANTS[base_name] is None):
            raise SystemExit(f"unknown variant {label}; choose from {', '.join(VARIANTS)}")
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        from turbocompile.kernels.text_attention import triton_norm_attn_quant
        from turbocompile.kernels.w8a8 import _epilogue_math, triton_gemm_tma

        gelu_form = _epilogue_math.GELU_NATIVE_FORM
        if form is not None:
            _epilogue_math.GELU_NATIVE_FORM = form
        triton_gemm_tma.GELU_CODES_SHORT = not long_codes
        triton_norm_attn_quant.DEFAULT_CONFIG["KERNEL"] = "triton" if text_triton else "auto"
        try:
            ref_out, eager_ms = _one(name, base_name, args, dev, cfg, recipe_model, args_in, results, ref_out, eager_ms,
                                     label)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
            import traceback

            tb = [ln for ln in traceback.format_exc().splitlines() if ln.strip().startswith("File")][-4:]
            print(f"{label:<28} FAILED: {type(exc).__name__}: {str(exc)[:300]} | {' | '.join(tb)}", flush=True)
            results["variants"][label] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        finally:
            _epilogue_math.GELU_NATIVE_FORM = gelu_form
            triton_gemm_tma.GELU_CODES_SHORT = True
            triton_norm_attn_quant.DEFAULT_CONFIG["KERNEL"] = "auto"
        gc.collect()
    path = os.path.join(args.out, f"e2e_{cfg.name}.json")
    _finish(results, path, args, cfg)


def _td_checkpoint(cfg, out_dir):
    """The eager variants' random weights (seed 0) as a TurboDiffusion .pth with random proj_l."""
    from turbocompile.checkpoints import save_turbodiffusion

    model = WanModel(cfg)
    init_random_(model, 0)
    g = torch.Generator().manual_seed(1)
    d = cfg.dim // cfg.num_heads
    proj_l = {i: (torch.randn(d, d, generator=g) / d ** 0.5, torch.randn(d, generator=g) * 0.02)
              for i in range(cfg.num_layers)}
    path = save_turbodiffusion(model.to(torch.bfloat16), os.path.join(out_dir, f"td_{cfg.name}_proj_l.pth"), proj_l)
    del model
    gc.collect()
    return str(path)


def _one(name, base_name, args, dev, cfg, recipe_model, args_in, results, ref_out, eager_ms, label):
    if True:
        t0 = time.perf_counter()
        if name == "original":
            return _original(args, dev, cfg, args_in, results, ref_out, eager_ms, label, t0)
        if name in ("eager", "compile"):
            with torch.device(dev):
                model = WanModel(cfg)
            init_random_(model, 0)
            model = model.to(torch.bfloat16).eval()
            model.init_non_persistent_buffers()
            fn_model = model
            if name == "compile":
                for i, blk in enumerate(model.blocks):
                    model.blocks[i] = torch.compile(blk)
            run = lambda: fn_model(*args_in)  # noqa: E731
            prep_s = time.perf_counter() - t0
        else:
            recipe = {"version": 1, "name": base_name, "model": recipe_model, "passes": _recipe_passes(base_name)}
            res = turbocompile.optimize(args.model_src, recipe, seed=0)
            gm = res.graph_module
            if res.manifest["kind"] == "sampler":  # inputs: noise, context, ..., step noise
                gen = torch.Generator(device=dev).manual_seed(0)
                inputs = [torch.randn(i["shape"], generator=gen, device=dev)
                          for i in res.manifest["signature"]["inputs"]]
                if args.prompt_tokens is not None:  # the same text as the forward variants
                    names = [i["name"] for i in res.manifest["signature"]["inputs"]]
                    inputs[names.index("context")] = args_in[2].to(inputs[names.index("context")].dtype)
            else:
                inputs = args_in
            if name.endswith(CUDA_GRAPH_SUFFIX):  # warm-up (compile + autotune) and capture: counted in prep
                gm = res.cuda_graph(inputs)
            elif name.endswith(DISPATCH_SUFFIX):  # eager, op calls through the dispatcher
                gm = res.graph_module
            else:  # eager, as loaded artifacts run it (ops called without the dispatcher)
                gm = res.eager_runner()
            run = lambda: gm(*inputs)  # noqa: E731
            prep_s = time.perf_counter() - t0
        prep_peak = None
        if dev == "cuda":  # peak memory of running the variant, not of building it (optimize holds bf16 weights)
            prep_peak = torch.cuda.max_memory_allocated() / 2**30
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            if name == "compile":
                t1 = time.perf_counter()
                run()
                if dev == "cuda":
                    torch.cuda.synchronize()
                prep_s += time.perf_counter() - t1
            t_run = time.monotonic()
            ms = timed(lambda: torch.no_grad()(run)(), dev, reps=args.reps)
            clocks = args.clock_sampler.window(t_run, time.monotonic()) if args.clock_sampler else None
            out = run().float()
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
        if ref_out is None and "rcm" not in name:  # a sampler's output is not a forward's
            ref_out = out
            results["outputs_compared_to"] = label  # rel_err / cos of every variant are against this one
        m = compare(out, ref_out) if ref_out is not None and out.shape == ref_out.shape and "rcm" not in name else \
            {"rel_err": float("nan"), "cosine": float("nan")}
        if name == "eager":
            eager_ms = ms
        passes = res.manifest["passes"] if name not in ("eager", "compile") else []
        stats = {p["name"]: p["stats"] for p in passes}
        epi, sla, sib = (stats.get(n) for n in ("fuse_gemm_epilogues", "sagesla_attention", "fuse_sibling_gemms"))
        entry = {"gemm_epilogues": epi, "sagesla": sla, "sibling_gemms": sib,
                 "merge_padding_keys": stats.get("merge_padding_keys"),
                 "sagesla_quant": stats.get("fuse_sagesla_quant"),
                 "residual_epilogues": stats.get("fuse_residual_epilogues"), "ms": ms, "prep_s": round(prep_s, 2),
                 "peak_gib": peak, "prep_peak_gib": prep_peak, "vs_eager_rel_err": m["rel_err"],
                 "vs_eager_cos": m["cosine"], "speedup_vs_eager": (eager_ms / ms) if eager_ms else None,
                 "clocks": clocks}
        results["variants"][label] = entry
        print(f"{label:<28} {ms:9.2f} ms  prep {prep_s:6.1f}s  peak {peak or 0:6.2f} GiB  "
              f"x{entry['speedup_vs_eager'] or 0:5.2f}  rel {m['rel_err']:.3e} cos {m['cosine']:.5f}"
              + (f"  SM {clocks['sm_mhz_median']:.0f} MHz {clocks['power_w_median']:.0f} W" if clocks else ""),
              flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"e2e_{cfg.name}.json"), "w") as f:  # keep partial results
            json.dump(results, f, indent=2)
        del run
        if name == "original":
            return _original(args, dev, cfg, args_in, results, ref_out, eager_ms, label, t0)
        if name in ("eager", "compile"):
            del model, fn_model
        else:
            del gm, res
    return ref_out, eager_ms


ORIGINAL_STEPS, ORIGINAL_GUIDE = 50, 5.0


def _original(args, dev, cfg, args_in, results, ref_out, eager_ms, label, t0):
    """Time the original sampler once: 50 steps, each a conditional and an unconditional eager forward
    (a second random context stands for the negative prompt), CFG, and an Euler step of the flow."""
    with torch.device(dev):
        model = WanModel(cfg)
    init_random_(model, 0)
    model = model.to(torch.bfloat16).eval()
    model.init_non_persistent_buffers()
    x0, t_in, ctx = args_in[0], args_in[1], args_in[2]
    g = torch.Generator(device="cpu").manual_seed(1)
    ctx_null = torch.randn(ctx.shape, generator=g).to(device=dev, dtype=ctx.dtype)
    sigmas = torch.linspace(1.0, 0.0, ORIGINAL_STEPS + 1, device=dev)

    def sample():
        x = x0.float()
        for i in range(ORIGINAL_STEPS):
            t = (sigmas[i] * 1000).expand_as(t_in)
            xb = x.to(torch.bfloat16)
            v_c = model(xb, t, ctx, *args_in[3:]).float()
            v_u = model(xb, t, ctx_null, *args_in[3:]).float()
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + ORIGINAL_GUIDE * (v_c - v_u))
        return x

    with torch.no_grad():
        model(*args_in)  # warm-up forward (lazy initialization), not timed
        if dev == "cuda":
            torch.cuda.synchronize()
        prep_s = time.perf_counter() - t0
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t1, t_run = time.perf_counter(), time.monotonic()
        sample()
        if dev == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t1) * 1e3
        clocks = args.clock_sampler.window(t_run, time.monotonic()) if args.clock_sampler else None
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    entry = {"ms": ms, "forwards": 2 * ORIGINAL_STEPS, "ms_per_forward": ms / (2 * ORIGINAL_STEPS),
             "prep_s": round(prep_s, 2), "peak_gib": peak, "speedup_vs_eager": (eager_ms / ms) if eager_ms else None,
             "clocks": clocks}
    results["variants"][label] = entry
    print(f"{label:<28} {ms:9.2f} ms  ({2 * ORIGINAL_STEPS} eager forwards, {entry['ms_per_forward']:.2f} ms each, "
          f"timed once)  peak {peak or 0:6.2f} GiB", flush=True)
    del model
    return ref_out, eager_ms


def _speedups(results) -> None:
    """Speed-ups against the same run's eager forward, whatever order the variants ran in; a sampler
    ("rcm*", "rcm4:<recipe>") against the original 50-step x CFG run: measured (variant ``original``) or 100 x eager."""
    v = results["variants"]
    eager = v.get("eager", {}).get("ms")
    measured = v.get("original", {}).get("ms")
    original = measured or (100 * eager if eager else None)
    for label, e in v.items():
        if "ms" not in e or label == "original":
            continue
        if label.startswith("rcm"):
            e["speedup_vs_eager"] = None
            e["speedup_vs_original"] = original / e["ms"] if original else None
            e["original"] = "measured" if measured else "100 x eager forward (extrapolated)"
        else:
            e["speedup_vs_eager"] = eager / e["ms"] if eager else None


def _finish(results, path, args, cfg):
    _speedups(results)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    import charts  # benchmarks/ is the script's directory

    charts.save(results, os.path.join(args.out, f"e2e_{cfg.name}.png"))
    print("wrote", path)


if __name__ == "__main__":
    main()
