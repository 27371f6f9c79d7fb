"""`kernels/w8a8/_tuned_launch.launch_tuned`: the autotuner asked once per launch key, its pick reused.

CPU: the bookkeeping against a stand-in autotuner, and a real single-config ``triton.autotune`` kernel with a
pre-hook under the interpreter (the only autotuned launch the interpreter can make: it cannot benchmark).
GPU: the TMA GEMM's second launch takes the remembered pick and gives the same bits as the autotuner's path.
"""

from __future__ import annotations

import pytest
import torch

from tests._env import has_cuda, kernel_device, sm_at_least, triton_runs_here

pytestmark = pytest.mark.skipif(not triton_runs_here(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")


def _mod():
    from turbocompile.kernels.w8a8 import _tuned_launch

    return _tuned_launch


class _Config:
    def __init__(self, kwargs, pre_hook=None):
        self.kwargs, self.pre_hook = kwargs, pre_hook

    def all_kwargs(self):
        return {**self.kwargs, "num_warps": 4}


class _Fn:
    """Stands in for the JIT function: records (grid, args, kwargs) of each launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *a, **k: self.launches.append((grid, a, k))


class _Tuner:
    """Stands in for `triton.autotune`: picks ``choose(args)``, sets best_config, launches through fn."""

    def __init__(self, choose):
        self.fn, self.choose, self.runs, self.best_config = _Fn(), choose, 0, None

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.runs += 1
            cfg = self.choose(args)
            self.best_config = cfg
            if cfg.pre_hook is not None:
                cfg.pre_hook({**cfg.all_kwargs()})
            self.fn[grid(cfg.all_kwargs())](*args, **meta, **cfg.all_kwargs())

        return run


def _grid(kw):
    return (kw["BLOCK"] * 10,)


def test_pick_asked_once_per_key_then_reused():
    tl_ = _mod()
    hooked = []
    picks = {1: _Config({"BLOCK": 1}, pre_hook=hooked.append), 2: _Config({"BLOCK": 2}, pre_hook=hooked.append)}
    tuner = _Tuner(lambda args: picks[args[0]])
    for _ in range(3):
        tl_.launch_tuned(tuner, ("k", 1), _grid, (1, "x"), {"C": 7}, hook_args={"desc": "d"})
    assert tuner.runs == 1  # the autotuner ran once; two launches went straight to the JIT function
    assert [g for g, _, _ in tuner.fn.launches] == [(10,), (10,), (10,)]
    assert all(k == {"C": 7, "BLOCK": 1, "num_warps": 4} for _, _, k in tuner.fn.launches)
    assert all(a == (1, "x") for _, a, _ in tuner.fn.launches)
    # the pre-hook saw the hook arguments merged with the config's kwargs on the direct launches
    assert hooked[1:] == [{"desc": "d", "BLOCK": 1, "num_warps": 4}] * 2
    tl_.launch_tuned(tuner, ("k", 2), _grid, (2, "x"), {"C": 7}, hook_args={"desc": "d"})
    assert tuner.runs == 2 and tuner.fn.launches[-1][0] == (20,)  # another key: asked again
    tl_.launch_tuned(tuner, ("k", 1), _grid, (1, "x"), {"C": 7}, hook_args={"desc": "d"})
    assert tuner.runs == 2 and tuner.best_config is picks[1]  # best_config follows the last launch


def test_picks_live_on_the_autotuner_and_switch_off(monkeypatch):
    tl_ = _mod()
    cfg = _Config({"BLOCK": 1})
    a, b = _Tuner(lambda args: cfg), _Tuner(lambda args: cfg)
    tl_.launch_tuned(a, "k", _grid, (), {})
    tl_.launch_tuned(b, "k", _grid, (), {})  # a new autotuner object (a rebuilt list) knows nothing yet
    assert (a.runs, b.runs) == (1, 1)
    monkeypatch.setattr(tl_, "MEMO_PICKS", False)
    for _ in range(2):
        tl_.launch_tuned(a, "k", _grid, (), {})
    assert a.runs == 3  # switched off: every launch goes through the autotuner


def test_pre_hook_without_hook_args_is_an_error():
    tl_ = _mod()
    tuner = _Tuner(lambda args: _Config({"BLOCK": 1}, pre_hook=lambda nargs: None))
    tl_.launch_tuned(tuner, "k", _grid, (), {}, hook_args={})
    with pytest.raises(ValueError, match="pre-hook but no hook_args"):
        tl_.launch_tuned(tuner, "k", _grid, (), {})


@pytest.mark.skipif(has_cuda(), reason="the CPU interpreter case; the GPU case is the GEMM test below")
def test_real_autotuner_single_config_under_the_interpreter():
    import triton
    import triton.language as tl

    tl_ = _mod()
    seen = []

    def hook(nargs):
        seen.append(nargs["BLOCK"])
        nargs["out_ptr"].fill_(0)  # runs before every launch, the direct one included

    @triton.jit
    def _scale(x_ptr, out_ptr, n, f, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) * f, mask=m)

    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=1, pre_hook=hook)], key=["n"])(_scale)
    x = torch.arange(37, dtype=torch.float32)
    for f in (2.0, 3.0):
        out = torch.full_like(x, 5.0)
        tl_.launch_tuned(tuned, ("n", 37), lambda kw: (triton.cdiv(37, kw["BLOCK"]),), (x, out, 37, f), {},
                         hook_args={"out_ptr": out})
        torch.testing.assert_close(out, x * f, rtol=0, atol=0)
    assert seen == [16, 16] and tuned._tc_picks[("n", 37)].kwargs == {"BLOCK": 16}


@pytest.mark.skipif(not (has_cuda() and sm_at_least(9)), reason="the TMA GEMM's autotuned path runs on sm90+ only")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_tma_gemm_remembered_pick_gives_the_same_bits(monkeypatch, fmt):
    from turbocompile.kernels.w8a8 import _tuned_launch, ref, triton_gemm_tma

    dev = kernel_device()
    g = torch.Generator().manual_seed(3)
    qa, sa = ref.quantize_ref(torch.randn(300, 256, generator=g), fmt, "per_token")
    qw, sw = ref.quantize_ref(torch.randn(264, 256, generator=g) * 0.05, fmt, "per_channel")
    qa, sa, qw, sw = qa.to(dev), sa.to(dev), qw.to(dev), sw.to(dev)
    bias = torch.randn(264, generator=g).to(torch.bfloat16).to(dev)
    monkeypatch.setattr(triton_gemm_tma, "_TUNED", None)  # a fresh autotuner: no picks yet
    first = triton_gemm_tma.w8a8_gemm_tma(qa, sa, qw, sw, bias, torch.bfloat16)
    tuned = triton_gemm_tma._tuned_kernel(False)
    assert len(tuned._tc_picks) == 1
    orig_run = type(tuned).run
    monkeypatch.setattr(type(tuned), "run", lambda self, *a, **k: pytest.fail("the autotuner ran"))
    again = triton_gemm_tma.w8a8_gemm_tma(qa, sa, qw, sw, bias, torch.bfloat16)  # the remembered pick
    assert torch.equal(first, again)
    monkeypatch.setattr(type(tuned), "run", orig_run)
    monkeypatch.setattr(_tuned_launch, "MEMO_PICKS", False)  # through the autotuner (its cache) again
    assert torch.equal(first, triton_gemm_tma.w8a8_gemm_tma(qa, sa, qw, sw, bias, torch.bfloat16))
    want = ref.w8a8_gemm_ref(qa, sa, qw, sw, bias, "per_token", "per_channel", torch.float64)
    assert float((again.double() - want).norm() / want.norm()) < 1e-2
