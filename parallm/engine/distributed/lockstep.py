"""Tensor-parallel serving: every rank runs the same engine steps in lockstep on its model shard.

Roles
- Rank 0 (LeaderEngine): the whole Engine (scheduler, requests, detokenizer, stop strings) plus a
  LeaderRunner that, before each step's forward passes, broadcasts the StepPlan (the
  SchedulerOutput, seeds, prefix-cache touches) through PlanChannel, then runs the passes itself.
- Ranks > 0 (Follower): an Engine whose scheduler stays unused; `run()` receives each plan and
  calls the same ModelRunner.launch(sched)/complete(...) in the Engine's order. The sharded layers'
  all-reduces inside the forward pair up because every rank runs the same passes with the same
  shapes in the same order.
- Collective order on every rank: plan(t), step t's all-reduces, plan(t+1), ... Only launch()
  issues collectives; complete() only reads results back, so the followers may complete each step
  at once while rank 0's Engine completes steps in whatever order it likes (overlap, build-ahead).
  Rank 0's plan broadcast queues behind step t's work on the same stream, so in distributed mode
  the Engine's overlap (scheduling t+1 while t computes) buys little.

Why sampling agrees on every rank
- Logits: mlx-lm's shard() splits q/k/v/gate/up by output and o/down by input with an all_sum
  after; the all-reduce result is the same bits on every rank and the embedding/LM head are
  replicated, so every rank holds identical logits.
- Randomness: the sampler's noise is a counter-based hash of (row seed, row step, vocab id), no
  global RNG. Rank 0 gives every admitted row an explicit seed (a request without one gets a random
  seed drawn on rank 0) and ships it in the plan, so no rank ever draws its own.
- Checked, not assumed: every `verify_every` steps rank 0 sends, in a later plan, a digest of the
  tokens it sampled in that step and of its prefix-cache state; every other rank compares it with
  its own and fails (reporting why over the liveness link) on any difference.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from parallm.engine.engine import Engine, EngineConfig, StepResult
from parallm.engine.distributed.group_watchdog import GroupFailure, GroupWatchdog
from parallm.engine.distributed.plan_channel import PlanChannel, digest
from parallm.engine.prefix_cache import PrefixCache
from parallm.engine.scheduler import RunnerOutput, SchedulerOutput
from parallm.engine.distributed.step_plan import PlanKind, StepPlan

log = logging.getLogger("parallm.distributed")

STARTUP_WAIT_S = 300.0  # how long the other ranks wait for rank 0's first plan (its HTTP startup)
STARTUP_PARTS = ("model config", "weights", "engine settings", "parallm plan format", "adapters")


class RecordingPrefixCache(PrefixCache):
    """A PrefixCache whose LRU order can be replayed on another rank.

    The LRU order changes on `match` (scheduler, rank 0 only) and on `store` (runner, every rank).
    Entry ids are handed out in store order, which is the same on every rank, so rank 0 records
    which entry each match touched and the other ranks `touch` the same ids before the step:
    then every rank evicts the same entries and `load` finds on every rank what rank 0 matched."""

    def __init__(self, budget_bytes: int, block_size: int = 16, exact: bool = False):
        super().__init__(budget_bytes, block_size, exact)
        self._touches: list[int] = []

    def match(self, token_ids, adapter, max_tokens) -> int:
        entry, n, entry_id = self._find(token_ids, adapter, max_tokens)
        if entry_id is not None:
            self._entries.move_to_end(entry_id)
            self._touches.append(entry_id)
        return n

    def take_touches(self) -> list[int]:
        touches, self._touches = self._touches, []
        return touches

    def touch(self, entry_id: int) -> None:
        if entry_id not in self._entries:
            raise GroupFailure(f"prefix cache diverged: rank 0 touched entry {entry_id}, absent here")
        self._entries.move_to_end(entry_id)

    def state_digest(self) -> tuple:
        return (tuple(self._entries), self.nbytes)


def use_recording_prefix_cache(engine: Engine) -> Optional[RecordingPrefixCache]:
    """Swap the engine's (still empty) prefix cache for a RecordingPrefixCache everywhere it is held."""
    old = engine.prefix_cache
    if old is None:
        return None
    if old.nbytes:
        raise RuntimeError("swap the prefix cache before the engine has stored anything")
    new = RecordingPrefixCache(old.budget_bytes, old.block_size, old.exact)
    engine.prefix_cache = new
    engine.scheduler.prefix_index = new
    engine.runner.prefix_cache = new
    return new


