"""Where tokens go in a sliding-window layer's ring, and which ring entries a query sees.

A windowed layer keeps `ring` positions per slot: position p lives at index p % ring, and index
`ring` is a trash slot that padding, idle rows and tokens older than the ring write to (so junk
never lands on a position a row still needs). Both functions work on every row of a pass at once,
with array ops only, from each row's offset (its valid length before the pass).
"""
from __future__ import annotations

import mlx.core as mx


def ring_write_index(offsets: mx.array, num_real: list[int], num_new: int, ring: int) -> mx.array:
    """[B, num_new] (or [B] when num_new == 1): p % ring for the last `ring` real tokens of each
    row, the trash index `ring` for everything else."""
    k = mx.arange(num_new)[None]  # [1, N]
    real = mx.array(num_real, dtype=mx.int32)[:, None]
    keep = (k < real) & (k >= real - ring)
    index = mx.where(keep, (offsets[:, None] + k) % ring, ring)
    return index[:, 0] if num_new == 1 else index


def ring_mask(offsets: mx.array, num_new: int, window: int, ring: int) -> mx.array:
    """[B, 1, N, kv] bool over what a windowed layer attends: the ring (and its trash index), then,
    for a prefill pass (N > 1), the N new tokens. Ring entry j holds the latest position
    p' <= last with p' % ring == j (last: the row's newest position in the ring), valid if p' >= 0;
    query q sees it iff p' > q - window. A decode pass has written its token first, so its newest
    position is its offset; a prefill pass attends the ring as it was, plus the new tokens."""
    N = num_new
    offsets = offsets[:, None]  # [B, 1]
    j = mx.arange(ring + 1)[None]  # [1, ring + 1]
    last = offsets if N == 1 else offsets - 1
    held = last - (last - j) % ring  # [B, ring + 1]
    q = offsets + mx.arange(N)[None]  # [B, N]
    seen = ((held >= 0) & (j < ring))[:, None, :] & (held[:, None, :] > q[:, :, None] - window)
    if N > 1:  # the new tokens: causal within the window
        i, k = mx.arange(N)[:, None], mx.arange(N)[None]
        new = (k <= i) & (i - k < window)
        seen = mx.concatenate([seen, mx.broadcast_to(new[None], (seen.shape[0], N, N))], axis=2)
    return seen[:, None]
