"""The LoRA slicing for sharded linears reproduces the unsharded delta (ranks simulated in one
process: the all-reduce of a sharded-to-all layer is a sum over the simulated ranks)."""
from __future__ import annotations

import mlx.core as mx
import pytest

from parallm.models.lora_sharding import (ALL_TO_SHARDED, SHARDED_TO_ALL, LoRAShard, lora_delta, shard_lora,
                                          sharding_style)


def _full(in_dims=32, out_dims=48, r=4):
    mx.random.seed(3)
    return mx.random.normal((5, in_dims)), mx.random.normal((in_dims, r)), mx.random.normal((r, out_dims))


@pytest.mark.parametrize("size", [2, 4])
def test_all_to_sharded_slices_concatenate_to_the_full_delta(size):
    x, a, b = _full()
    parts = [lora_delta(x, shard_lora(a, b, ALL_TO_SHARDED, r, size)) for r in range(size)]
    assert mx.allclose(mx.concatenate(parts, axis=-1), x @ a @ b, atol=1e-4).item()


@pytest.mark.parametrize("size", [2, 4])
def test_sharded_to_all_partial_products_sum_to_the_full_delta(size):
    x, a, b = _full()
    step = x.shape[1] // size
    shards = [shard_lora(a, b, SHARDED_TO_ALL, r, size) for r in range(size)]
    assert all(s.reduce_xa for s in shards)
    xa = sum(x[:, r * step:(r + 1) * step] @ shards[r].a for r in range(size))  # what all_sum computes
    assert mx.allclose(xa @ shards[0].b, x @ a @ b, atol=1e-4).item()


def test_uneven_split_is_refused_with_the_numbers():
    x, a, b = _full(out_dims=30)
    with pytest.raises(ValueError, match="30 outputs, not divisible by 4"):
        shard_lora(a, b, ALL_TO_SHARDED, 0, 4)


def test_styles_of_a_sharded_llama_and_the_one_rank_path(tiny_model_dir):
    from mlx_lm import load

    model, _ = load(str(tiny_model_dir))
    group = mx.distributed.init()  # one rank: shard() still installs the sharded layer types
    model.shard(group)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert [sharding_style(m) for m in (attn.q_proj, attn.o_proj, mlp.up_proj, mlp.down_proj)] == [
        ALL_TO_SHARDED, SHARDED_TO_ALL, ALL_TO_SHARDED, SHARDED_TO_ALL]
    x, a, b = _full(in_dims=64, out_dims=64)
    assert shard_lora(a, b, sharding_style(attn.o_proj), 0, group.size()) == LoRAShard(a, b, reduce_xa=False)
    # the all-reduce path on a 1-rank group is the identity
    assert mx.allclose(lora_delta(x, LoRAShard(a, b, reduce_xa=True), group), x @ a @ b, atol=1e-4).item()
