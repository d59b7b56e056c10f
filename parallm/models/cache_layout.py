"""CacheLayout: what each entry of a model's cache list holds, learned from mlx-lm's own caches.

mlx-lm models take a list of caches, one per entry of `model.make_cache()` (usually one per layer),
and each family mixes three kinds:
- full attention (`KVCache`): K/V of every position;
- sliding-window attention (`RotatingKVCache`): K/V of the last `window` positions only;
- recurrent state (`ArraysCache`: Mamba's conv and SSM state, gated-delta and short-conv layers):
  a few fixed-size arrays per sequence, whatever its length.
A `CacheList` groups several of these in one entry (Falcon-H1: a Mamba state and an attention
layer). `probe_cache_layout` runs two tokens through the model with those caches and reads the
kinds, shapes and dtypes back, so the batched cache can lay out the same thing with one row per
sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import mlx.core as mx


class UnsupportedCache(ValueError):
    """The model's cache is of a kind the batched engine cannot hold."""


@dataclass(frozen=True)
class AttentionLayer:
    n_kv_heads: int
    k_head_dim: int
    v_head_dim: int
    dtype: mx.Dtype
    window: Optional[int] = None  # sliding window: only the last `window` positions are attended

    @property
    def bytes_per_position(self) -> int:
        return self.n_kv_heads * (self.k_head_dim + self.v_head_dim) * self.dtype.size


@dataclass(frozen=True)
class StateLayer:
    shapes: tuple[tuple[int, ...], ...]  # each state array's shape without the batch axis
    dtypes: tuple[mx.Dtype, ...]

    @property
    def bytes_per_sequence(self) -> int:
        total = 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            n = dtype.size
            for d in shape:
                n *= d
            total += n
        return total


Layer = Union[AttentionLayer, StateLayer]


@dataclass(frozen=True)
class CacheLayout:
    layers: tuple[Layer, ...]  # every cache the model holds, in order (a CacheList's members in turn)
    # the model's cache list: entry i is layer index `entries[i]`, or a tuple of them for a CacheList;
    # None: one layer per entry
    entries: Optional[tuple[Union[int, tuple[int, ...]], ...]] = None

    @property
    def structure(self) -> tuple[Union[int, tuple[int, ...]], ...]:
        return self.entries if self.entries is not None else tuple(range(len(self.layers)))

    @property
    def attention(self) -> list[AttentionLayer]:
        return [layer for layer in self.layers if isinstance(layer, AttentionLayer)]

    @property
    def has_state(self) -> bool:
        return any(isinstance(layer, StateLayer) for layer in self.layers)

    @property
    def has_windows(self) -> bool:
        return any(layer.window is not None for layer in self.attention)

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one more token of one sequence costs, windowed layers counted as full (an upper
        bound until the window fills)."""
        return sum(layer.bytes_per_position for layer in self.attention)

    @property
    def state_bytes_per_sequence(self) -> int:
        return sum(layer.bytes_per_sequence for layer in self.layers if isinstance(layer, StateLayer))

    def describe(self) -> str:
        full = sum(1 for layer in self.attention if layer.window is None)
        windows = sorted({layer.window for layer in self.attention if layer.window is not None})
        state = len(self.layers) - len(self.attention)
        parts = [f"{full} full attention"]
        if windows:
            parts.append(f"{len(self.attention) - full} sliding-window ({', '.join(map(str, windows))})")
        if state:
            parts.append(f"{state} recurrent-state")
        return ", ".join(parts) + " layers"


def probe_cache_layout(model) -> CacheLayout:
    """Run two tokens through `model` with mlx-lm's caches and read what each entry holds."""
    from mlx_lm.models.cache import CacheList, make_prompt_cache

    caches = make_prompt_cache(model)
    model(mx.array([[0]]), cache=caches)
    model(mx.array([[0]]), cache=caches)  # the second call shows the dtype a state settles to
    layers: list[Layer] = []
    entries: list[Union[int, tuple[int, ...]]] = []
    for i, entry in enumerate(caches):
        members = list(entry.caches) if isinstance(entry, CacheList) else [entry]
        indices = tuple(range(len(layers), len(layers) + len(members)))
        layers.extend(_layer_of(i, cache) for cache in members)
        entries.append(indices if isinstance(entry, CacheList) else indices[0])
    grouped = any(isinstance(e, tuple) for e in entries)
    return CacheLayout(tuple(layers), tuple(entries) if grouped else None)


def _layer_of(i: int, cache) -> Layer:
    from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

    if isinstance(cache, RotatingKVCache):
        if cache.keep:
            raise UnsupportedCache(f"cache entry {i} keeps its first {cache.keep} positions "
                                   "(RotatingKVCache keep > 0), which the batched engine does not hold")
        return _attention(cache, window=cache.max_size)
    if type(cache) is KVCache:
        return _attention(cache, window=None)
    if isinstance(cache, ArraysCache):
        arrays = list(cache.cache)
        if any(a is None for a in arrays):
            raise UnsupportedCache(f"cache entry {i} ({type(cache).__name__}) left a state unset")
        mx.eval(arrays)
        return StateLayer(tuple(tuple(a.shape[1:]) for a in arrays), tuple(a.dtype for a in arrays))
    raise UnsupportedCache(f"cache entry {i} is a {type(cache).__name__}, which the batched engine does not "
                           "hold (it holds KVCache, RotatingKVCache, ArraysCache and CacheLists of them)")


def _attention(cache, window: Optional[int]) -> AttentionLayer:
    mx.eval(cache.keys, cache.values)
    _, heads, _, k_dim = cache.keys.shape
    return AttentionLayer(heads, k_dim, cache.values.shape[3], cache.keys.dtype, window)
