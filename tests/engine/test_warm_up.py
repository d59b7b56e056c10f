"""The warm-up's shape rounds (parallm/engine/warm_up.py): where prefill passes are bucketed (CUDA),
every (rows, width) bucket a step can hold runs once before the first real request."""
from __future__ import annotations

import dataclasses

from parallm.engine.engine import Engine, EngineConfig
from parallm.engine.pass_shapes import _bucket
from parallm.engine.warm_up import bucket_sizes, warm_up


def test_bucket_sizes_are_exactly_the_values_pass_shapes_rounds_to():
    assert bucket_sizes(100, 16) == [16, 24, 32, 48, 64, 96]
    assert bucket_sizes(8, 1) == [1, 2, 3, 4, 6, 8]
    for smallest in (1, 16):
        sizes = bucket_sizes(3000, smallest)
        assert all(_bucket(v, smallest) == v for v in sizes)
        # and every n up to the largest rounds to one of them
        assert {_bucket(n, smallest) for n in range(1, sizes[-1] + 1)} == set(sizes)


def _recording_engine(tiny_loaded, bucket: bool):
    engine = Engine(tiny_loaded, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64))
    runner = engine.runner
    runner.shapes = dataclasses.replace(runner.shapes, bucket_prefill=bucket)
    seen = []
    original = runner._prefill

    def recording(chunks):
        shapes = runner.shapes
        seen.append((shapes.prefill_rows(len(chunks)), shapes.prefill_width(max(len(c.token_ids) for c in chunks))))
        return original(chunks)

    runner._prefill = recording
    return engine, seen


def test_bucketed_warm_up_runs_every_prefill_bucket_a_step_holds(tiny_loaded):
    engine, seen = _recording_engine(tiny_loaded, bucket=True)
    warm_up(engine)
    want = {(rows, width) for width in bucket_sizes(64, 16) for rows in bucket_sizes(min(8, 64 // width), 1)}
    assert want <= set(seen), sorted(want - set(seen))
    assert (4, 16) in want and (1, 64) in want
    # nothing left behind: no requests, an empty prefix cache, counters at zero
    assert not engine.has_unfinished()
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert engine.prefix_cache is None or engine.prefix_cache.nbytes == 0


def test_unbucketed_warm_up_keeps_to_the_few_basic_requests(tiny_loaded):
    engine, seen = _recording_engine(tiny_loaded, bucket=False)
    warm_up(engine)
    assert 1 <= len(seen) <= 4  # the three basic requests' prefills, no shape rounds
