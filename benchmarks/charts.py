"""PNG charts of the benchmark JSONs (issue 8: every benchmark writes JSON plus a chart).

Each ``bench_*.py`` calls :func:`save` after writing its JSON; this module also redraws stored results:

    python benchmarks/charts.py benchmarks/results/sagesla_s22c5_h200.json [...]   # PNG beside each JSON

The kind of a JSON is recognised by its keys (:func:`kind_of`). Without matplotlib nothing is drawn and
:func:`save` says so (the benchmarks run without it; the lent GPU image has it).
"""

from __future__ import annotations

import argparse
import json
import math
import os

__all__ = ["kind_of", "save"]


def kind_of(d: dict) -> str | None:
    """Which benchmark wrote ``d`` (None if none of these)."""
    if "timings_ms" in d and "summary" in d:
        return "w8a8"
    if "timings" in d and "copy_GBps" in d:
        return "norms"
    if "timing" in d and "correctness" in d and "attention_kernel" in d:
        return "sagesla"
    if "ms" in d and "fmt" in d and "tflops" in d:
        return "gemm_epilogue"
    if "variants" in d and "video" in d:
        return "e2e"
    if "optimize_s" in d and "artifact_gib" in d:
        return "optimize"
    if "info" in d and "results" in d:
        return "sampler"
    if "families" in d and "wall_ms" in d:
        return "profile"
    if "text_attention" in d:
        return "text_attention"
    return None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(d: dict, what: str) -> str:
    info = d.get("info", d)
    return f"{what}\n{info.get('device', '?')}, torch {info.get('torch', '?')}, Triton {info.get('triton', '?')}"


def _w8a8(d, plt):
    shapes = list(d["timings_ms"])
    variants = [v for v in ("int8_tok_tma", "fp8_tok_tma", "int8_tok", "fp8_tok") if v in d["timings_ms"][shapes[0]]]
    fig, ax = plt.subplots(figsize=(10, 4))
    w = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        ys = [d["timings_ms"][s]["bf16"] / d["timings_ms"][s][v] for s in shapes]
        ax.bar([x + i * w for x in range(len(shapes))], ys, w, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([x + w * (len(variants) - 1) / 2 for x in range(len(shapes))], shapes, rotation=30, ha="right")
    ax.set_ylabel("× bf16 F.linear (higher is better)")
    ax.legend()
    ax.set_title(_title(d, "W8A8 linear, activation quantization included"))
    return fig


def _norms(d, plt):
    rows = [t for t in d["timings"] if t.get("default_pct") is not None]
    names = [t["site"] for t in rows]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    ax.barh(names, [t["default_pct"] for t in rows], label="fused kernel (default config)")
    ax.axvline(75, color="r", ls="--", lw=1, label="75% target")
    ax.invert_yaxis()
    ax.set_xlabel(f"% of copy bandwidth ({d['copy_GBps']:.0f} GB/s measured)")
    ax.legend(loc="lower right")
    shape = d.get("shape", {})
    ax.set_title(_title(d, f"fused norms, B{shape.get('B')} L{shape.get('L')} D{shape.get('D')}"))
    return fig


def _sagesla(d, plt):
    by = {}
    for t in d["timing"]:
        by.setdefault(t["shape"], {})[t["variant"]] = t["ms"]
    shapes = list(by)
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 5), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        base = by[s].get("sdpa-cudnn")
        names = [v for v in by[s] if not v.endswith("-cudagraph")]
        ax.barh(names, [base / by[s][v] for v in names])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("× torch SDPA (cuDNN), whole op, eager (higher is better)")
        ax.set_title(s)
    fig.suptitle(_title(d, "SageSLA attention"))
    return fig


