"""OutputCollector: one request's outputs on their way from the engine thread to its consumer.

The engine hands every running request one output per step. A consumer that keeps up takes each
as it comes. One that falls behind (a busy event loop, a slow client) does not find a backlog of
single-token outputs to work through one by one: what arrived since it last looked is merged, per
choice, into one output (text joined, token ids and logprobs extended, the latest finish, usage
and times kept). So a late consumer does one chunk's work per wake-up, whatever the backlog,
without a second task to drain a queue. vLLM's RequestOutputCollector merges the same way.

Loop-only: put() and get() run on the event loop (the engine thread reaches put() through
loop.call_soon_threadsafe).
"""
from __future__ import annotations

import asyncio
from typing import Optional, Union

from parallm.engine.types import RequestOutput


def merge_output(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """`earlier` followed by `later` (the same choice) as one output. Neither input is changed."""
    return RequestOutput(
        request_id=earlier.request_id, index=earlier.index, text=earlier.text + later.text,
        token_ids=earlier.token_ids + later.token_ids,
        logprobs=(earlier.logprobs or []) + later.logprobs if later.logprobs else earlier.logprobs,
        finish_reason=later.finish_reason or earlier.finish_reason,
        stop_reason=later.stop_reason or earlier.stop_reason,
        finished=earlier.finished or later.finished, usage=later.usage or earlier.usage,
        times=later.times or earlier.times)


class OutputCollector:
    def __init__(self) -> None:
        self._pending: dict[int, RequestOutput] = {}  # choice index -> merged, in arrival order
        self._error: Optional[BaseException] = None
        self._ready = asyncio.Event()

    def put(self, item: Union[RequestOutput, BaseException]) -> None:
        if isinstance(item, BaseException):
            self._error = item
        else:
            earlier = self._pending.get(item.index)
            self._pending[item.index] = item if earlier is None else merge_output(earlier, item)
        self._ready.set()

    async def get(self) -> list[RequestOutput]:
        """What arrived since the last get(), one merged output per choice; waits if nothing did.
        An error is raised once the outputs that came before it have been taken."""
        while not self._pending and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        if self._pending:
            taken = list(self._pending.values())
            self._pending.clear()
            # the output that closes the request (finished=True) stays last, whichever choice it is
            taken.sort(key=lambda output: output.finished)
            return taken
        raise self._error
