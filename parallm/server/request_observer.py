"""observe_stream: reports a request's stream to metrics and the access log as it goes by.

OpenAIServing passes every engine stream through it: it stamps when each token arrived, and on
the final output (the one with `finished=True`, carrying usage and the engine's times) it calls
`ServingMetrics.on_request_finished` and notes the token counts for the access-log line. A stream
the consumer leaves early (client disconnect) is counted as `abort`.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Optional

from parallm.engine.types import RequestOutput
from parallm.server.metrics import RequestTokenTimes, ServingMetrics
from parallm.server.request_context import note_model, note_usage


async def observe_stream(metrics: Optional[ServingMetrics], model: str,
                         stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Yield `stream`'s outputs unchanged while recording them."""
    token_times = RequestTokenTimes()
    finish_reasons: dict[int, str] = {}
    finished = False
    left_early = False
    note_model(model)
    try:
        async for output in stream:
            token_times.record(output, time.monotonic())
            if output.finish_reason is not None:
                finish_reasons[output.index] = output.finish_reason
            if output.finished:
                finished = True
                if output.usage is not None:
                    note_usage(output.usage.prompt_tokens, output.usage.completion_tokens,
                               output.usage.cached_tokens)
                if metrics is not None:
                    reasons = [finish_reasons[i] for i in sorted(finish_reasons)]
                    metrics.on_request_finished(model, output, token_times, reasons)
            yield output
    except (GeneratorExit, asyncio.CancelledError):
        # The consumer stopped iterating (client gone). An engine error, by contrast, propagates
        # uncounted: the request was refused, not served and aborted.
        left_early = True
        raise
    finally:
        if left_early and not finished and metrics is not None:
            metrics.on_request_aborted(model)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()  # so the engine sees the consumer leave and aborts the request
