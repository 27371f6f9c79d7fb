"""Bridges to other libraries (imported explicitly, never by ``import turbocompile``).

* :mod:`turbocompile.integrations.diffusers` — an optimized artifact as a diffusers ``WanPipeline``
  transformer, and the rCM sampler as its scheduler.
"""
