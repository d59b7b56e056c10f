"""OutputCollector: one request's outputs on their way from the engine thread to its consumer.

The engine hands every running request one output per step. A consumer that keeps up takes each
as it comes. One that falls behind (a busy event loop, a slow client) does not find a backlog of
single-token outputs to work through one by one: what arrived since it last looked is merged, per
choice, into one output (text joined, token ids and logprobs extended, the latest finish, usage
and times kept). So a late consumer does one chunk's work per wake-up, whatever the backlog,
without a second task to drain a queue. vLLM's RequestOutputCollector merges the same way.

The outputs are kept as they come and merged when taken, in one pass: merging on arrival would
copy the text and ids so far at every step, quadratic for a client that stops reading a long answer.

Loop-only: put() and get() run on the event loop (the engine thread reaches put() through
loop.call_soon_threadsafe).
"""
from __future__ import annotations

import asyncio
from typing import Optional, Union

from parallm.engine.types import RequestOutput, merge_outputs


class OutputCollector:
    def __init__(self) -> None:
        # choice index -> its output, or its outputs in arrival order once there are several (the
        # usual case is one: no list made)
        self._pending: dict[int, Union[RequestOutput, list[RequestOutput]]] = {}
        self._error: Optional[BaseException] = None
        self._ready = asyncio.Event()
        # True once get() has handed over the request's closing output or raised its error: the
        # stream ended on the engine's side, so a consumer leaving after that need not abort it
        self.closed = False

    def put(self, item: Union[RequestOutput, BaseException]) -> None:
        if isinstance(item, BaseException):
            self._error = item
        else:
            waiting = self._pending.get(item.index)
            if waiting is None:
                self._pending[item.index] = item
            elif isinstance(waiting, list):
                waiting.append(item)
            else:
                self._pending[item.index] = [waiting, item]
        self._ready.set()

    async def get(self) -> list[RequestOutput]:
        """What arrived since the last get(), one merged output per choice; waits if nothing did.
        An error is raised once the outputs that came before it have been taken."""
        while not self._pending and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        if self._pending:
            taken = [merge_outputs(w) if isinstance(w, list) else w for w in self._pending.values()]
            self._pending.clear()
            if len(taken) > 1:  # the output that closes the request (finished=True) stays last
                taken.sort(key=lambda output: output.finished)
            self.closed = taken[-1].finished
            return taken
        self.closed = True
        raise self._error
