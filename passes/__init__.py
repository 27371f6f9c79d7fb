"""Built-in graph passes (installed as ``turbocompile.passes``).

Importing this package registers every built-in pass with
:func:`turbocompile.passbase.register_pass`. Passes emit ``torch.ops.turbocompile.*``
ops by name and never import ``turbocompile.kernels``.
"""

from turbocompile.passes import w8a8_linear  # noqa: E402,F401
from turbocompile.passes import sagesla_attention  # noqa: E402,F401
from turbocompile.passes import fuse_norms  # noqa: E402,F401
from turbocompile.passes import bake_rcm_sampler  # noqa: E402,F401
from turbocompile.passes import fuse_gemm_epilogues  # noqa: E402,F401
from turbocompile.passes import fuse_sibling_gemms  # noqa: E402,F401
from turbocompile.passes import fuse_attention_pooling  # noqa: E402,F401
from turbocompile.passes import fuse_residual_epilogues  # noqa: E402,F401
from turbocompile.passes import merge_padding_keys  # noqa: E402,F401
from turbocompile.passes import fuse_text_attention  # noqa: E402,F401
from turbocompile.passes import fuse_sagesla_quant  # noqa: E402,F401
