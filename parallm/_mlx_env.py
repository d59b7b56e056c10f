"""MLX settings parallm changes from MLX's defaults, set in the environment before MLX reads them.

MLX_CUDA_GRAPH_CACHE_SIZE (CUDA build): MLX records the kernels of each evaluation as CUDA graphs of
about 20 nodes and keeps the instantiated graphs in a cache keyed by their topology. When the cache
holds more than this many, MLX drops *all* of them, and every graph must be instantiated again.
MLX's default is 100; a decode step of a 16-layer model alone makes a few dozen, and prefill passes,
sampling options and adapters add more, so a server crossed the limit again and again. Measured on
an H200 (1B model, BENCHMARKS.md, "graph cache"): the engine warm-up took 77.5 s with the default
and 1.5 s with 2000, and the first burst of 64 requests after start had a TTFT p99 of 6.6 s with the
default and 0.5 s with 2000. A user's own value wins (we only set what is unset). Other backends
ignore the variable.

This module must never import mlx: it runs before the first `import mlx` (parallm/__init__.py).
"""
from __future__ import annotations

import os

DEFAULTS = {"MLX_CUDA_GRAPH_CACHE_SIZE": "2000"}


def apply_mlx_defaults(environ=os.environ) -> dict[str, str]:
    """Set each of DEFAULTS that the environment does not set; returns what was set."""
    applied = {}
    for key, value in DEFAULTS.items():
        if key not in environ:
            environ[key] = value
            applied[key] = value
    return applied
