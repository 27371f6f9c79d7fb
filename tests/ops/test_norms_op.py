"""turbocompile::{ln_modulate, residual_ln_modulate, rmsnorm_rope, ln_modulate_quant,
residual_ln_modulate_quant}: schemas, fake kernels (opcheck), backend dispatch, error messages."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests._env import has_cuda, triton_runs_here
from turbocompile.errors import KernelUnavailableError
from turbocompile.ops import norms

B, L, D, H = 2, 5, 64, 2


def _args():
    x = torch.randn(B, L, D, dtype=torch.bfloat16)
    return dict(x=x, y=torch.randn_like(x), gate=torch.randn(B, 1, D), w=torch.randn(D), b=torch.randn(D),
                sh=torch.randn(B, 1, D), sc=torch.randn(B, 1, D),
                cos=torch.rand(L, D // H // 2), sin=torch.rand(L, D // H // 2))


def _cases(backend):
    a = _args()
    ops = torch.ops.turbocompile
    return [
        (ops.ln_modulate.default, (a["x"], None, None, a["sh"], a["sc"], 1e-6, None, backend)),
        (ops.ln_modulate.default, (a["x"], a["w"], a["b"], None, None, 1e-6, torch.float32, backend)),
        (ops.residual_ln_modulate.default, (a["x"], a["y"], a["gate"], None, None, a["sh"], a["sc"], 1e-6, None, backend)),
        (ops.rmsnorm_rope.default, (a["x"], a["w"], a["cos"], a["sin"], H, 1e-6, backend)),
        (ops.rmsnorm_rope.default, (a["x"], a["w"].bfloat16(), None, None, H, 1e-6, backend)),
        (ops.ln_modulate_quant.default, (a["x"], None, None, a["sh"], a["sc"], 1e-6, "int8", "per_token", backend)),
        (ops.ln_modulate_quant.default, (a["x"], None, None, a["sh"], a["sc"], 1e-6, "fp8", "block128", backend)),
        (ops.residual_ln_modulate_quant.default,
         (a["x"], a["y"], None, None, None, a["sh"], a["sc"], 1e-6, "int8", "block128", backend)),
    ]


@pytest.mark.parametrize("i", range(8))
def test_opcheck_torch_backend(i):
    op, args = _cases("torch")[i]
    torch.library.opcheck(op, args)


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("i", [0, 3, 5])
def test_opcheck_triton_backend(i):
    op, args = _cases("triton")[i]
    if has_cuda():
        args = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_eps_reaches_both_backends(eps):
    """fp32 rows of variance / mean square 1e-6 (about eps: the result depends on eps as much as on x): every
    norm op applies the eps it is given, on both backends (triton vs torch within fp32 rounding; the
    torch LayerNorm vs F.layer_norm with that eps). Ops dropping or scaling eps on the way would differ."""
    dev = "cuda" if has_cuda() else "cpu"
    x = ((torch.randn(B, L, D) + 2.0) * 1e-3).to(dev)
    z = (torch.randn(B, L, D) * 1e-3).to(dev)
    w = (torch.rand(D) + 0.5).to(dev)
    ops = [lambda be: norms.ln_modulate(x, eps=eps, backend=be),
           lambda be: norms.residual_ln_modulate(x, z, eps=eps, backend=be)[1],
           lambda be: norms.ln_modulate_quant(x, eps=eps, format="int8", granularity="per_token", backend=be)[1],
           lambda be: norms.rmsnorm_rope(z, w, num_heads=H, eps=eps, backend=be),
           lambda be: norms.rmsnorm_rope_pool(z, w, num_heads=H, eps=eps, pool_rows=2, mean=True, backend=be)[1]]
    for i, op in enumerate(ops):
        t, r = op("triton").double(), op("torch").double()
        assert ((t - r).norm() / r.norm()).item() <= 1e-6, i
    torch.testing.assert_close(ops[0]("torch"), torch.nn.functional.layer_norm(x, (D,), eps=eps), rtol=0, atol=0)


def test_fake_shapes_under_meta():
    x = torch.empty(B, 300, 200, dtype=torch.bfloat16, device="meta")
    q, s = norms.ln_modulate_quant(x, format="fp8", granularity="block128")
    assert q.shape == (600, 200) and q.dtype == torch.float8_e4m3fn and s.shape == (5, 2)
    q, s = norms.ln_modulate_quant(x, format="int8", granularity="per_token")
    assert q.dtype == torch.int8 and s.shape == (600, 1) and s.dtype == torch.float32
    x_new, h = norms.residual_ln_modulate(x, x, out_dtype=torch.float32)
    assert x_new.dtype == torch.bfloat16 and h.dtype == torch.float32 and h.shape == x.shape


def test_auto_on_cpu_is_reference():
    a = _args()
    out = norms.ln_modulate(a["x"], shift=a["sh"], scale=a["sc"], backend="auto")
    assert torch.equal(out, norms.ln_modulate(a["x"], shift=a["sh"], scale=a["sc"], backend="torch"))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = _args()
    with pytest.raises(KernelUnavailableError, match="ln_modulate"):
        norms.ln_modulate(a["x"], backend="triton")
    with pytest.raises(KernelUnavailableError, match="unknown backend"):
        norms.rmsnorm_rope(a["x"], a["w"], backend="cuda")


@pytest.mark.parametrize("call,match", [
    (lambda a: norms.ln_modulate(a["x"], weight=torch.randn(D + 1)), r"weight must be \[D=64\]"),
    (lambda a: norms.ln_modulate(a["x"], shift=torch.randn(3, 1, D)), "shift of shape"),
    (lambda a: norms.ln_modulate(a["x"].int()), "dtype"),
    (lambda a: norms.residual_ln_modulate(a["x"], a["y"][:, :2]), "must match x"),
    (lambda a: norms.rmsnorm_rope(a["x"], a["w"], a["cos"], None, H), "both"),
    (lambda a: norms.rmsnorm_rope(a["x"], a["w"], a["cos"], a["sin"], 3), "num_heads=3"),
    (lambda a: norms.rmsnorm_rope(a["x"], a["w"], a["cos"][:2], a["sin"], H), r"cos must be \[L=5"),
    (lambda a: norms.rmsnorm_rope(a["x"], a["w"].half()), "weight dtype"),
    (lambda a: norms.ln_modulate_quant(a["x"], format="int4"), "unknown format 'int4'"),
    (lambda a: norms.ln_modulate_quant(a["x"], granularity="per_tensor"), "valid: per_token, block128"),
])
def test_errors_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call(_args())


def test_import_is_lean():
    code = ("import sys, turbocompile.ops.norms; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "import torch; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/tmp")


# ----------------------------------------------------------------------------- rmsnorm_rope_pool
def _pool_cases(backend):
    a = _args()
    op = torch.ops.turbocompile.rmsnorm_rope_pool.default
    return [
        (op, (a["x"], a["w"], a["cos"], a["sin"], H, 1e-6, 2, True, a["y"], backend)),  # L=5: a partial block
        (op, (a["x"], a["w"].bfloat16(), None, None, H, 1e-6, 8, False, None, backend)),  # L < pool_rows, no v
    ]


@pytest.mark.parametrize("i", range(2))
def test_rmsnorm_rope_pool_opcheck(i):
    torch.library.opcheck(*_pool_cases("torch")[i])


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here")
@pytest.mark.parametrize("i", range(2))
def test_rmsnorm_rope_pool_opcheck_triton(i):
    op, args = _pool_cases("triton")[i]
    if has_cuda():
        args = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_rmsnorm_rope_pool_fake_shapes():
    z = torch.empty(2, 300, 1536, dtype=torch.bfloat16, device="meta")
    w = torch.empty(1536, dtype=torch.bfloat16, device="meta")
    out, pooled, vmax = norms.rmsnorm_rope_pool(z, w, num_heads=12, pool_rows=128, mean=False, v=z)
    assert out.shape == z.shape and out.dtype == torch.bfloat16
    assert pooled.shape == vmax.shape == (24, 3, 128) and pooled.dtype == vmax.dtype == torch.float32
    out, pooled, vmax = norms.rmsnorm_rope_pool(z, w, num_heads=12, pool_rows=64, mean=True)
    assert pooled.shape == (24, 5, 128) and vmax.shape == (0,) and vmax.dtype == torch.float32


@pytest.mark.parametrize("call,match", [
    (lambda a: norms.rmsnorm_rope_pool(a["x"], a["w"], num_heads=3, pool_rows=2, mean=True),
     "D=64 must split into num_heads=3 heads of even size"),
    (lambda a: norms.rmsnorm_rope_pool(a["x"], a["w"], num_heads=H, pool_rows=0, mean=True), "pool_rows must be"),
    (lambda a: norms.rmsnorm_rope_pool(a["x"], a["w"], num_heads=H, pool_rows=2, mean=True, v=a["y"][:, :3]),
     r"v must be \[B, L, D\] = \(2, 5, 64\)"),
    (lambda a: norms.rmsnorm_rope_pool(a["x"], a["w"], num_heads=H, pool_rows=2, mean=True, v=a["y"].int()),
     "float32, bfloat16 or float16"),
    (lambda a: norms.rmsnorm_rope_pool(a["x"], a["w"], a["cos"][:2], a["sin"], H, pool_rows=2, mean=True),
     r"cos must be \[L=5"),
])
def test_rmsnorm_rope_pool_errors(call, match):
    with pytest.raises(ValueError, match=match) as ei:
        call(_args())
    assert "\n" not in str(ei.value)
