"""Launching an autotuned Triton kernel without paying ``Autotuner.run`` on every call.

``triton.autotune``'s ``Autotuner.run`` rebuilds its key and several argument dicts on each launch, even
when the pick is cached: about 40 µs of host time per W8A8 GEMM on the lent H100 machine (118 vs 80 µs for
the same launch through the JIT function; ``benchmarks/probe_launch_layers.py``, RESULTS.md session 33).
An eager 1.3B forward launches 181 GEMMs, and it is host-bound there.

:func:`launch_tuned` asks the autotuner once per *launch key* and remembers its pick on the autotuner
object; later launches with that key run the config's pre-hook and the JIT function directly, with the
same config, so the compiled kernel and the output are the same. The caller's key must separate every
launch that the autotuner could tune differently: at least the autotuner's own key values and the dtypes
of the tensor arguments (a finer key only costs one more autotuner call). Dropping the autotuner object
(e.g. ``triton_gemm_tma._TUNED = None`` in the benchmarks) drops its remembered picks with it.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

__all__ = ["launch_tuned", "MEMO_PICKS"]

# Off: every launch goes through Autotuner.run, as before session 33 (benchmarks A/B the two paths).
MEMO_PICKS = True


def launch_tuned(tuned, key: Hashable, grid: Callable[[dict], tuple], args: Sequence[Any], meta: dict,
                 hook_args: dict | None = None) -> None:
    """Launch ``tuned`` (a ``triton.autotune`` object) on ``args`` / ``meta`` with its pick for ``key``.

    Args:
        tuned: the autotuner wrapping a JIT function.
        key: hashable launch key (see the module doc for what it must separate).
        grid: config kwargs -> launch grid, as for ``tuned[grid]``.
        args, meta: the positional arguments and the constexpr keyword arguments of the kernel.
        hook_args: the named arguments the configs' pre-hook reads (it gets them merged with the config's
            kwargs, as the autotuner passes them); None when the configs have no pre-hook.
    """
    picks = tuned.__dict__.setdefault("_tc_picks", {}) if MEMO_PICKS else None
    cfg = picks.get(key) if picks is not None else None
    if cfg is None:
        tuned[grid](*args, **meta)
        if picks is not None:
            picks[key] = tuned.best_config
        return
    tuned.best_config = cfg  # what `tuned.best_config` reports stays the pick of the last launch
    kw = cfg.all_kwargs()
    if cfg.pre_hook is not None:
        if hook_args is None:
            raise ValueError("launch_tuned: the pick has a pre-hook but no hook_args were given")
        cfg.pre_hook({**hook_args, **kw})
    tuned.fn[grid(kw)](*args, **meta, **kw)
