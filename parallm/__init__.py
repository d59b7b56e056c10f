"""parallm: an LLM inference server on MLX."""
__version__ = "0.1.0"

from parallm._blas import preload_blas as _preload_blas  # noqa: E402  must run before any `import mlx`

_preload_blas()
