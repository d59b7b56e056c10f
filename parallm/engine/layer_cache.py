"""LayerCache: the face of one attention layer of a BatchedKVCache that mlx-lm model code calls
(`offset`, `update_and_fetch`, `make_mask`, and `attend` for the CUDA decode kernels)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import mlx.core as mx

if TYPE_CHECKING:
    from parallm.engine.kv_cache import BatchedKVCache


class LayerCache:
    """The per-layer face of BatchedKVCache that mlx-lm model code calls."""

    def __init__(self, parent: "BatchedKVCache", layer: int):
        self._parent = parent
        self._layer = layer

    @property
    def offset(self) -> mx.array:
        """Per-row positions of the first new token ([B] int32); RoPE accepts array offsets."""
        return self._parent._offsets_arr

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return self._parent._update(self._layer, keys, values)

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None, **kwargs):
        return self._parent._mask(self._layer, N, window_size)

    def attend(self, queries: mx.array, scale: float, sinks=None) -> Optional[mx.array]:
        """The attention output when this pass attends through the kernels, else None (the caller
        then runs MLX's attention on what update_and_fetch returned)."""
        parent = self._parent
        if parent._pass is None or not parent._pass.use_kernels:
            return None
        if sinks is not None:
            raise RuntimeError("attention sinks are not supported by parallm's decode kernels")
        return parent._attend(self._layer, queries, scale)

    def is_trimmable(self) -> bool:
        return False

    def empty(self) -> bool:
        return self._parent.keys[self._layer] is None

    @property
    def nbytes(self) -> int:
        return self._parent.nbytes // max(1, len(self._parent.specs))
