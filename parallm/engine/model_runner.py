"""ModelRunner: turns a SchedulerOutput into forward passes over the BatchedKVCache.

Per step, in this order:
1. free the slots the scheduler released; set up newly admitted rows (copy K/V from the prefix
   cache or from an n > 1 leader's slot; register the row with the sampler);
2. the prefill pass: every prefill chunk, right-padded to one width, K/V only. Its logits are never
   read, so MLX's lazy evaluation skips the LM head (the costliest matmul for small models);
3. the decode pass over the contiguous slot range [0, highest active slot]: one token per row, each
   at its own offset; holes and rows that are not decoding this step compute a dummy token whose
   K/V lands at their own length (junk the mask hides, later overwritten) and whose logits are
   dropped. Sampling runs on the decode rows only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx

from parallm.engine.cuda.decode_attention import kernels_for
from parallm.models.cache_layout import CacheLayout
from parallm.engine.kv_cache import BatchedKVCache, PassLayout
from parallm.engine.pass_shapes import PassShapes, group_by_length, round_up
from parallm.engine.prefix_cache import PrefixCache
from parallm.engine.scheduler import (PLACEHOLDER, DecodeRow, PrefillChunk, RunnerOutput, SampledToken,
                                      SchedulerOutput)
from parallm.engine.sampler import BatchSampler, choice_seed


def _length_groups(chunks: list[PrefillChunk], pass_cost_tokens: int) -> list[list[PrefillChunk]]:
    """Split prefill chunks into passes of similar length: a pass is right-padded to its longest
    chunk, so mixing a 16-token chunk with a 128-token one computes 112 padding tokens, and each
    pass has a fixed cost too (PassShapes). A cost of 0 groups equal lengths only."""
    groups = group_by_length([len(c.token_ids) for c in chunks], pass_cost_tokens)
    return [sorted((chunks[i] for i in g), key=lambda c: c.slot) for g in groups]


@dataclass
class LaunchedStep:
    """A step whose graph is built and queued (mx.async_eval); `complete` reads it back."""

    decode: list[DecodeRow]
    sample: Any  # the sampler's SampleOutput (lazy), None when the step had no decode pass


class ModelRunner:
    def __init__(self, model, layout: CacheLayout, max_slots: int, sampler: BatchSampler, *,
                 prefix_cache: Optional[PrefixCache] = None, adapters: Any = None,
                 shapes: Optional[PassShapes] = None, decode_kernels: bool = True,
                 pass_tokens: Optional[int] = None):
        self.model = model
        self.shapes = shapes or PassShapes.for_device()
        # the step's token budget: a bucketed prefill pass is never padded past it (_capped_parts)
        self.pass_tokens = pass_tokens or self.shapes.step_tokens
        kernels = kernels_for(model, layout) if decode_kernels else None
        self.cache = BatchedKVCache(layout, max_slots, kernels)
        # Recurrent state cannot skip padding: a state model's prefill passes hold chunks of one
        # length, unpadded (state_cache.py)
        self.exact_prefill = layout.has_state
        self.sampler = sampler
        self.prefix_cache = prefix_cache
        self.adapters = adapters  # optional: .bind_rows(list of adapter ids per batch row)
        self._rows: dict[int, tuple[list[int], Optional[str]]] = {}  # slot -> (prompt ids, adapter)
        # the last token sampled per slot, on the device: the input of a PLACEHOLDER decode row
        self._slot_tokens = mx.zeros((max_slots,), dtype=mx.int32)
        # evaluate now: a lazy array made on this thread cannot be evaluated on the worker thread
        mx.eval(self._slot_tokens)
        self.dispatch_seconds = 0.0  # wall time inside mx.async_eval, cumulative

    def run(self, out: SchedulerOutput) -> RunnerOutput:
        """launch + complete: one step, synchronously."""
        return self.complete(self.launch(out))

    def complete(self, step: LaunchedStep) -> RunnerOutput:
        """Wait for a launched step and read its sampled tokens back to the host."""
        if step.sample is None:
            return RunnerOutput(sampled={})
        return RunnerOutput(sampled=_sampled_tokens(step.decode, step.sample))

    def launch(self, out: SchedulerOutput) -> LaunchedStep:
        """Build the step's passes and queue them without waiting (mx.async_eval)."""
        for slot in out.freed_slots:
            self._rows.pop(slot, None)
            self.sampler.remove_row(slot)
            if self.cache.in_use[slot]:
                self.cache.free_slot(slot)
        for row in out.new_rows:
            self._admit(row)
        cost = 0 if self.exact_prefill else self.shapes.pass_cost_tokens
        for group in _length_groups(out.prefill, cost):
            for part in self._capped_parts(group):
                self._prefill(part)
        if out.decode:
            return LaunchedStep(out.decode, self._decode(out))
        self._async_eval(self.cache.keys, self.cache.values)
        return LaunchedStep([], None)

    def _async_eval(self, *arrays) -> None:
        # timed: the engine's step accounting reports this as its "dispatch" phase
        started = time.perf_counter()
        mx.async_eval(*arrays)
        self.dispatch_seconds += time.perf_counter() - started

    # ---- rows --------------------------------------------------------------------------------
    def _admit(self, row) -> None:
        cache = self.cache
        cache.admit(row.slot)
        n = row.prefix_tokens
        if n and row.copy_from_slot is not None:
            cache.copy_rows(row.copy_from_slot, row.slot, n)
        elif n:
            cache.write_rows(row.slot, self.prefix_cache.load(row.prompt_ids, row.adapter, n), n)
        self._rows[row.slot] = (row.prompt_ids, row.adapter)
        p = row.params
        seed = None if p.seed is None else choice_seed(p.seed, row.choice_index)
        self.sampler.add_row(row.slot, p, row.prompt_ids, seed, row.generated_ids)

    def _bind_adapters(self, slots: list[Optional[int]]) -> None:
        if self.adapters is not None:
            self.adapters.bind_rows([self._rows[s][1] if s in self._rows else None for s in slots])

    # ---- passes ------------------------------------------------------------------------------
    def _capped_parts(self, group: list[PrefillChunk]) -> list[list[PrefillChunk]]:
        """A pass group split so that no bucketed pass pads past the step's tokens (rows_cap)."""
        shapes = self.shapes
        if not shapes.bucket_prefill:
            return [group]
        rest = sorted(group, key=lambda c: -len(c.token_ids))
        parts = []
        while rest:
            cap = shapes.rows_cap(shapes.prefill_width(len(rest[0].token_ids)), self.pass_tokens)
            parts.append(sorted(rest[:cap], key=lambda c: c.slot))
            rest = rest[cap:]
        return parts

    def _prefill(self, chunks: list[PrefillChunk]) -> None:
        shapes = self.shapes
        longest = max(len(c.token_ids) for c in chunks)
        width = longest if self.exact_prefill else shapes.prefill_width(longest)
        # Bucketed rows repeat the last chunk: the copy computes the same K/V at the same
        # positions of the same slot, so its duplicate writes change nothing.
        rows = chunks + [chunks[-1]] * (shapes.prefill_rows(len(chunks)) - len(chunks))
        tokens = mx.array([c.token_ids + [0] * (width - len(c.token_ids)) for c in rows], dtype=mx.int32)
        offsets = [c.offset for c in rows]
        layout = PassLayout(slots=[c.slot for c in rows], offsets=offsets, num_new=width,
                            kv_len=round_up(max(offsets) + width, shapes.prefill_kv_step), contiguous=False,
                            num_real=[len(c.token_ids) for c in rows])
        layers = self.cache.begin_pass(layout)
        self._bind_adapters(layout.slots)
        self.model(tokens, cache=layers)  # logits unused: only K/V get evaluated
        self.cache.end_pass({c.slot: c.offset + len(c.token_ids) for c in chunks})
        if self.prefix_cache is not None:
            for c in chunks:
                self._store_prefix(c)

    def _store_prefix(self, chunk: PrefillChunk) -> None:
        """Store the whole blocks of a prompt before its last token (whose K/V the decode pass
        computes): once the prompt is done, or, for exact entries (prefix_cache.py), right when the
        slot holds exactly those blocks (the scheduler ends a chunk there)."""
        prompt_ids, adapter = self._rows[chunk.slot]
        end = chunk.offset + len(chunk.token_ids)
        exact = self.prefix_cache.exact
        block = self.prefix_cache.block_size
        if not (chunk.prompt_done or exact and end == (len(prompt_ids) - 1) // block * block):
            return
        n = self.prefix_cache.wants(prompt_ids[: len(prompt_ids) - 1], adapter)
        if n and (not exact or n == end):
            rows = self.cache.read_rows(chunk.slot, n)
            self._async_eval(*rows)  # copies now, so they do not pin the slot buffers
            self.prefix_cache.store(prompt_ids, adapter, n, rows)

    def _decode(self, out: SchedulerOutput):
        cache = self.cache
        num_rows = cache.highest_active_slot() + 1
        tokens = [0] * num_rows
        from_device = [False] * num_rows
        offsets = list(cache.lengths[:num_rows])
        for d in out.decode:
            if d.token_id == PLACEHOLDER:
                from_device[d.slot] = True
            else:
                tokens[d.slot] = d.token_id
            offsets[d.slot] = d.offset
        inputs = mx.array(tokens, dtype=mx.int32)
        if any(from_device):
            inputs = mx.where(mx.array(from_device), self._slot_tokens[:num_rows], inputs)
        kv_len = round_up(max(offsets) + 1, self.shapes.decode_kv_step)
        real = [0] * num_rows
        for d in out.decode:
            real[d.slot] = 1
        layout = PassLayout(slots=list(range(num_rows)), offsets=offsets, num_new=1, kv_len=kv_len,
                            contiguous=True, num_real=real, use_kernels=cache.kernels is not None)
        layers = cache.begin_pass(layout)
        self._bind_adapters(layout.slots)
        logits = self.model(inputs[:, None], cache=layers)[:, -1, :]
        slots = [d.slot for d in out.decode]
        if len(slots) < num_rows:
            logits = logits[mx.array(slots, dtype=mx.int32)]
        sample = self.sampler.sample(logits, slots)
        self._slot_tokens[mx.array(slots, dtype=mx.int32)] = sample.token_ids
        self._async_eval(sample.token_ids, sample.logprobs, sample.top_ids, sample.top_logprobs,
                      self._slot_tokens, cache.keys, cache.values)
        cache.end_pass({d.slot: d.offset + 1 for d in out.decode})
        return sample


def _sampled_tokens(rows, sample) -> dict[str, SampledToken]:
    ids = sample.token_ids.tolist()
    logprobs = sample.logprobs.tolist() if sample.logprobs is not None else [None] * len(ids)
    top_ids = sample.top_ids.tolist() if sample.top_ids is not None else None
    top_lps = sample.top_logprobs.tolist() if sample.top_logprobs is not None else None
    result = {}
    for b, (row, token_id, lp) in enumerate(zip(rows, ids, logprobs)):
        top = list(zip(top_ids[b], top_lps[b])) if top_ids is not None else None
        result[row.seq_id] = SampledToken(token_id, lp, top)
    return result
