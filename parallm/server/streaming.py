"""SSE streaming, built for throughput: engine outputs -> pre-framed `data: ...` bytes.

Two things keep the per-token cost low when many streams run at once:
- batching: outputs that piled up while the event loop was busy go out together, one choice's
  consecutive deltas merged into one chunk, all of a response's chunks in one socket write. For
  one prompt the engine's OutputCollector has already merged them; `batches` gathers what several
  prompts' streams produced. Under light load every output still goes out alone, at once;
- chunks are JSON strings assembled around a per-stream prefix (id, created, model encoded once),
  not pydantic objects; the shapes are those of protocol.ChatCompletionChunk / CompletionResponse.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, TypeVar

from parallm.engine.output_collector import merge_outputs
from parallm.engine.types import RequestOutput
from parallm.server.protocol import UsageInfo

T = TypeVar("T")


def sse(payloads: list[str]) -> bytes:
    return "".join(f"data: {p}\n\n" for p in payloads).encode()


async def batches(stream: AsyncIterator[T]) -> AsyncIterator[list[T]]:
    """Everything `stream` produced since the consumer last asked, as one list (never empty).

    A pump task reads the stream; the consumer takes what has piled up. The pump is cancelled (and so
    the stream closed, which aborts the engine request) when the consumer stops early.
    """
    buffer: list[T] = []
    wake = asyncio.Event()
    state = {"done": False, "error": None}

    async def pump() -> None:
        try:
            async for item in stream:
                buffer.append(item)
                wake.set()
        except Exception as e:  # handed to the consumer, raised in the request's context
            state["error"] = e
        finally:
            state["done"] = True
            wake.set()

    task = asyncio.ensure_future(pump())
    try:
        while True:
            await wake.wait()
            wake.clear()
            if buffer:
                taken = buffer[:]
                buffer.clear()
                yield taken
            if state["error"] is not None:
                raise state["error"]
            if state["done"] and not buffer:
                return
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def coalesce(batch: list[tuple[int, RequestOutput]], n: int) -> list[tuple[int, RequestOutput]]:
    """Merge consecutive outputs of the same choice: (response choice index, merged output)."""
    if len(batch) == 1:  # the usual case: nothing to merge, so no copy either
        prompt_index, out = batch[0]
        return [(prompt_index * n + out.index, out)]
    by_choice: dict[int, list[RequestOutput]] = {}
    for prompt_index, out in batch:
        by_choice.setdefault(prompt_index * n + out.index, []).append(out)
    return [(index, merge_outputs(outputs)) for index, outputs in by_choice.items()]


@dataclass
class ChunkWriter:
    """Writes the chunks of one streamed response. kind: 'chat' or 'completion'."""

    response_id: str
    model: str
    kind: str
    created: int = field(default_factory=lambda: int(time.time()))
    _prefix: str = ""

    def __post_init__(self):
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        self._prefix = (f'{{"id":{json.dumps(self.response_id)},"object":"{obj}","created":{self.created},'
                        f'"model":{json.dumps(self.model)},"choices":')

    def chunk(self, choices: list[dict], usage: Optional[UsageInfo] = None) -> str:
        tail = "null" if usage is None else usage.model_dump_json()
        return f'{self._prefix}{json.dumps(choices, ensure_ascii=False)},"usage":{tail}}}'

    def text_chunk(self, index: int, text: Optional[str], finish_reason: Optional[str]) -> str:
        """`chunk([choice(index, text, finish_reason)])` for a choice without logprobs or role, the
        one every streamed token makes: formatted directly rather than through json.dumps of dicts
        (the event loop's time per token is taken from the engine thread; they share the GIL)."""
        reason = "null" if finish_reason is None else json.dumps(finish_reason)
        if self.kind == "chat":
            delta = "{}" if text is None else f'{{"content":{json.dumps(text, ensure_ascii=False)}}}'
            choice = f'{{"index":{index},"delta":{delta},"logprobs":null,"finish_reason":{reason}}}'
        else:
            choice = (f'{{"index":{index},"text":{json.dumps(text or "", ensure_ascii=False)},'
                      f'"logprobs":null,"finish_reason":{reason}}}')
        return f'{self._prefix}[{choice}],"usage":null}}'

    def choice(self, index: int, text: Optional[str], finish_reason: Optional[str] = None,
               logprobs: Optional[dict] = None, role: Optional[str] = None) -> dict:
        if self.kind == "chat":
            delta = {}
            if role is not None:
                delta["role"] = role
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
