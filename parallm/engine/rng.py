"""A counter-based random number generator for per-row sampling noise.

Why not `mx.random`: its state is one global key, so a row's noise would depend on what else was
sampled before it and on its position in the batch. Here the noise of row b at vocabulary index v
is a pure function hash(seed_b, step_b, v): a seeded row draws the same noise whatever the batch
holds, whatever slot it sits in, and on every backend (only integer and elementwise float ops).

The hash is two rounds of murmur3's 32-bit finalizer (xor-shift-multiply), keyed per row. The
per-row keys are mixed on the host with numpy (B values, cheap); the per-element work is one
fused elementwise kernel (`mx.compile`). sampling_ops.gumbel_argmax turns it into a draw.
"""
from __future__ import annotations

import numpy as np
import mlx.core as mx

_GOLDEN = 0x9E3779B9  # odd, so v -> v * _GOLDEN is a bijection on uint32
_M1 = 0x85EBCA6B
_M2 = 0xC2B2AE35
_MASK32 = 0xFFFFFFFF


def _fmix32_np(h: np.ndarray) -> np.ndarray:
    """murmur3 finalizer on a uint32 numpy array (wrapping arithmetic)."""
    h = h.astype(np.uint32)
    with np.errstate(over="ignore"):
        h ^= h >> np.uint32(16)
        h = (h * np.uint32(_M1)).astype(np.uint32)
        h ^= h >> np.uint32(13)
        h = (h * np.uint32(_M2)).astype(np.uint32)
        h ^= h >> np.uint32(16)
    return h


def split_seed(seed: int) -> tuple[int, int]:
    """Any Python int seed (negative or > 64 bits too) -> two uint32 words."""
    s = seed & ((1 << 64) - 1)
    return s & _MASK32, (s >> 32) & _MASK32


def row_keys(seed_lo: np.ndarray, seed_hi: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Per-row keys [B, 2] uint32 from (seed, step); distinct steps give unrelated keys."""
    with np.errstate(over="ignore"):
        step_lo = (steps.astype(np.uint64) & np.uint64(_MASK32)).astype(np.uint32)
        step_hi = (steps.astype(np.uint64) >> np.uint64(32)).astype(np.uint32)
        k1 = _fmix32_np(seed_lo.astype(np.uint32) ^ _fmix32_np(step_lo + np.uint32(_GOLDEN)))
        k2 = _fmix32_np(seed_hi.astype(np.uint32) ^ _fmix32_np(k1 ^ step_hi ^ np.uint32(_M2)))
    return np.stack([k1, k2], axis=1)


def _fmix32(h: mx.array) -> mx.array:
    h = h ^ (h >> 16)
    h = h * mx.array(_M1, dtype=mx.uint32)
    h = h ^ (h >> 13)
    h = h * mx.array(_M2, dtype=mx.uint32)
    return h ^ (h >> 16)


def uniform_from_keys(keys: mx.array, vocab_ids: mx.array) -> mx.array:
    """u[b, v] in (0, 1), float32, from keys [B, 2] uint32 and vocab_ids [V] uint32."""
    k1 = keys[:, 0:1]
    k2 = keys[:, 1:2]
    h = _fmix32((vocab_ids[None, :] * mx.array(_GOLDEN, dtype=mx.uint32)) ^ k1)
    h = _fmix32(h + k2)
    # The top 24 bits fill a float32 mantissa exactly; +0.5 keeps u away from 0 and 1.
    return ((h >> 8).astype(mx.float32) + 0.5) * (1.0 / (1 << 24))


class CounterNoise:
    """Holds the [V] index vector for one vocabulary size and a compiled uniform kernel.

    Owned by one BatchSampler (no module-level state); compiled functions retrace per batch shape.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.vocab_ids = mx.arange(vocab_size, dtype=mx.uint32)
        # Materialise now: a lazy array made on the thread that builds the engine cannot be
        # evaluated on the worker thread ("There is no Stream(cpu, 0) in current thread").
        mx.eval(self.vocab_ids)
        self._uniform = mx.compile(uniform_from_keys)

    def uniform(self, keys: np.ndarray) -> mx.array:
        """[B, V] float32 uniforms in (0, 1) for host keys [B, 2] uint32."""
        return self._uniform(mx.array(keys, dtype=mx.uint32), self.vocab_ids)
