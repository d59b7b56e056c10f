"""StepPlan: what rank 0 tells the other ranks before each engine step (tensor-parallel serving).

Rank 0 owns the scheduler. Every other rank owns only a model shard, a KV cache of its shard's
heads, a sampler and a prefix cache, and must run *exactly* the forward passes and sampler calls
rank 0 runs, in the same order, so that the sharded model's all-reduces pair up and every rank
samples the same tokens. A plan carries everything a rank needs for that:

- `sched`: the SchedulerOutput itself (freed slots, admitted rows with their prompt ids, sampling
  params and seeds, prefill chunks, decode rows). Aborts and finishes reach the ranks as freed
  slots; preemptions as freed slots plus a later re-admission.
- `prefix_touches`: the prefix-cache entries the scheduler's lookups moved to the LRU end this step
  (see RecordingPrefixCache), so that every rank's prefix cache evicts the same entries.
- `adapter_ops`: the LoRA adapter installs/uninstalls (AdapterOp: slot, key, path) rank 0's
  AdapterManager queued since the last step plan; every rank applies them, in order, before this
  step's forward, so all ranks hold the same adapters at the same slots at every step (the
  sharded-to-all adapter layers all-reduce only when a bound row uses them: a rank that
  disagreed would misalign the collectives). Rows name their adapter in `sched` (NewRow.adapter).
- `verify` / `checks`: rank 0 marks some steps `verify`; once it has completed such a step, the
  next plan carries rank 0's digest of it (what it sampled, its prefix-cache state) in `checks`,
  and every other rank compares it with its own digest of the same step. No collective is involved,
  so the check cannot misalign the ranks' collectives whatever order the Engine completes steps in.

Plans are pickled: the ranks are one trusted job started together by mlx.launch from the same code
(the startup check compares a hash of model, config and engine settings). Never expose the ring's
ports to untrusted networks.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from parallm.engine.scheduler import SchedulerOutput


class PlanKind(str, Enum):
    STEP = "step"  # run `sched`
    HEARTBEAT = "heartbeat"  # nothing to run; proves rank 0 is alive while the engine is idle
    SHUTDOWN = "shutdown"  # rank 0 is exiting cleanly: leave the follow loop and exit 0


@dataclass
class StepPlan:
    kind: PlanKind
    step: int  # rank 0's plan counter; every rank checks it arrives in order
    sched: Optional[SchedulerOutput] = None  # set for STEP plans only
    prefix_touches: list[int] = field(default_factory=list)  # prefix-cache entry ids, in lookup order
    verify: bool = False  # the ranks will compare digests of this step (in a later plan's checks)
    checks: dict[int, bytes] = field(default_factory=dict)  # step -> rank 0's digest of that step
    idle_sleep_s: float = 0.0  # HEARTBEAT: sleep this long before waiting for the next plan
    adapter_ops: list = field(default_factory=list)  # STEP: AdapterOps to apply before the forward

    def encode(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def decode(data: bytes) -> "StepPlan":
        plan = pickle.loads(data)
        if not isinstance(plan, StepPlan):
            raise TypeError(f"expected a StepPlan from rank 0, got {type(plan).__name__}")
        return plan