def _gemm_epilogue(d, plt):
    names = list(d["ms"])
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.5))
    ax.barh(names, [d["ms"][n] for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("ms (lower is better)")
    ax.set_title(_title(d, f"FFN ffn.0 GEMM + GELU + quantization ({d['fmt']}, M×K×N = {'×'.join(map(str, d['shape']))})"))
    return fig


_E2E_STACKS = (  # the shipped recipe's full pass list in bench_e2e.py's tags, longest first
    ("w8a8_fp8+norms+sagesla+epi+pool+siblings+bound+merge+textq+slaq", "turbo-fp8"),
    ("rcm4_fp8+norms+sagesla+epi+pool+siblings+bound+merge+textq+slaq", "turbo-fp8 4-step rCM sampler"),
)
_E2E_TOKENS = {"eager": "eager bf16", "compile": "torch.compile bf16", "original": "original: 50 steps × CFG",
               "w8a8_fp8": "W8A8 FP8", "w8a8_int8": "W8A8 INT8", "norms": "fused norms", "sagesla": "SageSLA",
               "cudagraph": "CUDA graph"}


def _e2e_label(name: str) -> str:
    """A readable label for a bench_e2e.py variant tag (unknown tokens stay as they are)."""
    for tag, label in _E2E_STACKS:
        if name == tag or name.startswith(tag + "+"):
            rest = name[len(tag) + 1:]
            return label + "".join(", " + _E2E_TOKENS.get(t, t) for t in rest.split("+") if t)
    head, *rest = name.split("+")
    head = head[len("rcm4:"):] + " 4-step rCM sampler" if head.startswith("rcm4:") else _E2E_TOKENS.get(head, head)
    return head + "".join(" + " + _E2E_TOKENS.get(t, t) for t in rest)


def _e2e(d, plt):
    """Forward / sampling-call time, speed-up of each against 100 eager forwards (the original 50 steps × CFG)
    where the variant is a sampler, and peak GPU memory; each bar carries its value."""
    v = {k: e for k, e in d["variants"].items() if "ms" in e}
    names = list(v)
    labels = [_e2e_label(n) for n in names]
    eager = v.get("eager", {}).get("ms")
    original = v.get("original", {}).get("ms") or (100 * eager if eager else None)  # measured, else 100 forwards
    fig, axes = plt.subplots(1, 3, figsize=(18, 0.45 * len(names) + 2.4), gridspec_kw={"width_ratios": [3, 3, 2]})
    ms = [v[n]["ms"] for n in names]
    sampling = [n.startswith("rcm") or n == "original" for n in names]  # against the original run
    speed = [(original / v[n]["ms"]) if (original and smp) else (eager / v[n]["ms"] if eager else 0)
             for n, smp in zip(names, sampling)]
    peak = [v[n].get("peak_gib") or 0 for n in names]
    colors = ["tab:gray" if n == "original" else "tab:orange" if smp else "tab:blue" for n, smp in zip(names, sampling)]
    panels = ((ms, "ms per call (log)", lambda x: f"{x:,.1f} ms", True),
              (speed, "speed-up (log)", lambda x: f"{x:.2f}×" if x < 10 else f"{x:.1f}×", any(x > 0 for x in speed)),
              (peak, "peak GPU memory, GiB", lambda x: f"{x:.2f}", False))
    for ax, (vals, xlabel, fmt, log) in zip(axes, panels):
        ax.barh(labels, vals, color=colors)
        if log:
            ax.set_xscale("log")
            ax.set_xlim(right=max(vals) * 8)
        else:
            ax.set_xlim(right=max(vals) * 1.3 if max(vals) > 0 else 1)
        for y, x in enumerate(vals):
            if x > 0:
                ax.text(x, y, " " + fmt(x), va="center", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    vid = d["video"]
    extra = f", {d['prompt_tokens']}-token prompt" if d.get("prompt_tokens") is not None else ""
    fig.suptitle(f"{d['model']} {vid.get('width')}x{vid.get('height')}x{vid.get('frames')}{extra} on {d['device']} "
                 f"(torch {d['torch']}, Triton {d['triton']}; random weights)\n"
                 "blue: one DiT forward, speed-up vs one eager bf16 forward; orange: the 4-step sampling call, "
                 "speed-up vs the original 50 steps × CFG = 100 eager forwards (gray; "
                 + ("measured in the same run)" if "original" in v else "extrapolated)"), fontsize=11)
    return fig


def _optimize(d, plt):
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = {k: s for k, s in d["pass_s"].items() if s}
    steps["load artifact"] = d["load_s"]
    a.barh(list(steps), list(steps.values()))
    a.invert_yaxis()
    a.set_xlabel("seconds")
    a.set_title(f"optimize {d['optimize_s']:.0f} s in all (write incl.)")
    b.bar(["bf16 weights", f"{d['recipe']} artifact"], [d["bf16_weights_gib"], d["artifact_gib"]])
    b.set_ylabel("GiB")
    b.set_title("size on disk")
    fig.suptitle(f"{d['model']} on {d['device']}")
    return fig


def _sampler(d, plt):
    rows = d["results"] if isinstance(d["results"], list) else list(d["results"].values())
    rows = [r for r in rows if isinstance(r, dict)]
    labels, vals = [], []
    for r in rows:
        for key, val in r.items():
            if key.endswith("ms") and isinstance(val, (int, float)) and math.isfinite(val):
                labels.append(f"{r.get('recipe', '')} {r.get('frames', '')}f {key}")
                vals.append(val)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(labels) + 1.5))
    ax.barh(labels, vals)
    ax.invert_yaxis()
    ax.set_xlabel("ms (lower is better)")
    ax.set_title(_title(d, "baked rCM sampler vs the Python loop"))
    return fig


def _profile(d, plt):
    fams = sorted(d["families"].items(), key=lambda kv: -kv[1])
    total = sum(v for _, v in fams) or 1.0
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(fams) + 1.6))
    ax.barh([k for k, _ in fams], [v for _, v in fams])
    for i, (_, v) in enumerate(fams):
        ax.text(v, i, f" {v:.2f} ms ({100 * v / total:.1f}%)", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GPU kernel time per forward, ms")
    mode = {True: ", CUDA-graph replay", False: ", eager"}.get(d.get("cuda_graph"), "")  # older JSONs: unrecorded
    ax.set_title(_title(d, f"{d.get('model', '?')}, {d.get('recipe', '?')}{mode}: {total:.1f} ms of kernels"))
    return fig


def _text_attention(d, plt):
    rows = d["text_attention"]
    fig, axes = plt.subplots(1, len(rows), figsize=(7 * len(rows), 4.5), squeeze=False)
    for ax, row in zip(axes[0], rows):
        names = [n for n, ms in row["ms"].items() if ms is not None]
        ax.barh(names, [row["ms"][n] for n in names])
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("ms (lower is better)")
        ax.set_title(f"{row['shape']}, {row['prompt_tokens']}-token prompt", fontsize=9)
    fig.suptitle(_title(d, "cross-attention q norm + attention + quantizer: unfused vs norm_attention_quant"))
    return fig


_DRAW = {"w8a8": _w8a8, "norms": _norms, "sagesla": _sagesla, "gemm_epilogue": _gemm_epilogue, "e2e": _e2e,
         "optimize": _optimize, "sampler": _sampler, "profile": _profile, "text_attention": _text_attention}


def save(data: dict, png_path: str) -> str | None:
    """Draw ``data`` (a benchmark JSON, by :func:`kind_of`) to ``png_path``; returns the path, or None
    (with a printed reason) when matplotlib is missing or the kind is unknown."""
    kind = kind_of(data)
    if kind is None:
        print(f"charts: no chart for {png_path} (unknown benchmark JSON)")
        return None
    try:
        plt = _plt()
    except ImportError:
        print(f"charts: matplotlib not installed, no chart {png_path}")
        return None
    fig = _DRAW[kind](data, plt)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="benchmark JSON files")
    ap.add_argument("--out", default=None, help="directory for the PNGs (default: beside each JSON)")
    args = ap.parse_args(argv)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    for path in args.json:
        with open(path) as f:
            data = json.load(f)
        stem = os.path.splitext(os.path.basename(path))[0] + ".png"
        png = os.path.join(args.out or os.path.dirname(path) or ".", stem)
        try:
            if save(data, png):
                print("wrote", png)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # an older JSON layout
            print(f"charts: {path}: not drawn ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    main()
