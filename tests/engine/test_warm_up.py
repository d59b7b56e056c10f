"""The warm-up (parallm/engine/warm_up.py) and the bucket sizes prefill passes round to."""
from __future__ import annotations

import dataclasses

import pytest

from parallm.engine.engine import Engine, EngineConfig
from parallm.engine.pass_shapes import _bucket, bucket_sizes
from parallm.engine.warm_up import warm_up


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


@pytest.mark.parametrize("cuda", [False, True], ids=["elsewhere", "cuda"])
def test_default_warm_up_is_the_basic_requests_and_on_cuda_one_full_round(tiny_loaded, monkeypatch, cuda):
    """On CUDA a full round (every row at once) runs too, so the K/V buffers grew through every slot
    count; elsewhere it does not."""
    from parallm.engine import warm_up as warm_up_module

    monkeypatch.setattr(warm_up_module, "computing_on_cuda", lambda: cuda)
    engine, _ = _recording_engine(tiny_loaded, bucket=True)
    added = []
    original = engine.add_request
    engine.add_request = lambda req: (added.append(req.request_id), original(req))
    warm_up(engine)
    full = [r for r in added if r.startswith("warm-up-full")]
    assert len(full) == (engine.config.max_num_seqs if cuda else 0)
    assert engine.runner.cache.slot_capacity == 0  # all rows done: the buffers were released
    assert not engine.has_unfinished()


def test_rows_cap_is_the_largest_row_bucket_within_the_step():
    from parallm.engine.pass_shapes import PassShapes

    shapes = PassShapes(pass_cost_tokens=1024, decode_kv_step=128, prefill_kv_step=256, bucket_prefill=True)
    assert shapes.rows_cap(128, 2048) == 16  # 17 rows would pad to 24
    assert shapes.rows_cap(96, 2048) == 16  # 21 fit, but 24 does not: 16 is the largest bucket <= 21
    assert shapes.rows_cap(16, 2048) == 128
    assert shapes.rows_cap(4096, 2048) == 1  # a pass wider than the step still takes one row
    flat = PassShapes(pass_cost_tokens=256, decode_kv_step=32, prefill_kv_step=32, bucket_prefill=False)
    assert flat.rows_cap(128, 2048) >= 1 << 20  # unbucketed passes are not split


def test_bucketed_passes_never_pad_past_the_step_and_give_the_same_tokens(tiny_loaded):
    """Five prompts of 12 prefill tokens (60) in a 64-token step: 5 rows of width 16 would pad to 6 (96 tokens), so the
    runner splits the pass (4 + 1); the greedy tokens are those of the unbucketed engine."""
    from parallm.engine.types import EngineRequest, SamplingParams

    def run(bucket: bool):
        engine, seen = _recording_engine(tiny_loaded, bucket=bucket)
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        for i in range(5):
            engine.add_request(EngineRequest(f"r{i}", [(11 * i + 3 * j) % 200 + 1 for j in range(13)], params))
        tokens = {}
        while engine.has_unfinished():
            for out in engine.step().outputs:
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
        return tokens, seen

    bucketed, seen = run(True)
    plain, _ = run(False)
    assert bucketed == plain and len(bucketed) == 5
    assert all(rows * width <= 64 for rows, width in seen), seen
    assert (4, 16) in seen and (1, 16) in seen


def test_bench_burst_reports_each_round(tiny_model_dir, capsys):
    """loadtests/bench_burst.py end to end on the tiny model: one JSON row per round, every
    request of the burst got its first token, and the slowest steps are listed."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))
    import bench_burst

    assert bench_burst.main(["--model", str(tiny_model_dir), "--burst", "6", "--input-len", "20",
                             "--output-len", "3", "--rounds", "2", "--max-num-seqs", "8",
                             "--warm-up", "basic"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["burst"] == 6 and r["answered"] == 6 and r["warm_up"] == "basic" and r["warm_up_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] <= r["ttft_max_ms"]
        assert r["tok_s"] > 0 and r["steps"] >= 3 and len(r["slowest_steps_ms_tokens"]) <= 5
