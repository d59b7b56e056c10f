"""Admission: how many engine requests the server lets in, and whether it is draining.

The bound is the engine's rows plus its waiting queue. A request past it gets 429 at once (with
Retry-After) instead of a connection that hangs or is reset. One Admission per app (app.state).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from parallm.engine.errors import EngineDraining, InvalidRequest, QueueFull


@dataclass
class Admission:
    max_in_flight: int  # engine requests admitted at once
    max_queue: int  # the waiting part of it, for the 429 message
    retry_after: float = 1.0
    in_flight: int = 0
    draining: bool = False
    rejected: int = 0  # 429s given, for /health (counted where the answer is made: server/error_responses.py)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self):
        self._idle.set()

    def check_size(self, count: int) -> None:
        """One HTTP request needing more engine requests (one per prompt) than are ever admitted at
        once can never get in: a 400 that says so, not a 429 that invites retrying forever."""
        if count > self.max_in_flight:
            raise InvalidRequest(
                f"This request holds {count} prompts, more than the server ever admits at once ({self.max_in_flight}: "
                "--max-num-seqs plus --max-queue); send them in smaller requests.", param="prompt")

    def acquire(self, count: int = 1) -> "Ticket":
        """Admit `count` engine requests or raise QueueFull / EngineDraining (InvalidRequest if it
        could never fit). Never waits."""
        if self.draining:
            raise EngineDraining()
        self.check_size(count)
        if self.in_flight + count > self.max_in_flight:
            raise QueueFull(self.max_queue, retry_after=self.retry_after)
        self.in_flight += count
        self._idle.clear()
        return Ticket(self, count)

    def _release(self, count: int) -> None:
        self.in_flight -= count
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True when nothing is in flight within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


@dataclass
class Ticket:
    """Held while a response is being produced; release() is idempotent."""

    admission: Admission
    count: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._release(self.count)
