"""SSE streaming, built for throughput: engine outputs -> pre-framed `data: ...` bytes.

Two things keep the per-token cost low when many streams run at once:
- batching: outputs that piled up while the event loop was busy go out together, one choice's
  consecutive deltas merged into one chunk, all of a response's chunks in one socket write. For
  one prompt the engine's OutputCollector has already merged them; `batches` gathers what several
  prompts' streams produced. Under light load every output still goes out alone, at once;
- chunks are JSON strings assembled around a per-stream prefix (id, created, model encoded once),
  not pydantic objects; the shapes are those of protocol.ChatCompletionChunk / CompletionResponse.

A stream's headers wait for its first chunk (`opened_stream`), which waits for the engine's first
output, up to FIRST_OUTPUT_WAIT_S (`announced`): an error before any token, such as an adapter
unloaded meanwhile (the engine's own checks run within a step), is an HTTP error. A request still
waiting for a row after that gets its headers then, so keep-alive pings flow while it waits. An
error after the first chunk ends the stream with a chunk whose finish_reason is "error" for each
open choice, the error object, then [DONE] (`error_chunks`).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Optional, TypeVar

import anyio
from starlette.requests import Request

from parallm.engine.types import merge_outputs
from parallm.engine.types import RequestOutput
from parallm.server.error_responses import stream_error_payload
from parallm.server.api_models import UsageInfo

T = TypeVar("T")

FIRST_OUTPUT_WAIT_S = 3.0


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


async def announced(items: AsyncIterator[T], after: float = FIRST_OUTPUT_WAIT_S) -> AsyncIterator[Optional[T]]:
    """`items`, preceded by one None if the first of them takes longer than `after` seconds."""
    items = items.__aiter__()
    first = asyncio.ensure_future(items.__anext__())
    try:
        if not (await asyncio.wait({first}, timeout=after))[0]:
            yield None
        item = await first
    except StopAsyncIteration:
        return
    finally:
        if not first.done():
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
    yield item
    async for item in items:
        yield item


async def wait_for_disconnect(raw: Request) -> None:
    """Return when the client goes away. The body has been read, so the next message is a disconnect."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def opened_stream(chunks: AsyncIterator[bytes], raw: Request,
                        close: Callable[[], Awaitable[None]]) -> Optional[AsyncIterator[bytes]]:
    """`chunks` once its first chunk is ready: that chunk waits for the engine's first output, so an
    error before it is raised here, before any response header, and becomes an HTTP error. None if
    the client left first. Either way (and on an error) `close` has run unless chunks are returned."""
    first = asyncio.ensure_future(chunks.__anext__())
    watcher = asyncio.ensure_future(wait_for_disconnect(raw))
    try:
        await asyncio.wait({first, watcher}, return_when=asyncio.FIRST_COMPLETED)
        head = first.result() if first.done() else None  # raises the engine's error, if any
    except BaseException:
        with anyio.CancelScope(shield=True):
            await close()
        raise
    finally:
        for task in (first, watcher):
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(first, watcher, return_exceptions=True)
    if head is None:
        with anyio.CancelScope(shield=True):
            await close()
        return None

    async def rest() -> AsyncIterator[bytes]:
        yield head
        async for chunk in chunks:
            yield chunk

    return rest()


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


async def framed(outputs: AsyncIterator[list], head: list[str], payloads_of: Callable[[list, set], list[str]],
                 tail: Callable[[], list[str]], writer: ChunkWriter, choices: int) -> AsyncIterator[bytes]:
    """The SSE body of one response. `payloads_of(batch, ended)` writes a batch of outputs' chunks
    and adds the choices it finished to `ended`. `head` (chat's role chunks, completions' echo) goes
    out with the first output, or on its own once that is slow to come (`announced`); `tail()` (the
    usage chunk) at the end. An error before anything went out is raised (the caller answers with
    an HTTP error); after, it ends the stream as `error_chunks` says."""
    ended: set[int] = set()
    sent = False
    try:
        async for batch in announced(outputs):
            payloads, head = head, []
            if batch is None:  # slow to come: the headers go out now, with the head or a comment
                sent = True
                yield sse(payloads) if payloads else b": waiting\n\n"
                continue
            payloads += payloads_of(batch, ended)
            if payloads:
                sent = True
                yield sse(payloads)
    except Exception as e:
        if not sent:
            raise
        yield sse(error_chunks(writer, [i for i in range(choices) if i not in ended], e))
        return
    payloads = head + tail()
    if payloads:
        yield sse(payloads)


def error_chunks(writer: ChunkWriter, open_choices: list[int], error: Exception) -> list[str]:
    """The end of a stream that fails after tokens went out: one chunk ending each open choice with
    finish_reason "error", then the error object (the caller sends [DONE] after them)."""
    ends = [writer.chunk([writer.choice(i, None, "error") for i in open_choices])] if open_choices else []
    return ends + [json.dumps(stream_error_payload(error))]