def _rank_state(prefix: Optional[RecordingPrefixCache], adapters: Any) -> object:
    """What the verify check compares besides the sampled tokens: the prefix cache and the
    adapters every rank holds (name, key, slot)."""
    applied = adapters.applied_state() if adapters is not None and hasattr(adapters, "applied_state") else ()
    return (_prefix_state(prefix), applied)


def _step_digest(step: int, out: RunnerOutput, prefix_state: object) -> bytes:
    tokens = sorted((seq_id, s.token_id) for seq_id, s in out.sampled.items())
    return digest(step, tokens, prefix_state)


@dataclass
class _LaunchedPlan:
    """What LeaderRunner.launch hands the Engine: the runner's launched step and its plan."""

    plan: StepPlan
    launched: Any
    prefix_state: object  # the prefix cache right after this launch (what the check compares)


class LeaderRunner:
    """Wraps rank 0's ModelRunner: broadcast the plan, then launch it like every other rank.

    The Engine calls launch(sched) and, for the same step, complete(launched) later, in an order of
    its choosing (overlap, build-ahead). Only launch issues collectives (the plan, the forward's
    all-reduces), so that order does not matter to the other ranks. complete() of a `verify` step
    files rank 0's digest, and the next plan carries it. Every other attribute (cache, sampler,
    ...) is the wrapped runner's."""

    def __init__(self, inner: Any, channel: PlanChannel, prefix: Optional[RecordingPrefixCache],
                 watchdog: Optional[GroupWatchdog], verify_every: int, adapters: Any = None):
        self._inner = inner
        self._adapters = adapters  # AdapterManager (apply_on_bind off): its ops travel in the plan
        self._channel = channel
        self._prefix = prefix
        self._watchdog = watchdog
        self._verify_every = verify_every
        self._checks: dict[int, bytes] = {}  # digests of completed verify steps, for the next plan
        self.plan_index = 0
        self.last_sent = time.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def run(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.complete(self.launch(sched))

    def launch(self, sched: SchedulerOutput) -> _LaunchedPlan:
        _seed_new_rows(sched)
        verify = self._verify_every > 0 and self.plan_index % self._verify_every == 0
        ops = self._adapters.take_pending() if self._adapters is not None else []
        plan = StepPlan(PlanKind.STEP, self.plan_index, sched,
                        self._prefix.take_touches() if self._prefix else [], verify,
                        adapter_ops=self._adapters.wire_ops(ops) if ops else [])
        with self._fatal(f"step {plan.step}"):
            self._send(plan)
            if ops:  # the same ops, at the same step, as every other rank (Follower.run)
                self._adapters.apply_ops(ops)
            launched = self._inner.launch(sched)
            return _LaunchedPlan(plan, launched, _rank_state(self._prefix, self._adapters) if verify else None)

    def complete(self, step: _LaunchedPlan) -> RunnerOutput:
        with self._fatal(f"completing step {step.plan.step}"):
            out = self._inner.complete(step.launched)
        if step.plan.verify:
            self._checks[step.plan.step] = _step_digest(step.plan.step, out, step.prefix_state)
        return out

    def send_control(self, kind: PlanKind, idle_sleep_s: float = 0.0) -> None:
        self._send(StepPlan(kind, self.plan_index, idle_sleep_s=idle_sleep_s))

    def _send(self, plan: StepPlan) -> None:
        plan.checks, self._checks = self._checks, {}
        self._channel.send_plan(plan)
        self.plan_index += 1
        self.last_sent = time.monotonic()

    @contextmanager
    def _fatal(self, what: str):
        """Watch `what`; any error in it leaves the ranks out of lockstep: the group must stop."""
        if self._watchdog:
            self._watchdog.enter(what)
        try:
            yield
        except BaseException as e:
            if self._watchdog:
                self._watchdog.fail(f"rank 0 failed in {what}: {type(e).__name__}: {e}")
            raise
        finally:
            if self._watchdog:
                self._watchdog.leave()


def _prefix_state(prefix: Optional[RecordingPrefixCache]) -> object:
    return prefix.state_digest() if prefix is not None else None


def _seed_new_rows(sched: SchedulerOutput) -> None:
    """Give every admitted row an explicit seed so no rank draws its own (see module docstring)."""
    for row in sched.new_rows:
        if row.params.seed is None:
            row.params = dataclasses.replace(row.params, seed=secrets.randbits(63))


FOLLOWER_SLEEP_FRACTION = 0.8


class LeaderEngine(Engine):
    """Rank 0's Engine. While idle it sends a heartbeat plan every `heartbeat_s`, so the other ranks
    can tell an idle rank 0 from a dead one (their watchdog times out otherwise).

    Idle without spinning: a rank waiting inside a ring collective polls its sockets (measured:
    10-35% of a core), so a heartbeat tells the other ranks to *sleep* 80% of the interval before
    waiting for the next plan. The price: the first step after an idle spell may wait up to that
    sleep (80 ms at the default 0.1 s) for the other ranks to come back; busy steps never do."""

    def __init__(self, loaded: Any, config: EngineConfig, *, channel: PlanChannel,
                 watchdog: Optional[GroupWatchdog] = None, heartbeat_s: float = 0.1,
                 verify_every: int = 32, adapters: Any = None):
        super().__init__(loaded, config, adapters=adapters)
        self.recording_prefix = use_recording_prefix_cache(self)
        if adapters is not None:
            adapters.apply_pending()  # startup adapters: every rank installed its own already
            adapters.apply_on_bind = False  # from now on the LeaderRunner ships and applies the ops
        self.runner = LeaderRunner(self.runner, channel, self.recording_prefix, watchdog, verify_every,
                                   adapters)
        self.heartbeat_s = heartbeat_s
        self.channel = channel

    def _heartbeat_due(self) -> bool:
        return time.monotonic() - self.runner.last_sent >= self.heartbeat_s

    def has_unfinished(self) -> bool:
        return super().has_unfinished() or self._heartbeat_due()

    def step(self) -> StepResult:
        if not super().has_unfinished():
            self.runner.send_control(PlanKind.HEARTBEAT, self.heartbeat_s * FOLLOWER_SLEEP_FRACTION)
            return StepResult()
        return super().step()

    def shutdown_followers(self) -> None:
        """Tell the other ranks to exit 0. Call once, after the last step, from any one thread."""
        self.runner.send_control(PlanKind.SHUTDOWN)


class Follower:
    """A rank > 0: receive plans from rank 0 and run them on this rank's shard until SHUTDOWN."""

    def __init__(self, engine: Engine, channel: PlanChannel, watchdog: Optional[GroupWatchdog] = None):
        self.engine = engine
        self.channel = channel
        self.watchdog = watchdog
        self.prefix = use_recording_prefix_cache(engine)
        self.steps_run = 0
        self.steps_verified = 0

    def run(self) -> None:
        """Returns on SHUTDOWN; raises GroupFailure when the group breaks or diverges.

        Each step is launched and completed at once: completes issue no collectives, so this
        rank need not mirror the order in which rank 0's Engine completes its steps."""
        expected = 0
        own_checks: dict[int, bytes] = {}  # this rank's digests of verify steps, until compared
        runner = self.engine.runner
        while True:
            # Plan 0 comes once rank 0's HTTP server is up: allow for a slow start.
            plan = self.channel.receive_plan(max(STARTUP_WAIT_S, self.watchdog.timeout_s if self.watchdog else 0)
                                             if expected == 0 else None)
            if plan.step != expected:
                raise GroupFailure(f"rank {self.channel.rank}: expected plan {expected}, got {plan.step}")
            expected += 1
            for step, theirs in sorted(plan.checks.items()):
                if own_checks.pop(step, None) != theirs:
                    raise GroupFailure(f"rank {self.channel.rank} diverged from rank 0 at step {step}: the "
                                       "sampled tokens or the prefix-cache state differ")
                self.steps_verified += 1
            if plan.kind is PlanKind.SHUTDOWN:
                return
            if plan.kind is PlanKind.HEARTBEAT:
                time.sleep(plan.idle_sleep_s)  # outside any watchdog bracket: sleeping is not hanging
                continue
            if self.watchdog:
                self.watchdog.enter(f"step {plan.step}")
            try:
                for entry_id in plan.prefix_touches:
                    self.prefix.touch(entry_id)
                if plan.adapter_ops:
                    self._apply_adapter_ops(plan)
                launched = runner.launch(plan.sched)
                state = _rank_state(self.prefix, self.engine.adapters) if plan.verify else None
                out = runner.complete(launched)
                if plan.verify:
                    own_checks[plan.step] = _step_digest(plan.step, out, state)
            finally:
                if self.watchdog:
                    self.watchdog.leave()
            self.steps_run += 1


    def _apply_adapter_ops(self, plan: StepPlan) -> None:
        adapters = self.engine.adapters
        if adapters is None:
            raise GroupFailure(f"rank {self.channel.rank}: rank 0 loads adapters but this rank has no adapter "
                               "manager")
        try:
            adapters.apply_remote(plan.adapter_ops)
        except Exception as e:  # noqa: BLE001 - e.g. the files are missing on this host
            raise GroupFailure(f"rank {self.channel.rank} cannot apply rank 0's adapter change at step "
                               f"{plan.step}: {getattr(e, 'message', e)} (every host needs the adapter "
                               "files at the same path)") from None


# ---- startup ------------------------------------------------------------------------------------
def adapters_digest(adapters: Any) -> bytes:
    """Digest of the startup adapters (name, key, slot, rank, scale and a sample of every tensor,
    as read, before slicing): every rank must serve the same ones at the same slots."""
    if adapters is None:
        return digest([])
    items = []
    for name, key, slot, weights in adapters.fingerprint_items():
        sums = [mx.sum(t.reshape(-1)[:4096].astype(mx.float32))
                for lw in weights.layers.values() for t in (lw.a, lw.b)]
        mx.eval(sums)
        items.append((name, key, slot, weights.config.rank, weights.config.scale,
                      sorted(weights.layers), [round(float(x.item()), 3) for x in sums]))
    return digest(items)


def startup_digests(model: Any, model_config: dict, engine_config: EngineConfig) -> list[bytes]:
    """Digests (one per STARTUP_PARTS entry) of what every rank must agree on, taken BEFORE
    sharding so that every rank hashes the full model: the config, every weight's name, shape and
    dtype plus a sample of its values (a different checkpoint of the same shape is caught), and
    the engine settings (slots, budgets: the plans index them)."""
    params = tree_flatten(model.parameters())
    samples = [mx.sum(p.reshape(-1)[:4096].astype(mx.float32)) for _, p in params]
    mx.eval(samples)
    weights = [(name, tuple(p.shape), str(p.dtype), round(float(s.item()), 3))
               for (name, p), s in zip(params, samples)]
    config = sorted((k, repr(v)) for k, v in (model_config or {}).items())
    plan_format = [f.name for f in dataclasses.fields(StepPlan)] + [f.name for f in dataclasses.fields(SchedulerOutput)]
    return [digest(config), digest(weights), digest(dataclasses.asdict(engine_config)), digest(plan_format)]


def check_shardable(model: Any, model_config: dict, size: int) -> None:
    """Raise ValueError naming what does not divide across `size` ranks."""
    if not callable(getattr(model, "shard", None)):
        raise ValueError(f"model type {model_config.get('model_type', type(model).__name__)!r} has no "
                         "shard() in mlx-lm, so it cannot be split across ranks (tensor parallel)")
    bad = [f"{k}={model_config[k]}" for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")
           if isinstance(model_config.get(k), int) and model_config[k] % size]
    if bad:
        raise ValueError(f"cannot shard the model across {size} ranks: {', '.join(bad)} must be divisible "
                         f"by {size}; use a rank count that divides them")


def shard_model(model: Any, model_config: dict, group: "mx.distributed.Group") -> None:
    check_shardable(model, model_config, group.size())
    model.shard(group)
    mx.eval(model.parameters())
