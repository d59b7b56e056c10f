"""Scheduler: books only (ids, token counts, slots, budgets); it never imports mlx.

The idea (vLLM v1): no separate prefill and decode phases. Every sequence has `tokens` (prompt +
generated) and `num_computed` (how many of them have K/V in its slot). Each step lets the computed
count catch up: a sequence with exactly one uncomputed token is a *decode row*; one with more gets
a *prefill chunk* of up to the token budget, always leaving its last token to the decode pass
(which is the only pass that computes logits). Decode rows are scheduled first, then prefill chunks
of running sequences, then new sequences from the waiting queue, until `max_num_batched_tokens`
is spent. A long prompt therefore spreads over several steps while running streams keep decoding.

Scheduling is optimistic, so the engine can schedule step t+1 while step t still runs: when a
chunk or decode row is scheduled its tokens count as computed at once, and a decode row appends a
PLACEHOLDER output token that `update` fills in when the step's results arrive. A sequence never
gets more decode rows than max_tokens; one that stops on a stop token or string is computed for
one extra step whose result is dropped.

KV accounting is logical: a running sequence holds `num_computed` tokens of the budget plus what
it is scheduled to compute this step. When a running sequence cannot get its tokens, the newest
running sequence is preempted: its slot is freed, it goes back to the front of the waiting queue,
and it is recomputed later (prompt + what it had generated).
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Protocol

from parallm.engine.types import SamplingParams


PLACEHOLDER = -1  # an output token sampled by a step still in flight; update() fills it in


class PrefixIndex(Protocol):
    def match(self, token_ids: list[int], adapter: Optional[str], max_tokens: int) -> int:
        """How many leading tokens (a block multiple, <= max_tokens) have saved K/V."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running sequences (slots) at most
    max_num_batched_tokens: int = 512  # tokens computed per step, decode rows included
    kv_budget_tokens: int = 1 << 20  # KV positions all running sequences may hold together
    # When > 0, a prompt's prefill is cut so that a chunk ends at its last full block of this many
    # tokens: a model whose cache keeps only a window or a recurrent state can be stored for the
    # prefix cache only at that exact moment (prefix_cache.py, exact mode). 0: chunks as large as fit.
    align_prefill_to: int = 0


