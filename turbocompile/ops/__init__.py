"""``torch.ops.turbocompile.*``: every custom op the passes emit.

Each op family lives in its own module here: the op schema (``torch.library.custom_op`` through ``_registry.define``),
its fake kernel (shape/dtype only, so graphs are analysed and exported without running),
and the dispatch between the PyTorch reference (``turbocompile.kernels.<family>.ref``)
and the Triton kernel (``turbocompile.kernels.<family>.triton_*``, imported lazily).

Importing this package registers all ops; it never imports Triton.
"""

from __future__ import annotations

from turbocompile.ops._backend import BACKENDS, has_triton, resolve_backend  # noqa: F401
from turbocompile.ops import w8a8  # noqa: F401,E402  (registers turbocompile::w8a8_* ops)
from turbocompile.ops import norms  # noqa: F401,E402  (registers the fused norm ops)
from turbocompile.ops import attention  # noqa: F401,E402  (registers turbocompile::sagesla, ::sagesla_quant)
from turbocompile.ops.attention import sagesla, sagesla_quant  # noqa: F401,E402  (public: turbocompile.ops.*)
from turbocompile.ops import text_attention  # noqa: F401,E402  (turbocompile::key_tail_start, ::tail_merged_attention)

__all__ = ["BACKENDS", "has_triton", "resolve_backend", "sagesla", "sagesla_quant"]
