"""BatchedKVCache on its own: per-row writes, masks that hide stale data, no copies of other rows."""
from __future__ import annotations

import mlx.core as mx

from parallm.engine.kv_cache import BatchedKVCache, KVShape, PassLayout


def make_cache(slots=4):
    return BatchedKVCache(KVShape(num_layers=1, n_kv_heads=1, k_head_dim=2, v_head_dim=2, dtype=mx.float32), slots)


def kv(values):  # [B, 1, N, 2] from a list of per-row lists of scalars
    a = mx.array(values, dtype=mx.float32)[:, None, :, None]
    return mx.broadcast_to(a, a.shape[:3] + (2,))


def test_rows_write_at_their_own_offsets_and_mask_hides_stale_positions():
    cache = make_cache()
    for s in (0, 1, 2):
        cache.in_use[s] = True
    # prefill: slot 0 gets 3 tokens at 0.., slot 2 gets 1 token (padded to 3) at 0..
    layers = cache.begin_pass(PassLayout([0, 2], [0, 0], num_new=3, kv_len=3, contiguous=False))
    layers[0].update_and_fetch(kv([[1, 2, 3], [7, 99, 99]]), kv([[1, 2, 3], [7, 99, 99]]))
    cache.end_pass({0: 3, 2: 1})
    # decode over slots 0..2 (slot 1 is a hole): each row writes at its own length
    layers = cache.begin_pass(PassLayout([0, 1, 2], [3, 0, 1], num_new=1, kv_len=4, contiguous=True))
    assert layers[0].offset.tolist() == [3, 0, 1]
    k, _ = layers[0].update_and_fetch(kv([[4], [0], [8]]), kv([[4], [0], [8]]))
    mask = layers[0].make_mask(1)
    cache.end_pass({0: 4, 2: 2})
    assert k[0, 0, :, 0].tolist() == [1, 2, 3, 4]
    assert k[2, 0, :2, 0].tolist() == [7, 8]  # the padding junk at position 1 was overwritten
    assert mask[:, 0, 0].tolist() == [[True] * 4, [True, False, False, False], [True, True, False, False]]


def test_freeing_and_joining_do_not_touch_other_rows():
    cache = make_cache()
    for s in (0, 1):
        cache.in_use[s] = True
    layers = cache.begin_pass(PassLayout([0, 1], [0, 0], num_new=2, kv_len=2, contiguous=False))
    layers[0].update_and_fetch(kv([[1, 2], [5, 6]]), kv([[1, 2], [5, 6]]))
    cache.end_pass({0: 2, 1: 2})
    before = cache.keys[0][1]
    cache.free_slot(0)
    assert cache.allocate_slot() == 0  # the hole is reused first
    layers = cache.begin_pass(PassLayout([0], [0], num_new=1, kv_len=1, contiguous=False))
    layers[0].update_and_fetch(kv([[9]]), kv([[9]]))
    cache.end_pass({0: 1})
    assert mx.array_equal(cache.keys[0][1], before)
    assert cache.nbytes > 0
    cache.free_slot(0)
    cache.free_slot(1)
    assert cache.nbytes == 0  # idle: buffers dropped
