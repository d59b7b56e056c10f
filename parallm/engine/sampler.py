"""BatchSampler: the next token for every running row in a handful of batched mlx ops.

Each running sequence (row) sits in a slot. Its sampling parameters live in host-side numpy
tables indexed by slot, written when the row joins (`add_row`) and never touched per step except
for the step counter. `sample(logits, slots)` gathers those tables in the batch's row order with
numpy (B values each), builds only the stages that some row in the batch uses, and returns LAZY
mx arrays so the engine can `mx.async_eval` them.

Pipeline per step (docs/sampling.md has the definitions):
  raw logits -> logit_bias -> repetition / frequency / presence penalties      ("processed")
  greedy rows: argmax(processed)
  other rows : processed / temperature -> min_p -> top_k -> top_p (renormalised) -> Gumbel-max
Logprobs follow vLLM's default and OpenAI's meaning: log-softmax of the RAW model logits.

Invariants:
- a row's result depends only on its own logits, parameters, seed and step; never on the other
  rows or its slot (no global RNG: see rng.py);
- the per-slot step counter counts the tokens sampled for that row so far.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import mlx.core as mx

from parallm.engine.rng import CounterNoise, row_keys, split_seed
from parallm.engine.types import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SampleOutput:
    """What `BatchSampler.sample` returns: lazy mx arrays in the batch's row order."""

    token_ids: mx.array  # [B] int32
    logprobs: Optional[mx.array]  # [B] float32 raw logprob of the chosen token; None if no row asked
    top_ids: Optional[mx.array] = None  # [B, k] int32, best first; k = max top_logprobs of the rows
    top_logprobs: Optional[mx.array] = None  # [B, k] float32, matching top_ids


def choice_seed(seed: int, index: int) -> int:
    """The seed for choice `index` of a seeded request with n > 1 (index 0 keeps the seed itself,
    so n=1 and the first of n choices agree; the others must differ or all choices would be equal)."""
    if index == 0:
        return seed
    lo, hi = split_seed(seed)
    keys = row_keys(np.array([lo], np.uint32), np.array([hi], np.uint32), np.array([index + (1 << 40)]))
    return int(keys[0, 0]) | (int(keys[0, 1]) << 32)


