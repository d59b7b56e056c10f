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
from parallm.engine.sampling_ops import SamplingKernels
from parallm.engine.types import SamplingParams

_NEG_INF = float("-inf")
# As vLLM: below this a temperature is greedy (1/T would overflow float32 and sampling at it is
# argmax up to rounding anyway).
GREEDY_BELOW_TEMPERATURE = 1e-5


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

    def __init__(self, max_slots: int, vocab_size: int, *, top_p_candidates: Optional[int] = None):
        """top_p_candidates: None (default) computes every nucleus exactly. An int K looks the
        nucleus up among the K most likely tokens only: several times cheaper on the CPU backend,
        exact whenever those K tokens hold top_p of the mass, and otherwise a nucleus capped at
        K tokens (nearly flat distributions only). docs/sampling.md has the figures."""
        if max_slots < 1 or vocab_size < 1:
            raise ValueError(f"max_slots and vocab_size must be >= 1, got {max_slots}, {vocab_size}")
        if top_p_candidates is not None and top_p_candidates < 1:
            raise ValueError(f"top_p_candidates must be None or >= 1, got {top_p_candidates}")
        self.max_slots = max_slots
        self.vocab_size = vocab_size
        self.top_p_candidates = (None if top_p_candidates is None or top_p_candidates >= vocab_size
                                 else top_p_candidates)
        self._noise = CounterNoise(vocab_size)
        self._kernels = SamplingKernels()
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
        self._pending_history: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # slot -> (counts, seen)

    # ---- rows joining and leaving (Python per row is fine here) ---------------------------

    def add_row(self, slot: int, params: SamplingParams, prompt_token_ids: Sequence[int],
                seed: Optional[int], generated_token_ids: Sequence[int] = ()) -> None:
        """Register the row in `slot`. `seed=None` draws a random seed. `generated_token_ids` is
        for a row that resumes after preemption: its step counter and penalty counts continue
        from there, so a seeded row gives the same tokens as if it had never been preempted."""
        self._check_slot(slot)
        self._validate(params)
        for name, ids in (("prompt_token_ids", prompt_token_ids), ("generated_token_ids", generated_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"{name} has ids {bad[:5]} outside 0..{self.vocab_size - 1}")
        self._active[slot] = True
        greedy = params.temperature < GREEDY_BELOW_TEMPERATURE
        self._greedy[slot] = greedy
        self._temperature[slot] = 1.0 if greedy else params.temperature
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
        self._pending_history.pop(slot, None)
        self._active[slot] = False
        self._uses_penalty[slot] = False
        self._wants_logprobs[slot] = False
        self._bias.pop(slot, None)

    def _set_history(self, slot: int, prompt: Sequence[int], generated: Sequence[int]) -> None:
        """Queue the row's penalty history on the host; `_apply_pending_history` writes it into
        the device tables on the sampling thread. So add_row never waits for a step in flight
        and never leaves a lazy graph for another thread (MLX streams are per thread)."""
        counts = np.bincount(np.asarray(generated, np.int64), minlength=self.vocab_size)  # ids checked
        seen = np.zeros(self.vocab_size, bool)
        seen[np.asarray(prompt, np.int64)] = True
        self._pending_history[slot] = (counts.astype(np.float32), seen)

    def _apply_pending_history(self) -> None:
        if not self._pending_history:
            return
        if self._generated_counts is None:
            self._generated_counts = mx.zeros((self.max_slots, self.vocab_size), mx.float32)
            self._prompt_seen = mx.zeros((self.max_slots, self.vocab_size), mx.bool_)
        slots = list(self._pending_history)
        rows = mx.array(np.array(slots, np.int32))
        counts = mx.array(np.stack([self._pending_history[s][0] for s in slots]))
        seen = mx.array(np.stack([self._pending_history[s][1] for s in slots]))
        self._generated_counts[rows] = counts
        self._prompt_seen[rows] = seen
        self._pending_history.clear()

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
    # Each stage runs on the sub-batch of rows that use it (one gather in, one gather or
    # scatter out), so a row that does not use a feature costs ~nothing even when others do.

    def sample(self, logits: mx.array, slots: Union[Sequence[int], np.ndarray, mx.array]) -> SampleOutput:
        """Next token for each row. `logits` [B, V] (any float dtype) in the order of `slots`.
        Advances the rows' step counters and penalty counts (lazily, no sync).
        `logprobs`/`top_*` entries of rows that did not ask for logprobs are unspecified."""
        idx = self._batch_index(logits, slots)
        if idx.size == 0:
            return SampleOutput(token_ids=mx.zeros((0,), mx.int32), logprobs=None)
        raw = logits.astype(mx.float32)
        processed = self._apply_penalties(self._apply_bias(raw, idx), idx)

        token_ids = mx.argmax(processed, axis=-1)
        sampled = _Rows(~self._greedy[idx])
        if sampled.count:
            drawn = self._sample_stochastic(sampled.take(processed), idx[sampled.rows])
            token_ids = drawn if sampled.is_all else mx.where(
                mx.array(sampled.mask), sampled.expand(drawn, 0), token_ids)
        token_ids = token_ids.astype(mx.int32)

        out = SampleOutput(token_ids=token_ids, logprobs=None)
        wanting = _Rows(self._wants_logprobs[idx])
        if wanting.count:
            self._add_logprobs(out, raw, idx, wanting)

        self._step[idx] += 1
        penalised = _Rows(self._uses_penalty[idx])
        if penalised.count:
            rows = mx.array(idx[penalised.rows].astype(np.int32))
            self._generated_counts = self._generated_counts.at[rows, penalised.take(token_ids)].add(1.0)
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
        users = _Rows(self._uses_penalty[idx])
        if not users.count:
            return logits
        self._apply_pending_history()
        slots = idx[users.rows]
        history = mx.array(slots.astype(np.int32))
        before = users.take(logits)
        after = self._kernels.apply_penalties(
            before, self._generated_counts[history], self._prompt_seen[history],
            _column(self._rep[slots]), _column(self._frequency[slots]), _column(self._presence[slots]))
        if users.is_all:
            return after
        return logits.at[mx.array(users.rows)].add(after - before)

    def _sample_stochastic(self, x: mx.array, slots: np.ndarray) -> mx.array:
        """Gumbel-max over the truncated, temperature-scaled distribution for non-greedy rows.
        Truncation is one threshold per row on x (tokens with x >= threshold stay): min_p, then
        top_k, then top_p on what those left (renormalised)."""
        temperature = self._temperature[slots]
        min_p, top_k, top_p = self._min_p[slots], self._top_k[slots], self._top_p[slots]
        thr = None  # [b, 1]; None while no row truncates
        if (min_p > 0).any():
            with np.errstate(divide="ignore"):
                # x / T >= max / T + log(min_p)  <=>  x >= max + T * log(min_p); log(0) = -inf: off
                offset = (temperature * np.log(min_p)).astype(np.float32)
            thr = mx.max(x, axis=-1, keepdims=True) + _column(offset)
        cut = _Rows(top_k > 0)
        if cut.count:
            thr = _maximum(thr, cut.expand(self._top_k_threshold(cut.take(x), top_k[cut.rows]), _NEG_INF))
        nucleus = _Rows(top_p < 1.0)
        if nucleus.count:
            floor = mx.full((nucleus.count, 1), _NEG_INF) if thr is None else nucleus.take(thr)
            args = (nucleus.take(x), _column(1.0 / temperature[nucleus.rows]), floor,
                    _column(top_p[nucleus.rows]))
            if self.top_p_candidates is None:
                thr_p = self._kernels.top_p_threshold(*args)
            else:
                thr_p = self._kernels.top_p_threshold_in_candidates(*args, self.top_p_candidates)
            thr = _maximum(thr, nucleus.expand(thr_p, _NEG_INF))
        if thr is None:
            thr = mx.full((slots.size, 1), _NEG_INF)
        keys = row_keys(self._seed_lo[slots], self._seed_hi[slots], self._step[slots])
        return self._kernels.gumbel_argmax(x, _column(1.0 / temperature), thr,
                                           mx.array(keys, dtype=mx.uint32), self._noise.vocab_ids)

    @staticmethod
    def _top_k_threshold(x: mx.array, top_k: np.ndarray) -> mx.array:
        """The k-th largest value per row, from one partial top-K (K = the largest k)."""
        k_max = int(top_k.max())
        best = mx.sort(mx.topk(x, k_max, axis=-1), axis=-1)  # [b, K] ascending
        return mx.take_along_axis(best, mx.array((k_max - top_k).astype(np.int32))[:, None], axis=-1)

    def _add_logprobs(self, out: SampleOutput, raw: mx.array, idx: np.ndarray, rows: "_Rows") -> None:
        """Raw logprobs for the rows that asked, without materialising [B, V] of them."""
        x = rows.take(raw)
        log_z = mx.logsumexp(x, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(x, rows.take(out.token_ids)[:, None], axis=-1) - log_z
        out.logprobs = rows.expand(chosen, 0.0)[:, 0]
        k = min(int(self._num_top[idx].max()), self.vocab_size)
        if k > 0:
            if k < self.vocab_size:
                top_ids = mx.argpartition(-x, kth=k - 1, axis=-1)[:, :k]
            else:
                top_ids = mx.broadcast_to(mx.arange(self.vocab_size), x.shape)
            top_vals = mx.take_along_axis(x, top_ids, axis=-1)
            order = mx.argsort(-top_vals, axis=-1)
            out.top_ids = rows.expand(mx.take_along_axis(top_ids, order, axis=-1).astype(mx.int32), 0)
            out.top_logprobs = rows.expand(mx.take_along_axis(top_vals, order, axis=-1) - log_z, 0.0)


class _Rows:
    """The rows of a batch selected by a host mask, and the two moves between batch and subset."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask
        self.rows = np.flatnonzero(mask)
        self.count = int(self.rows.size)
        self.is_all = self.count == mask.size
        self._index = None if self.is_all else mx.array(self.rows.astype(np.int32))

    def take(self, x: mx.array) -> mx.array:
        """Rows of x (batch order) -> the subset, in row order."""
        return x if self.is_all else x[self._index]

    def expand(self, values: mx.array, fill: float) -> mx.array:
        """Subset values -> batch order; rows outside the subset read `fill`."""
        if self.is_all:
            return values
        where = np.full(self.mask.size, self.count, np.int32)
        where[self.rows] = np.arange(self.count, dtype=np.int32)
        pad = mx.full((1,) + values.shape[1:], fill, dtype=values.dtype)
        return mx.concatenate([values, pad], axis=0)[mx.array(where)]


def _column(values: np.ndarray) -> mx.array:
    return mx.array(np.asarray(values, np.float32))[:, None]


def _maximum(a: Optional[mx.array], b: mx.array) -> mx.array:
    return b if a is None else mx.maximum(a, b)
