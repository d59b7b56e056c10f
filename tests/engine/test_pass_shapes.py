"""PassShapes: the CUDA policy (bucketed prefill rows and widths, rounded attention lengths) must not change a single token; grouping and buckets behave as documented."""
from __future__ import annotations

import pytest

from parallm.engine.engine import Engine, EngineConfig
from parallm.engine.pass_shapes import PassShapes, _bucket, group_by_length
from parallm.engine.types import EngineRequest, SamplingParams

from engine_helpers import make_prompt, reference_greedy, run_to_completion, tokens_of

CUDA_LIKE = PassShapes(pass_cost_tokens=1024, decode_kv_step=128, prefill_kv_step=256, bucket_prefill=True)


@pytest.mark.parametrize("shapes", [CUDA_LIKE, PassShapes(0, 1, 1, False)], ids=["cuda-like", "exact"])
def test_pass_shape_policy_keeps_greedy_output(tiny_loaded, shapes):
    # the first five join together (one prefill pass of 5 rows: bucketed to 6, one row repeated),
    # the rest one per step while others decode
    lengths = [3, 7, 12, 5, 9, 1, 20, 33, 50, 64, 90, 17]
    engine = Engine(tiny_loaded, EngineConfig(max_num_seqs=5, max_num_batched_tokens=64,
                                              prefix_cache_bytes=0))
    engine.runner.shapes = shapes
    schedule: dict[int, list] = {}
    for i, n in enumerate(lengths):
        req = EngineRequest(f"r{i}", make_prompt(i, n),
                            SamplingParams(max_tokens=5 + i, temperature=0.0, ignore_eos=True))
        schedule.setdefault(max(0, i - 4), []).append(req)
    outs = run_to_completion(engine, schedule)
    for i, n in enumerate(lengths):
        assert tokens_of(outs[f"r{i}"]) == reference_greedy(tiny_loaded, make_prompt(i, n), 5 + i), i


def test_group_by_length_splits_only_when_padding_costs_more_than_a_pass():
    lengths = [16, 2048, 17, 16, 18]
    assert group_by_length(lengths, 1024) == [[1], [4, 2, 0, 3]]  # 2048 alone: 4 x 2030 pads > 1024
    assert group_by_length(lengths, 10 ** 6) == [[1, 4, 2, 0, 3]]
    assert group_by_length([5, 5, 5], 0) == [[0, 1, 2]]  # equal lengths never pad
    assert group_by_length([], 8) == []


def test_buckets_pad_at_most_half():
    seen = [_bucket(n, 1) for n in range(1, 100)]
    assert sorted(set(seen))[:10] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert all(n <= b <= max(2, 1.5 * n) for n, b in zip(range(1, 100), seen))
    assert _bucket(16, 16) == 16 and _bucket(17, 16) == 24 and _bucket(2000, 16) == 2048


def test_step_token_budget_comes_from_the_device_unless_set(tiny_loaded):
    import mlx.core as mx

    from parallm.engine.engine import Engine, EngineConfig

    by_device = PassShapes.for_device().step_tokens
    cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
    assert by_device == (2048 if cuda else 512)
    assert Engine(tiny_loaded, EngineConfig()).scheduler.config.max_num_batched_tokens == by_device
    assert Engine(tiny_loaded, EngineConfig(max_num_batched_tokens=96)).scheduler.config.max_num_batched_tokens == 96