class BatchSampler:
    """Per-row sampling for up to `max_slots` rows over a vocabulary of `vocab_size` tokens."""

    def __init__(self, max_slots: int, vocab_size: int):
        if max_slots < 1 or vocab_size < 1:
            raise ValueError(f"max_slots and vocab_size must be >= 1, got {max_slots}, {vocab_size}")
        self.max_slots = max_slots
        self.vocab_size = vocab_size
        self._noise = CounterNoise(vocab_size)
        s = max_slots
        self._active = np.zeros(s, bool)
        self._temperature = np.ones(s, np.float32)
        self._greedy = np.ones(s, bool)
        self._top_p = np.ones(s, np.float32)
        self._top_k = np.zeros(s, np.int32)  # 0 = off
        self._min_p = np.zeros(s, np.float32)
        self._rep = np.ones(s, np.float32)
        self._presence = np.zeros(s, np.float32)
        self._frequency = np.zeros(s, np.float32)
        self._uses_penalty = np.zeros(s, bool)
        self._wants_logprobs = np.zeros(s, bool)
        self._num_top = np.zeros(s, np.int32)
        self._seed_lo = np.zeros(s, np.uint32)
        self._seed_hi = np.zeros(s, np.uint32)
        self._step = np.zeros(s, np.int64)
        self._bias: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # slot -> (token ids, biases)
        # Penalty history, allocated the first time a row uses a penalty. Rows without
        # penalties keep stale history: harmless because their penalty parameters are neutral.
        self._generated_counts: Optional[mx.array] = None  # [S, V] float32
        self._prompt_seen: Optional[mx.array] = None  # [S, V] bool

    # ---- rows joining and leaving (Python per row is fine here) ---------------------------

    def add_row(self, slot: int, params: SamplingParams, prompt_token_ids: Sequence[int],
                seed: Optional[int], generated_token_ids: Sequence[int] = ()) -> None:
        """Register the row in `slot`. `seed=None` draws a random seed. `generated_token_ids` is
        for a row that resumes after preemption: its step counter and penalty counts continue
        from there, so a seeded row gives the same tokens as if it had never been preempted."""
        self._check_slot(slot)
        self._validate(params)
        self._active[slot] = True
        self._greedy[slot] = params.temperature == 0.0
        self._temperature[slot] = 1.0 if params.temperature == 0.0 else params.temperature
        self._top_p[slot] = params.top_p
        self._top_k[slot] = params.top_k if 0 < params.top_k < self.vocab_size else 0
        self._min_p[slot] = params.min_p
        self._rep[slot] = params.repetition_penalty
        self._presence[slot] = params.presence_penalty
        self._frequency[slot] = params.frequency_penalty
        self._wants_logprobs[slot] = params.logprobs or params.top_logprobs > 0
        self._num_top[slot] = params.top_logprobs
        if seed is None:
            seed = secrets.randbits(64)
        self._seed_lo[slot], self._seed_hi[slot] = split_seed(seed)
        self._step[slot] = len(generated_token_ids)
        self._bias.pop(slot, None)
        if params.logit_bias:
            merged = dict(params.logit_bias)  # a repeated token id: the last bias wins
            self._bias[slot] = (np.fromiter(merged.keys(), np.int32, len(merged)),
                                np.fromiter(merged.values(), np.float32, len(merged)))
        uses_penalty = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                        or params.frequency_penalty != 0.0)
        self._uses_penalty[slot] = uses_penalty
        if uses_penalty:
            self._set_history(slot, prompt_token_ids, generated_token_ids)

    def remove_row(self, slot: int) -> None:
        self._check_slot(slot)
        self._active[slot] = False
        self._uses_penalty[slot] = False
        self._wants_logprobs[slot] = False
        self._bias.pop(slot, None)

    def _set_history(self, slot: int, prompt: Sequence[int], generated: Sequence[int]) -> None:
        if self._generated_counts is None:
            self._generated_counts = mx.zeros((self.max_slots, self.vocab_size), mx.float32)
            self._prompt_seen = mx.zeros((self.max_slots, self.vocab_size), mx.bool_)
        counts = np.bincount(np.asarray(generated, np.int64), minlength=self.vocab_size)
        seen = np.zeros(self.vocab_size, bool)
        seen[np.asarray(prompt, np.int64)] = True
        self._generated_counts[slot] = mx.array(counts[: self.vocab_size].astype(np.float32))
        self._prompt_seen[slot] = mx.array(seen)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is out of range 0..{self.max_slots - 1}")

    def _validate(self, p: SamplingParams) -> None:
        problems = []
        if not (p.temperature >= 0.0 and math.isfinite(p.temperature)):
            problems.append(f"temperature must be >= 0, got {p.temperature}")
        if not 0.0 < p.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {p.top_p}")
        if p.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 is off), got {p.top_k}")
        if not 0.0 <= p.min_p <= 1.0:
            problems.append(f"min_p must be in [0, 1], got {p.min_p}")
        if not p.repetition_penalty > 0.0:
            problems.append(f"repetition_penalty must be > 0, got {p.repetition_penalty}")
        if p.top_logprobs < 0:
            problems.append(f"top_logprobs must be >= 0, got {p.top_logprobs}")
        bad_ids = [t for t, _ in p.logit_bias if not 0 <= t < self.vocab_size]
        if bad_ids:
            problems.append(f"logit_bias token ids {bad_ids[:5]} are outside 0..{self.vocab_size - 1}")
        if problems:
            raise ValueError("; ".join(problems))

    # ---- the hot path: batched ops only ---------------------------------------------------

    def sample(self, logits: mx.array, slots: Union[Sequence[int], np.ndarray, mx.array]) -> SampleOutput:
        """Next token for each row. `logits` [B, V] (any float dtype) in the order of `slots`.
        Advances the rows' step counters and penalty counts (lazily, no sync)."""
        idx = self._batch_index(logits, slots)
        raw = logits.astype(mx.float32)
        processed = self._apply_penalties(self._apply_bias(raw, idx), idx)

        greedy = self._greedy[idx]
        if greedy.all():
            token_ids = mx.argmax(processed, axis=-1).astype(mx.int32)
        else:
            sampled = self._sample_stochastic(processed, idx)
            if greedy.any():
                token_ids = mx.where(mx.array(greedy), mx.argmax(processed, axis=-1), sampled)
            else:
                token_ids = sampled
            token_ids = token_ids.astype(mx.int32)

        out = SampleOutput(token_ids=token_ids, logprobs=None)
        if self._wants_logprobs[idx].any():
            self._add_logprobs(out, raw, idx)

        self._step[idx] += 1
        if self._uses_penalty[idx].any():
            # Scatter-add the sampled tokens; rows without penalties get counts too (unused).
            self._generated_counts = self._generated_counts.at[mx.array(idx), token_ids].add(1.0)
        return out

    def process_logits(self, logits: mx.array, slots: Union[Sequence[int], np.ndarray, mx.array]) -> mx.array:
        """The logits after logit_bias and penalties (float32), as `sample` sees them before
        temperature and truncation. Does not advance anything."""
        idx = self._batch_index(logits, slots)
        return self._apply_penalties(self._apply_bias(logits.astype(mx.float32), idx), idx)

    def _batch_index(self, logits: mx.array, slots) -> np.ndarray:
        idx = np.asarray(slots, dtype=np.int64).reshape(-1)
        if logits.ndim != 2 or logits.shape[0] != idx.size:
            raise ValueError(f"logits must be [B, V] with B == len(slots) == {idx.size}, got {logits.shape}")
        if logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits vocabulary {logits.shape[1]} != sampler's {self.vocab_size}")
        if idx.size and not (0 <= idx.min() and idx.max() < self.max_slots):
            raise ValueError(f"slots must be in 0..{self.max_slots - 1}, got {idx.tolist()}")
        if not self._active[idx].all():
            raise ValueError(f"slots {idx[~self._active[idx]].tolist()} have no row (call add_row)")
        if np.unique(idx).size != idx.size:
            raise ValueError(f"slots repeat within one batch: {idx.tolist()}")
        return idx

    def _apply_bias(self, logits: mx.array, idx: np.ndarray) -> mx.array:
        if not self._bias:
            return logits
        rows, cols, vals = [], [], []
        for b, slot in enumerate(idx.tolist()):
            entry = self._bias.get(slot)
            if entry is not None:
                rows.append(np.full(entry[0].size, b, np.int32))
                cols.append(entry[0])
                vals.append(entry[1])
        if not rows:
            return logits
        return logits.at[mx.array(np.concatenate(rows)), mx.array(np.concatenate(cols))].add(
            mx.array(np.concatenate(vals)))

    def _apply_penalties(self, logits: mx.array, idx: np.ndarray) -> mx.array:
        uses = self._uses_penalty[idx]
        if not uses.any():
            return logits
        rows = mx.array(idx)
        counts = self._generated_counts[rows]
        rep = self._rep[idx]
        if (rep != 1.0).any():
            seen = mx.logical_or(self._prompt_seen[rows], counts > 0)
            r = mx.array(rep)[:, None]
            logits = mx.where(seen, mx.where(logits > 0, logits / r, logits * r), logits)
        freq, pres = self._frequency[idx], self._presence[idx]
        if (freq != 0.0).any() or (pres != 0.0).any():
            logits = (logits - mx.array(freq)[:, None] * counts
                      - mx.array(pres)[:, None] * (counts > 0).astype(mx.float32))
        return logits

    def _sample_stochastic(self, processed: mx.array, idx: np.ndarray) -> mx.array:
        """Gumbel-max over the truncated, temperature-scaled distribution."""
        scaled = processed * mx.array(1.0 / self._temperature[idx])[:, None]
        greedy = self._greedy[idx]
        # Greedy rows take the argmax elsewhere: give them neutral truncation settings here.
        min_p = np.where(greedy, 0.0, self._min_p[idx]).astype(np.float32)
        top_k = np.where(greedy, 0, self._top_k[idx])
        top_p = np.where(greedy, 1.0, self._top_p[idx]).astype(np.float32)

        threshold = None  # [B, 1] keep tokens with scaled >= threshold
        if (min_p > 0).any():
            with np.errstate(divide="ignore"):
                log_min_p = np.log(min_p).astype(np.float32)  # log(0) = -inf: off
            threshold = mx.max(scaled, axis=-1, keepdims=True) + mx.array(log_min_p)[:, None]
        if (top_p < 1.0).any():
            threshold = self._top_k_top_p_threshold(scaled, top_k, top_p, threshold)
        elif (top_k > 0).any():
            threshold = self._maximum(threshold, self._top_k_threshold(scaled, top_k))
        if threshold is not None:
            scaled = mx.where(scaled >= threshold, scaled, _NEG_INF)

        keys = row_keys(self._seed_lo[idx], self._seed_hi[idx], self._step[idx])
        return mx.argmax(scaled + self._noise.gumbel(keys), axis=-1)

    @staticmethod
    def _maximum(a: Optional[mx.array], b: mx.array) -> mx.array:
        return b if a is None else mx.maximum(a, b)

    def _top_k_threshold(self, scaled: mx.array, top_k: np.ndarray) -> mx.array:
        """The k-th largest value per row (-inf for rows with top_k off), from a partial top-K."""
        k_max = int(top_k.max())
        best = mx.sort(mx.topk(scaled, k_max, axis=-1), axis=-1)[:, ::-1]  # [B, K] descending
        kth = np.where(top_k > 0, top_k - 1, 0).astype(np.int32)
        values = mx.take_along_axis(best, mx.array(kth)[:, None], axis=-1)
        return mx.where(mx.array(top_k > 0)[:, None], values, _NEG_INF)

    def _top_k_top_p_threshold(self, scaled: mx.array, top_k: np.ndarray, top_p: np.ndarray,
                               threshold: Optional[mx.array]) -> mx.array:
        """Nucleus threshold on the distribution left after min_p and top_k (renormalised)."""
        desc = -mx.sort(-scaled, axis=-1)  # [B, V] descending
        position = mx.arange(self.vocab_size)[None, :]
        k_eff = np.where(top_k > 0, top_k, self.vocab_size).astype(np.int32)
        kept = position < mx.array(k_eff)[:, None]
        if threshold is not None:
            kept = mx.logical_and(kept, desc >= threshold)
        probs = mx.softmax(mx.where(kept, desc, _NEG_INF), axis=-1)
        mass_before = mx.cumsum(probs, axis=-1) - probs
        # top_p == 1 rows keep everything they kept already; others keep the shortest prefix
        # whose mass reaches top_p (the token that crosses top_p is kept, as in vLLM/HF).
        p = mx.array(np.where(top_p >= 1.0, 2.0, top_p).astype(np.float32))[:, None]
        in_nucleus = mx.logical_and(kept, mass_before < p)
        count = mx.maximum(in_nucleus.astype(mx.int32).sum(axis=-1, keepdims=True), 1)
        return mx.take_along_axis(desc, count - 1, axis=-1)

    def _add_logprobs(self, out: SampleOutput, raw: mx.array, idx: np.ndarray) -> None:
        logprobs = raw - mx.logsumexp(raw, axis=-1, keepdims=True)
        out.logprobs = mx.take_along_axis(logprobs, out.token_ids[:, None], axis=-1)[:, 0]
        k = int(self._num_top[idx].max())
        if k > 0:
            k = min(k, self.vocab_size)
            top_ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
            top_vals = mx.take_along_axis(logprobs, top_ids, axis=-1)
            order = mx.argsort(-top_vals, axis=-1)
            out.top_ids = mx.take_along_axis(top_ids, order, axis=-1).astype(mx.int32)
            out.top_logprobs = mx.take_along_axis(top_vals, order, axis=-1)
