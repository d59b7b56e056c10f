"""StepPhases: where the engine's step time goes (EngineStats.phase_seconds, /metrics).

Phases (types.STEP_PHASES): `schedule` (the scheduler), `build` (the step's graph, Python),
`dispatch` (inside mx.async_eval: MLX queuing the step's kernels), `wait` (reading results back),
`update` (outputs: detokenizing, stops). The runner counts its own dispatch and hand-over time;
a launch's build is what is left of it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from parallm.engine.types import STEP_PHASES


class StepPhases:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(STEP_PHASES, 0.0)
        self.busy_seconds = 0.0

    @contextmanager
    def step(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.busy_seconds += time.perf_counter() - started

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    @contextmanager
    def launch(self, runner) -> Iterator[None]:
        """A runner launch: its time, less the runner's dispatch (its cumulative
        `dispatch_seconds`), is `build`."""
        dispatched = runner.dispatch_seconds
        started = time.perf_counter()
        try:
            yield
        finally:
            dispatch = runner.dispatch_seconds - dispatched
            self.seconds["dispatch"] += dispatch
            self.seconds["build"] += time.perf_counter() - started - dispatch
