"""Engine: the synchronous core. It owns the model; `step()` is schedule -> run -> update.

Everything else (adding requests, aborts, adapter swaps) happens between steps, on the thread
that calls step(). AsyncEngine wraps this for asyncio.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from parallm.engine.errors import InvalidRequest, PromptTooLong, UnknownModel
from parallm.engine.kv_budget import default_kv_budget_bytes
from parallm.models.cache_layout import probe_cache_layout
from parallm.engine.model_runner import LaunchedStep, ModelRunner
from parallm.engine.output_processor import OutputProcessor
from parallm.engine.pass_shapes import PassShapes
from parallm.engine.prefix_cache import PrefixCache
from parallm.engine.sampler import BatchSampler
from parallm.engine.scheduler import RunnerOutput, Scheduler, SchedulerConfig, SchedulerOutput, Sequence
from parallm.engine.step_phases import StepPhases
from parallm.engine.types import EngineRequest, EngineStats, RequestOutput
from parallm.models.batching_fixes import fix_for_batching
from parallm.models.materialize import materialize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # rows decoding together (slots)
    # tokens per step; bounds a step's latency (chunked prefill). None = by device
    # (pass_shapes.PassShapes.step_tokens: 2048 on CUDA, 512 elsewhere)
    max_num_batched_tokens: Optional[int] = None
    # KV of all running sequences; beyond it the newest is preempted. None: by device (kv_budget.py:
    # half the GPU memory the model leaves free, 2 GiB on the CPU)
    kv_budget_bytes: Optional[int] = None
    prefix_cache_bytes: int = 256 << 20  # 0 turns the prefix cache off
    prefix_block_size: int = 16
    max_queue: int = 1024  # waiting requests before QueueFull (AsyncEngine)
    overlap: bool = True  # process step t's outputs while step t+1 runs on the device
    # Building step t+1's graph before step t has finished makes MLX copy every K/V buffer that
    # step t+1 writes (the pending step still references it, so it cannot be updated in place).
    # Above this many KV bytes the engine waits for step t first. None = by device: 6 GiB on a GPU
    # (the copy costs ~2x the KV bytes of bandwidth per step, the gap a fixed time),
    # 32 MiB on the CPU, where copies are slow.
    build_ahead_max_kv_bytes: Optional[int] = None
    # CUDA: decode rows write K/V in place and attend with parallm's kernels (decode_attention.py)
    # instead of a scatter and a masked attention; ignored where the kernels do not apply
    decode_kernels: bool = True
    # Run a few throw-away requests before taking real ones (warm_up.py), so that one-off compile
    # and allocation costs do not land on the first clients. None = by device: on a GPU only (the
    # CPU backend has no such costs worth a start-up delay).
    warm_up: Optional[bool] = None


@dataclass
class StepResult:
    outputs: list[RequestOutput] = field(default_factory=list)
    num_batched_tokens: int = 0


class Engine:
    def __init__(self, loaded: Any, config: EngineConfig = EngineConfig(), *, sampler: Any = None,
                 adapters: Any = None):
        """`loaded` is LoadedModel-like: .model, .tokenizer, .context_length, .name."""
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.adapters = adapters
        fixes = fix_for_batching(loaded.model)
        self.cache_layout = probe_cache_layout(loaded.model)
        # What this model runs with, for logs and /v1/models.
        self.notes = [self.cache_layout.describe()] + fixes
        budget_bytes = config.kv_budget_bytes
        if budget_bytes is None:
            budget_bytes = default_kv_budget_bytes()
        budget_tokens = _budget_tokens(budget_bytes, self.cache_layout, config.max_num_seqs,
                                       loaded.context_length)
        shapes = PassShapes.for_device()  # one policy for the step budget and the runner's passes
        self.max_num_batched_tokens = config.max_num_batched_tokens or shapes.step_tokens
        # Rings and recurrent state keep no earlier positions: such a model's prefix cache holds
        # exact-length entries only, and its n > 1 choices prefill their prompt each.
        self.shares_prompt_rows = not (self.cache_layout.has_state or self.cache_layout.has_windows)
        exact = not self.shares_prompt_rows
        self.prefix_cache = (PrefixCache(config.prefix_cache_bytes, config.prefix_block_size, exact=exact)
                             if config.prefix_cache_bytes > 0 else None)
        if exact:
            self.notes.append("sliding-window or recurrent-state layers keep no earlier positions: a prefix-cache "
                              "hit must match a stored prompt's last full block exactly, and n > 1 choices "
                              "prefill their prompt each")
        log.info("%s: %s", getattr(loaded, "name", "model"), "; ".join(self.notes))
        if isinstance(getattr(loaded, "notes", None), list):  # shown in /v1/models and `parallm info`
            loaded.notes.extend(self.notes)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, self.max_num_batched_tokens, budget_tokens,
                            align_prefill_to=config.prefix_block_size if exact and self.prefix_cache else 0),
            self.prefix_cache)
        if sampler is None:
            sampler = BatchSampler(config.max_num_seqs, _vocab_size(loaded))
        self.runner = ModelRunner(loaded.model, self.cache_layout, config.max_num_seqs, sampler,
                                  prefix_cache=self.prefix_cache, adapters=adapters, shapes=shapes,
                                  decode_kernels=config.decode_kernels,
                                  pass_tokens=self.max_num_batched_tokens)
        release = adapters.release if adapters is not None and hasattr(adapters, "release") else None
        self.outputs = OutputProcessor(self.tokenizer, set(getattr(self.tokenizer, "eos_token_ids", None) or []),
                                       self.scheduler.finish, release)
        self.phases = StepPhases()
        self._steps = 0
        self._decode_rows = 0
        self._batched_tokens = 0
        self._prefill_steps = 0
        self._in_flight: Optional[tuple[SchedulerOutput, LaunchedStep]] = None
        self._build_ahead_limit = config.build_ahead_max_kv_bytes
        if self._build_ahead_limit is None:
            import mlx.core as mx

            self._build_ahead_limit = (6 << 30) if mx.default_device() == mx.gpu else 32 << 20
        # The probes above ran the model on this thread; whatever it cached lazily must not reach
        # the worker thread unevaluated.
        materialize(loaded.model)

    # ---- requests ----------------------------------------------------------------------------
    def validate(self, req: EngineRequest) -> None:
        p = req.sampling
        if not req.prompt_token_ids:
            raise InvalidRequest("The prompt is empty; send at least one token.", param="prompt")
        if p.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {p.max_tokens}.", param="max_tokens")
        if not 1 <= p.n <= self.config.max_num_seqs:
            raise InvalidRequest(f"n must be between 1 and {self.config.max_num_seqs}, got {p.n}.", param="n")
        total = len(req.prompt_token_ids) + p.max_tokens
        if total > self.loaded.context_length:
            raise PromptTooLong(len(req.prompt_token_ids), p.max_tokens, self.loaded.context_length)
        if total > self.scheduler.config.kv_budget_tokens:
            raise PromptTooLong(len(req.prompt_token_ids), p.max_tokens, self.scheduler.config.kv_budget_tokens)
        if req.adapter is not None:
            if self.adapters is None or not self.adapters.has_adapter(req.adapter):
                known = list(self.adapters.names()) if hasattr(self.adapters, "names") else []
                raise UnknownModel(req.adapter, known)
        check = getattr(self.runner.sampler, "validate_params", None) or self.runner.sampler._validate
        try:
            check(p)
        except ValueError as e:
            raise InvalidRequest(f"Invalid sampling parameters: {e}.") from None
        if req.request_id in self.outputs:
            raise InvalidRequest(f"request_id {req.request_id!r} is already running.", param="request_id")

    def add_request(self, req: EngineRequest) -> None:
        """Queue a validated request (call validate() first)."""
        p = req.sampling
        adapter_key = req.adapter
        if req.adapter is not None and hasattr(self.adapters, "acquire"):
            # Held until the request's last choice closes (finish or abort): an unload meanwhile
            # only stops new requests (AdapterManager's reference count). The key is unique per
            # load, so the prefix cache never mixes K/V of two adapters loaded under one name.
            adapter_key = self.adapters.acquire(req.adapter) or req.adapter
        seqs = []
        for i in range(p.n):
            leader = seqs[0] if seqs and self.shares_prompt_rows else None
            seq = Sequence(f"{req.request_id}/{i}", req.request_id, i, list(req.prompt_token_ids), p,
                           adapter_key, leader=leader)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.outputs.add(req, seqs)

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Free the request's rows (the runner frees them at the next step). Returns the final
        outputs (finish_reason "abort") for choices that had not finished."""
        if request_id not in self.outputs:
            return []
        self.scheduler.abort_request(request_id)
        return self.outputs.abort(request_id)

    def is_running(self, request_id: str) -> bool:
        return request_id in self.outputs

    def has_unfinished(self) -> bool:
        return bool(len(self.outputs)) or self.scheduler.has_work() or self._in_flight is not None

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> StepResult:
        """schedule -> run -> update (with `overlap`, the pipelined variant below)."""
        if self.config.overlap:
            return self._pipelined_step()
        with self.phases.step():
            scheduled = self._schedule()
            result = self._run(scheduled)
            outputs = self._update(scheduled, result)
        return StepResult(outputs, scheduled.num_batched_tokens)

    def _pipelined_step(self) -> StepResult:
        """Step t+1 is scheduled and launched on the device before step t's results are read and
        turned into outputs, so the host's update of step t overlaps the device's step t+1."""
        with self.phases.step():
            previous, self._in_flight = self._in_flight, None
            early = None
            if previous is not None and self.runner.cache.nbytes > self._build_ahead_limit:
                # Building on a step still in flight makes MLX copy every K/V buffer it writes:
                # past the limit, wait for it first so they update in place.
                early = self._complete(previous[1])
            scheduled = self._schedule()
            launched = self._launch(scheduled)
            outputs = []
            if previous is not None:
                outputs = self._update(previous[0], early or self._complete(previous[1]))
            if scheduled.is_empty:
                outputs += self._update(scheduled, self._complete(launched))
            else:
                self._in_flight = (scheduled, launched)
        return StepResult(outputs, scheduled.num_batched_tokens)

    def _schedule(self) -> SchedulerOutput:
        with self.phases.phase("schedule"):
            scheduled = self.scheduler.schedule()
        self._steps += 1
        self._decode_rows += len(scheduled.decode)
        self._batched_tokens += scheduled.num_batched_tokens
        self._prefill_steps += bool(scheduled.prefill)
        return scheduled

    def _run(self, scheduled: SchedulerOutput) -> RunnerOutput:
        return self._complete(self._launch(scheduled))

    def _launch(self, scheduled: SchedulerOutput) -> LaunchedStep:
        with self.phases.launch(self.runner):
            return self.runner.launch(scheduled)

    def _complete(self, launched: LaunchedStep) -> RunnerOutput:
        with self.phases.phase("wait"):
            return self.runner.complete(launched)

    def _update(self, scheduled: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        with self.phases.phase("update"):
            return self.outputs.process(scheduled, self.scheduler.update(scheduled, result))

    def reset_after_warm_up(self) -> None:
        """Forget what warm-up requests left: prefix-cache entries and counters."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        s = self.scheduler
        s.prefix_queries = s.prefix_hits = s.num_preemptions = 0
        self._steps = self._decode_rows = self._batched_tokens = self._prefill_steps = 0
        self.phases.reset()

    def wants_warm_up(self) -> bool:
        if self.config.warm_up is not None:
            return self.config.warm_up
        import mlx.core as mx

        return mx.default_device() == mx.gpu

    # ---- introspection -----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.scheduler
        per_token = self.cache_layout.bytes_per_token
        budget = s.config.kv_budget_tokens * per_token
        used = s.kv_tokens_used() * per_token
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting),
            kv_cache_usage=used / budget if budget else 0.0, kv_bytes_used=used, kv_bytes_budget=budget,
            prefix_cache_queries=s.prefix_queries, prefix_cache_hits=s.prefix_hits,
            num_preemptions=s.num_preemptions, steps=self._steps, busy_seconds=self.phases.busy_seconds,
            decode_rows=self._decode_rows, batched_tokens=self._batched_tokens,
            prefill_steps=self._prefill_steps, phase_seconds=dict(self.phases.seconds))

    def kv_bytes_allocated(self) -> int:
        """Bytes the slot buffers hold right now (0 when idle)."""
        return self.runner.cache.nbytes


def _budget_tokens(budget_bytes: int, layout, max_num_seqs: int, context_length: int) -> int:
    """KV positions all running sequences may hold together. Recurrent state is a fixed cost per
    row, taken off the top; a model with no attention at all is bounded by its context only."""
    left = budget_bytes - max_num_seqs * layout.state_bytes_per_sequence
    if layout.bytes_per_token == 0:
        return max_num_seqs * context_length
    return max(0, left) // layout.bytes_per_token


def _vocab_size(loaded: Any) -> int:
    cfg = getattr(loaded, "config", None) or {}
    if isinstance(cfg, dict) and cfg.get("vocab_size"):
        return int(cfg["vocab_size"])
    return int(loaded.model.args.vocab_size)