@dataclass(eq=False)  # identity equality: membership tests must not compare token lists
class Sequence:
    """One choice of one request. `seq_id` is "<request_id>/<index>"."""

    seq_id: str
    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    adapter: Optional[str] = None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the slot (== the slot's length)
    num_cached: int = 0  # prompt tokens whose K/V came from the prefix cache (usage)
    slot: Optional[int] = None
    leader: Optional["Sequence"] = None  # n > 1: the choice whose prompt K/V this one copies
    finished: bool = False
    is_running: bool = False  # in Scheduler.running (holds a slot)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[i] if i < p else self.output_ids[i - p]

    def tokens_between(self, start: int, end: int) -> list[int]:
        return [self.token_at(i) for i in range(start, end)]


@dataclass
class NewRow:
    """A sequence that took a slot this step; the runner sets the slot up before any pass."""

    seq_id: str
    slot: int
    prompt_ids: list[int]  # the prompt (prefix-cache key, sampler penalty context)
    generated_ids: list[int]  # tokens generated before a preemption (empty for a fresh row)
    params: SamplingParams
    choice_index: int  # which of the request's n choices (the sampler derives its seed from it)
    adapter: Optional[str]
    copy_from_slot: Optional[int] = None  # n > 1: copy the leader's prompt K/V from this slot
    prefix_tokens: int = 0  # K/V for this many leading tokens come from the prefix cache (or leader)


@dataclass
class PrefillChunk:
    """Tokens [offset, offset + len(token_ids)) of a sequence, computed for K/V only (no logits)."""

    seq_id: str
    slot: int
    token_ids: list[int]
    offset: int  # position of token_ids[0] == the slot's length before this pass
    prompt_done: bool  # after this chunk, all but the last prompt token are computed


@dataclass
class DecodeRow:
    """One token at position `offset` whose logits are sampled (a generated or last prompt token).

    `token_id` is PLACEHOLDER when the input is the token the previous step sampled for this slot
    and that step is still in flight: the runner takes it from the device, never the host."""

    seq_id: str
    slot: int
    token_id: int
    offset: int
    output_index: int = -1  # where the sampled token goes in Sequence.output_ids


@dataclass
class SchedulerOutput:
    freed_slots: list[int]  # slots released since the last step (finished, aborted, preempted)
    new_rows: list[NewRow]  # sequences admitted this step, in slot-claim order
    prefill: list[PrefillChunk]  # K/V-only chunks; the runner runs these BEFORE the decode pass
    decode: list[DecodeRow]  # rows sampled this step (may include rows prefilled this step)
    num_batched_tokens: int  # tokens computed this step (prefill + decode)
    preempted: list[str]  # seq_ids sent back to waiting this step

    @property
    def is_empty(self) -> bool:
        return not (self.prefill or self.decode or self.freed_slots or self.new_rows)


@dataclass
class SampledToken:
    token_id: int
    logprob: Optional[float] = None
    top: Optional[list[tuple[int, float]]] = None  # (token_id, logprob) alternatives


@dataclass
class RunnerOutput:
    sampled: dict[str, SampledToken]  # seq_id -> the token sampled from its decode row


class Scheduler:
    def __init__(self, config: SchedulerConfig, prefix_index: Optional[PrefixIndex] = None):
        self.config = config
        self.prefix_index = prefix_index
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first, newest last
        self._free_slots = list(range(config.max_num_seqs))  # a min-heap: holes fill first
        self._freed_since_step: list[int] = []
        self._seqs: dict[str, Sequence] = {}  # every unfinished sequence, running or waiting
        self.num_preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- adding and removing -----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._seqs[seq.seq_id] = seq

    def finish(self, seq: Sequence) -> None:
        """A sequence is done (stop, length or abort): free its slot, forget it."""
        seq.finished = True
        self._seqs.pop(seq.seq_id, None)
        if seq.is_running:
            self.running.remove(seq)
            seq.is_running = False
            self._release_slot(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def abort_request(self, request_id: str) -> list[Sequence]:
        found = [s for s in list(self.running) + list(self.waiting) if s.request_id == request_id]
        for s in found:
            self.finish(s)
        return found

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._freed_since_step)

    def kv_tokens_used(self) -> int:
        return sum(s.num_computed for s in self.running)

    # ---- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        token_budget = cfg.max_num_batched_tokens
        kv_used = self.kv_tokens_used()
        new_rows: list[NewRow] = []
        prefill: dict[str, PrefillChunk] = {}
        decode: dict[str, DecodeRow] = {}
        preempted: list[str] = []

        def reserve(seq: Sequence, need: int) -> bool:
            """Find `need` KV tokens for a running seq, preempting the newest others; False if seq
            itself had to go."""
            nonlocal kv_used
            while kv_used + need > cfg.kv_budget_tokens:
                victim = self.running[-1]
                kv_used -= victim.num_computed + self._scheduled_tokens(victim, prefill, decode)
                prefill.pop(victim.seq_id, None)
                decode.pop(victim.seq_id, None)
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    return False
            kv_used += need
            return True

        # 1. decode rows of running sequences (oldest first)
        for seq in list(self.running):
            if not seq.is_running or token_budget <= 0:
                continue
            if (seq.num_tokens - seq.num_computed == 1 and len(seq.output_ids) < seq.params.max_tokens
                    and reserve(seq, 1)):
                decode[seq.seq_id] = self._decode_row(seq)
                token_budget -= 1
        # 2. prefill chunks of running sequences
        for seq in list(self.running):
            if not seq.is_running or token_budget <= 0:
                continue
            remaining = seq.num_tokens - seq.num_computed
            if remaining > 1:
                chunk = self._aligned(seq, seq.num_computed, min(remaining - 1, token_budget))
                if reserve(seq, _chunk_cost(chunk, remaining, token_budget)):
                    token_budget -= self._schedule_chunk(seq, chunk, prefill, decode, token_budget)
        # 3. admit waiting sequences (FIFO; an n > 1 follower waits for its leader's prompt)
        skipped: list[Sequence] = []
        while self.waiting and token_budget > 0 and self._free_slots and not preempted:
            seq = self.waiting.popleft()
            if seq.leader is not None and self._leader_pending(seq):
                skipped.append(seq)
                continue
            reused, copy_from = self._reusable_prefix(seq)
            remaining = seq.num_tokens - reused
            chunk = self._aligned(seq, reused, min(remaining - 1, token_budget))
            cost = reused + (_chunk_cost(chunk, remaining, token_budget) if chunk > 0 else 1)
            if kv_used + cost > cfg.kv_budget_tokens:
                skipped.append(seq)
                break
            slot = heapq.heappop(self._free_slots)
            seq.slot, seq.num_computed = slot, reused
            if copy_from is None and reused:
                seq.num_cached = reused
            self.running.append(seq)
            seq.is_running = True
            kv_used += cost
            new_rows.append(NewRow(seq.seq_id, slot, seq.prompt_ids, list(seq.output_ids),
                                   seq.params, seq.index, seq.adapter, copy_from, reused))
            if chunk > 0:
                token_budget -= self._schedule_chunk(seq, chunk, prefill, decode, token_budget)
            else:
                decode[seq.seq_id] = self._decode_row(seq)
                token_budget -= 1
        for seq in reversed(skipped):
            self.waiting.appendleft(seq)

        for chunk in prefill.values():  # optimistic: counted as computed once scheduled
            self._seqs[chunk.seq_id].num_computed += len(chunk.token_ids)
        for row in decode.values():
            seq = self._seqs[row.seq_id]
            seq.num_computed += 1
            seq.output_ids.append(PLACEHOLDER)
            row.output_index = len(seq.output_ids) - 1
        freed, self._freed_since_step = self._freed_since_step, []
        # rows are listed in slot order so passes gather K/V in memory order
        return SchedulerOutput(
            freed_slots=freed,
            new_rows=new_rows,
            prefill=sorted(prefill.values(), key=lambda c: c.slot),
            decode=sorted(decode.values(), key=lambda d: d.slot),
            num_batched_tokens=sum(len(c.token_ids) for c in prefill.values()) + len(decode),
            preempted=preempted,
        )

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[tuple[Sequence, SampledToken]]:
        """Fill in the tokens a step sampled. Returns (seq, token) for sequences still alive
        (a sequence finished or aborted meanwhile gets nothing)."""
        new_tokens = []
        for row in out.decode:
            seq = self._seqs.get(row.seq_id)
            sampled = result.sampled.get(row.seq_id)
            if seq is None or sampled is None or seq.finished:
                continue
            seq.output_ids[row.output_index] = sampled.token_id
            new_tokens.append((seq, sampled))
        return new_tokens

    # ---- helpers -----------------------------------------------------------------------------
    def _schedule_chunk(self, seq, chunk, prefill, decode, token_budget) -> int:
        """Schedule `chunk` prefill tokens; if that completes all but the last token and budget
        is left, the last token decodes in the same step. Returns tokens used."""
        start = seq.num_computed
        remaining = seq.num_tokens - start
        done = chunk == remaining - 1
        prompt_last = len(seq.prompt_ids) - 1
        prefill[seq.seq_id] = PrefillChunk(seq.seq_id, seq.slot, seq.tokens_between(start, start + chunk),
                                           start, start < prompt_last <= start + chunk)
        used = chunk
        if done and token_budget - chunk > 0:
            decode[seq.seq_id] = DecodeRow(seq.seq_id, seq.slot, seq.token_at(start + chunk), start + chunk)
            used += 1
        return used

    def _aligned(self, seq: Sequence, start: int, chunk: int) -> int:
        """`chunk` cut so it ends at the prompt's last full block if it would cross it."""
        block = self.config.align_prefill_to
        if block <= 0:
            return chunk
        boundary = (len(seq.prompt_ids) - 1) // block * block
        return boundary - start if start < boundary < start + chunk else chunk

    @staticmethod
    def _decode_row(seq: Sequence) -> DecodeRow:
        return DecodeRow(seq.seq_id, seq.slot, seq.token_at(seq.num_computed), seq.num_computed)


    @staticmethod
    def _scheduled_tokens(seq, prefill, decode) -> int:
        chunk = prefill.get(seq.seq_id)
        return (len(chunk.token_ids) if chunk else 0) + (1 if seq.seq_id in decode else 0)

    def _leader_pending(self, seq: Sequence) -> bool:
        """True while the leader is running but has not computed its prompt's K/V yet."""
        lead = seq.leader
        return (lead.is_running
                and lead.num_computed < len(lead.prompt_ids) - 1)

    def _reusable_prefix(self, seq: Sequence) -> tuple[int, Optional[int]]:
        """(tokens whose K/V need not be computed, slot to copy them from or None for the prefix
        cache). At least the last token is always left to compute: it yields the logits."""
        limit = seq.num_tokens - 1
        lead = seq.leader
        if (lead is not None and lead.is_running and not seq.output_ids
                and lead.num_computed >= len(seq.prompt_ids) - 1):
            return len(seq.prompt_ids) - 1, lead.slot
        if self.prefix_index is None or limit <= 0:
            return 0, None
        hit = self.prefix_index.match(seq.prompt_ids, seq.adapter, min(limit, len(seq.prompt_ids)))
        if not seq.output_ids:  # count a request's first lookup only, not recomputes
            self.prefix_queries += len(seq.prompt_ids)
            self.prefix_hits += hit
        return hit, None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.is_running = False
        self._release_slot(seq)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release_slot(self, seq: Sequence) -> None:
        if seq.slot is not None:
            heapq.heappush(self._free_slots, seq.slot)
            self._freed_since_step.append(seq.slot)
            seq.slot = None


def _chunk_cost(chunk: int, remaining: int, token_budget: int) -> int:
    """KV tokens a prefill chunk takes, plus its last token when that decodes in the same step."""
    return chunk + (1 if chunk == remaining - 1 and token_budget > chunk else 0)

