"""parallm: an LLM inference server on MLX."""
__version__ = "0.1.0"

from parallm._blas import preload_blas as _preload_blas  # noqa: E402  must run before any `import mlx`
from parallm._mlx_env import apply_mlx_defaults as _apply_mlx_defaults  # noqa: E402  likewise

_preload_blas()
_apply_mlx_defaults()
