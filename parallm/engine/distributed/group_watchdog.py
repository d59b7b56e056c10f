"""GroupWatchdog: turns a dead or hung peer rank into a clear error and a bounded-time exit.

Why it is needed: a collective blocks until every rank joins it. When a peer *dies*, the ring
backend notices the closed socket and raises "[ring] connection to a peer was lost" (we turn that
into GroupFailure). When a peer *hangs* (stopped, deadlocked, network partition without a reset),
nothing raises: the collective would block forever, and the blocked call cannot be interrupted
from Python. So every rank brackets each collective and each step with enter()/leave(), and a
daemon thread fails the group when one has been open longer than `timeout_s`.

After a failure the process exits with EXIT_GROUP_FAILED once `exit_grace_s` has passed: rank 0
keeps serving /health (503, with the reason) for that grace so load balancers and operators see
why; the other ranks use no grace. Exiting is the only safe recovery: the ranks' KV caches and
sampler states can no longer be known to agree, and a blocked collective can't be cancelled.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Optional

log = logging.getLogger("parallm.distributed")

EXIT_GROUP_FAILED = 3


class GroupFailure(RuntimeError):
    """The distributed group can no longer run in lockstep (a peer died, hung, or disagrees)."""


class GroupWatchdog:
    def __init__(self, rank: int, timeout_s: float, exit_grace_s: float = 0.0, *,
                 exit: Callable[[int], None] = os._exit, poll_s: float = 0.2):
        self.rank = rank
        self.timeout_s = timeout_s
        self.exit_grace_s = exit_grace_s
        self._exit = exit
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._open: Optional[tuple[str, float, float]] = None  # (what, since, timeout) of the outermost bracket
        self._depth = 0  # brackets nest: a step holds collectives; the outermost one is timed
        self._failure: Optional[str] = None
        self._failed_at = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.on_fail: Optional[Callable[[str], None]] = None  # called once, on the failing thread

    # ---- called around collectives and steps ---------------------------------------------------
    def enter(self, what: str, timeout_s: Optional[float] = None) -> None:
        """Open a bracket; `timeout_s` overrides the default for it (e.g. the first plan after
        startup, which waits for rank 0 to bring its HTTP server up)."""
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._open = (what, time.monotonic(), timeout_s or self.timeout_s)

    def leave(self) -> None:
        with self._lock:
            self._depth = max(0, self._depth - 1)
            if self._depth == 0:
                self._open = None

    def fail(self, reason: str) -> None:
        with self._lock:
            if self._failure is not None:
                return
            self._failure, self._failed_at = reason, time.monotonic()
        log.error("distributed group failed: %s", reason)
        if self.on_fail is not None:
            try:
                self.on_fail(reason)
            except Exception:  # noqa: BLE001 - the exit below must still happen
                log.exception("on_fail callback failed")

    @property
    def failure(self) -> Optional[str]:
        return self._failure

    # ---- the thread ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="parallm-group-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            now = time.monotonic()
            with self._lock:
                opened = self._open
            if opened is not None and now - opened[1] > opened[2]:
                self.fail(f"rank {self.rank}: no progress for {now - opened[1]:.1f}s while {opened[0]} "
                          f"(timeout {opened[2]:g}s): a peer rank is hung, dead or unreachable")
            if self._failure is not None and now - self._failed_at >= self.exit_grace_s:
                log.critical("rank %d exits with status %d: %s", self.rank, EXIT_GROUP_FAILED, self._failure)
                logging.shutdown()
                self._exit(EXIT_GROUP_FAILED)
                return
