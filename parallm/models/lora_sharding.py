"""LoRA tensors for a tensor-parallel model: which slice of A and B each rank keeps, and the one
small all-reduce the sharded-to-all layers need. MultiLoRALinear (parallm/models/lora.py) slices
with `shard_lora` when its base is a sharded linear; see docs/distributed.md "Adapters".

mlx-lm's `model.shard(group)` replaces each linear W [out, in] by one of two kinds (segments=1):
- all-to-sharded (q/k/v/gate/up): rank r keeps output rows [r*out/R, (r+1)*out/R); its input is
  the whole x. LoRA's delta x @ A @ B restricted to those outputs is x @ A @ B[:, rows_r]: keep A
  whole, slice B's columns. No communication.
- sharded-to-all (o/down): rank r keeps input columns [r*in/R, (r+1)*in/R) and sees only that
  slice x_r of the input; the layer all-reduces the partial products. x @ A = sum_r x_r @ A[rows_r],
  so slice A's rows and all-reduce the small [tokens, lora_rank] product before applying the whole B.
  That all-reduce moves lora_rank values per token (8-64), not `out` (thousands).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import (AllToShardedLinear, QuantizedAllToShardedLinear,
                                       QuantizedShardedToAllLinear, ShardedToAllLinear)

ALL_TO_SHARDED = "all-to-sharded"
SHARDED_TO_ALL = "sharded-to-all"


@dataclass(frozen=True)
class LoRAShard:
    """This rank's part of one layer's adapter: a [in_r, rank], b [rank, out_r]."""

    a: mx.array
    b: mx.array
    reduce_xa: bool  # all-reduce x @ a across ranks before @ b (sharded-to-all layers)


def sharding_style(module: nn.Module) -> Optional[str]:
    """ALL_TO_SHARDED, SHARDED_TO_ALL, or None for a linear that model.shard() left whole."""
    if isinstance(module, (AllToShardedLinear, QuantizedAllToShardedLinear)):
        return ALL_TO_SHARDED
    if isinstance(module, (ShardedToAllLinear, QuantizedShardedToAllLinear)):
        return SHARDED_TO_ALL
    return None


def shard_lora(a: mx.array, b: mx.array, style: Optional[str], rank: int, size: int) -> LoRAShard:
    """Slice full adapter tensors a [in, r], b [r, out] (scale folded into b or not, as the caller
    keeps them) for `rank` of `size`. Raises ValueError when the split is not even."""
    if style is None or size == 1:
        return LoRAShard(a, b, reduce_xa=False)
    if style == ALL_TO_SHARDED:
        out = b.shape[1]
        if out % size:
            raise ValueError(f"lora_b has {out} outputs, not divisible by {size} ranks")
        step = out // size
        return LoRAShard(a, b[:, rank * step:(rank + 1) * step], reduce_xa=False)
    if style == SHARDED_TO_ALL:
        inp = a.shape[0]
        if inp % size:
            raise ValueError(f"lora_a has {inp} inputs, not divisible by {size} ranks")
        step = inp // size
        return LoRAShard(a[rank * step:(rank + 1) * step], b, reduce_xa=True)
    raise ValueError(f"unknown sharding style {style!r}; expected {ALL_TO_SHARDED!r} or {SHARDED_TO_ALL!r}")


def lora_delta(x: mx.array, shard: LoRAShard, group: Optional["mx.distributed.Group"] = None) -> mx.array:
    """This rank's adapter contribution for its local input x (the layer's own input)."""
    xa = x @ shard.a.astype(x.dtype)
    if shard.reduce_xa:
        xa = mx.distributed.all_sum(xa, group=group)
    return xa @ shard.b.astype(x.dtype)
