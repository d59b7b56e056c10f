"""BatchedKVCache on its own: per-row writes, masks that hide stale data, no copies of other rows."""
from __future__ import annotations

import mlx.core as mx

from parallm.models.cache_layout import AttentionLayer, CacheLayout
from parallm.engine.kv_cache import BatchedKVCache, PassLayout


def make_cache(slots=4):
    return BatchedKVCache(CacheLayout((AttentionLayer(1, 2, 2, mx.float32),)), slots)


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
    cache.admit(0)  # a new sequence takes the freed slot
    layers = cache.begin_pass(PassLayout([0], [0], num_new=1, kv_len=1, contiguous=False))
    layers[0].update_and_fetch(kv([[9]]), kv([[9]]))
    cache.end_pass({0: 1})
    assert mx.array_equal(cache.keys[0][1], before)
    assert cache.nbytes > 0
    cache.free_slot(0)
    cache.free_slot(1)
    assert cache.nbytes == 0  # idle: buffers dropped


# ---- sliding-window layers: a ring of `window` positions per slot ------------------------------

def ring_cache(window=4, slots=4):
    return BatchedKVCache(CacheLayout((AttentionLayer(1, 2, 2, mx.float32, window=window),)), slots)


def visible_positions(keys, mask, row, query):
    """The positions (stored as the K values) a query of a row sees."""
    seen = mask[row, 0, query].tolist()
    return sorted(int(v) for v, s in zip(keys[row, 0, :, 0].tolist(), seen) if s)


def test_a_ring_row_sees_exactly_its_window_across_chunks_and_decodes():
    window = 4
    cache = ring_cache(window)
    cache.admit(0)
    cache.admit(1)
    length = [0, 0]
    # slot 0 prefills 7 tokens in chunks of 3, 3, 1 beside slot 1 (2, then 1 padded to 3), then both decode
    for chunks in ([3, 2], [3, 1], [1, 0]):
        rows = [s for s in (0, 1) if chunks[s]]
        N = max(chunks[s] for s in rows)
        layout = PassLayout(rows, [length[s] for s in rows], num_new=N, kv_len=0, contiguous=False,
                            num_real=[chunks[s] for s in rows])
        layer = cache.begin_pass(layout)[0]
        new = kv([[length[s] + i if i < chunks[s] else 99 for i in range(N)] for s in rows])
        keys, _ = layer.update_and_fetch(new, new)
        mask = layer.make_mask(N)
        for b, s in enumerate(rows):
            for i in range(chunks[s]):
                q = length[s] + i
                assert visible_positions(keys, mask, b, i) == list(range(max(0, q - window + 1), q + 1)), (s, q)
        for s in rows:
            length[s] += chunks[s]
        cache.end_pass({s: length[s] for s in rows})
    for _ in range(5):  # decode: slot 1 idle in the first two steps (its junk goes to the trash index)
        active = [True, _ >= 2]
        layout = PassLayout([0, 1], list(length), num_new=1, kv_len=0, contiguous=True,
                            num_real=[int(a) for a in active])
        layer = cache.begin_pass(layout)[0]
        new = kv([[length[0]], [length[1] if active[1] else 99]])
        keys, _ = layer.update_and_fetch(new, new)
        mask = layer.make_mask(1)
        for s in (0, 1):
            if active[s]:
                q = length[s]
                assert visible_positions(keys, mask, s, 0) == list(range(max(0, q - window + 1), q + 1)), (s, q)
                length[s] += 1
        cache.end_pass({s: length[s] for s in (0, 1) if active[s]})
    assert cache.keys[0].shape[2] == window + 1  # the window and the trash index, however long the rows


def test_state_rows_start_at_zero_and_idle_rows_keep_theirs():
    from parallm.models.cache_layout import StateLayer

    cache = BatchedKVCache(CacheLayout((StateLayer(((3,),), (mx.float32,)),)), 4)
    cache.admit(0)
    cache.admit(1)
    state = cache.begin_pass(PassLayout([0, 1], [0, 0], num_new=1, kv_len=1, contiguous=True, num_real=[1, 1]))[0]
    assert state[0].tolist() == [[0, 0, 0], [0, 0, 0]]
    state[0] = mx.array([[1, 1, 1], [2, 2, 2]], dtype=mx.float32)
    cache.end_pass({0: 1, 1: 1})
    # slot 1 idle: whatever the model computes for it is dropped
    state = cache.begin_pass(PassLayout([0, 1], [1, 1], num_new=1, kv_len=2, contiguous=True, num_real=[1, 0]))[0]
    state[0] = state[0] + 10
    cache.end_pass({0: 2})
    assert cache.state.buffers[0][0][:2].tolist() == [[11, 11, 11], [2, 2, 2]]
    cache.free_slot(1)
    cache.admit(1)  # a new sequence in the slot starts from zero again
    assert cache.state.buffers[0][0][:2].tolist() == [[11, 11, 11], [0, 0, 0]]
