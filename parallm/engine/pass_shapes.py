"""PassShapes: how the model runner shapes its forward passes on one kind of device.

Two costs pull against each other. Every forward pass has a fixed cost (building the graph and
dispatching a few hundred kernels: ~3-7 ms on a CUDA host for a 16-layer model, whatever the pass
holds), and every padded token costs compute. On the CPU a token of a 135M model costs ~5 ms, so
padding is dear, but a pass of few tokens also makes small, slow GEMMs (measured best: a pass is
worth ~256 tokens there); on an H200 a pass is worth ~1,000 tokens of a 1B model.

On CUDA a third cost appears: MLX builds cuDNN attention graphs and picks GEMM kernels per distinct
shape, and the first pass of a new shape is slow (tens of ms). A server sees a new prompt length in
nearly every request, so prefill passes are rounded up to a few buckets there (rows, width and
attention length), which bounds the number of distinct shapes a long-running server ever compiles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PassShapes:
    pass_cost_tokens: int  # a pass's fixed cost, in padded tokens it is worth (groups prefill chunks)
    decode_kv_step: int  # the decode pass's attention length rounds up to this
    prefill_kv_step: int  # a prefill pass's attention length rounds up to this
    bucket_prefill: bool  # round prefill rows and widths up to buckets
    # The default max_num_batched_tokens. On CUDA a step of 2048 tokens of a 1B model is ~10 ms of
    # compute, and a burst of 64 prompts of 128 tokens then prefills in 4-5 steps instead of 16:
    # H200, 64 clients, TTFT p50/p99 280/514 ms vs 444/738 ms at 512, 7541 vs 6180 tok/s.
    step_tokens: int = 512

    @classmethod
    def for_device(cls) -> "PassShapes":
        import mlx.core as mx

        from parallm.models.device import computing_on_cuda

        if computing_on_cuda():
            return cls(pass_cost_tokens=1024, decode_kv_step=128,
                       prefill_kv_step=256, bucket_prefill=True, step_tokens=2048)
        if mx.default_device() == mx.gpu:  # Metal: cheap dispatch, no per-shape graph builds
            return cls(pass_cost_tokens=64, decode_kv_step=32,
                       prefill_kv_step=32, bucket_prefill=False)
        # CPU: 256 measured best of 16 / 256 / 4096 (prefill of 32 prompts of 16-128 tokens, default
        # model f32: 10.3 / 9.8 / 12.7 s); small passes make small, inefficient GEMMs
        return cls(pass_cost_tokens=256, decode_kv_step=32,
                   prefill_kv_step=32, bucket_prefill=False)

    def prefill_width(self, longest: int) -> int:
        return _bucket(longest, 16) if self.bucket_prefill else longest

    def prefill_rows(self, rows: int) -> int:
        return _bucket(rows, 1) if self.bucket_prefill else rows

    def rows_cap(self, width: int, pass_tokens: int) -> int:
        """Most rows a bucketed prefill pass of this (bucketed) width takes: the largest row
        bucket whose padded pass stays within `pass_tokens`. Capping keeps every pass a shape the
        warm-up's bucket rounds cover (each bucket up to the step budget): 17 rows of 128 tokens
        in a 2048-token step would otherwise pad to 24 rows, a shape no full pass of the budget
        makes on its own."""
        if not self.bucket_prefill:
            return 1 << 30
        return bucket_sizes(max(1, pass_tokens // max(1, width)), 1)[-1]


def group_by_length(lengths: Sequence[int], pass_cost_tokens: int) -> list[list[int]]:
    """Split items (given by length) into passes: each pass is padded to its longest item.

    Greedy over lengths sorted longest first: the next item joins the current pass unless the
    padding it brings, times the items still to place (none longer than it), exceeds a pass's
    cost; then a new, narrower pass starts. Returns lists of indices into `lengths`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for rank, i in enumerate(order):
        if groups:
            width = lengths[groups[-1][0]]
            if (width - lengths[i]) * (len(order) - rank) <= pass_cost_tokens:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def bucket_sizes(upto: int, smallest: int) -> list[int]:
    """Every value _bucket rounds to (smallest x 1, 1.5, 2, 3, 4, 6, ...), up to `upto`."""
    sizes, b = [], smallest
    while b <= upto:
        sizes.append(b)
        if b >= 2 and b + b // 2 <= upto:
            sizes.append(b + b // 2)
        b *= 2
    return sizes


def _bucket(n: int, smallest: int) -> int:
    """n rounded up to the next of smallest * (1, 1.5, 2, 3, 4, 6, 8, ...): at most 50% padding."""
    b = smallest
    while b < n:
        half = b + b // 2
        if b >= 2 and half >= n:
            return half
        b *= 2
    return b
