"""The serving layer: OpenAI requests -> EngineRequests -> OpenAI responses and SSE chunks.

Routes stay thin and call OpenAIServing. Invariants:
- everything a client can get wrong is raised as a typed EngineError before the response starts;
- every engine request is aborted when its response ends for any reason but completion (client
  disconnect while streaming or waiting, cancellation, error), and its admission ticket released.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable, Optional

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from parallm.engine.errors import EngineError, InvalidRequest, PromptTooLong, UnknownModel
from parallm.engine.client import EngineClient
from parallm.engine.types import EngineRequest, RequestOutput, SamplingParams
from parallm.server.admission import Admission
from parallm.server.error_responses import engine_error_payload
from parallm.server.metrics import ServingMetrics
from parallm.server.prompts import (Prompt, chat_prompt, check_token_ids, client_template, completion_prompt,
                                    prompt_text, sandbox_context, text_prompt)
from parallm.server.api_models import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatResponseMessage,
                                     CompletionChoice, CompletionRequest, CompletionResponse, SamplingFields)
from parallm.server.responses import Collected, chat_logprobs, completion_logprobs, usage_info
from parallm.server.prompt_worker import PromptWorker
from parallm.server.request_observer import observe_stream
from parallm.server.streaming import (ChunkWriter, batches, coalesce, framed, opened_stream, sse,
                                      wait_for_disconnect)
from parallm.server.template_sandbox import ClientTemplateRefused

DEFAULT_COMPLETION_MAX_TOKENS = 16  # the OpenAI default for /v1/completions


class ClientGone(Exception):
    """The client disconnected before its non-streaming response was ready."""


class ReleasingEventSource(EventSourceResponse):
    """An SSE response that runs `on_close` however it ends, even if its body never started."""

    def __init__(self, content, on_close: Callable[[], Awaitable[None]], **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def _send_with_timeout(self, send, message) -> None:
        # sse-starlette wraps every send in anyio.move_on_after(send_timeout), even when the timeout
        # is None (ours). That cancel scope is a third of the per-chunk cost on the event loop, and
        # the loop's time per token is taken from the engine thread (they share the GIL). Without a
        # timeout the scope cannot fire, so send directly. (A private hook of sse-starlette 3.x; in
        # a version without it this override is simply unused.)
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


def sampling_params(body: SamplingFields, prompt: Prompt, context_length: int, vocab: int,
                    default_max_tokens: Optional[int], logprobs: bool, top_logprobs: int) -> SamplingParams:
    prompt_len = len(prompt.token_ids)
    requested = body.requested_max_tokens()
    if requested is None:
        # No max_tokens: completions default to 16 (OpenAI); chat may use the rest of the context.
        max_tokens = default_max_tokens or max(1, context_length - prompt_len)
    else:
        max_tokens = requested
    if prompt_len + max_tokens > context_length:
        raise PromptTooLong(prompt_len, max_tokens, context_length)
    bias = tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items())
    bad_bias = [k for k, _ in bias if k >= vocab]
    if bad_bias:
        raise InvalidRequest(f"logit_bias names token ids outside the vocabulary (0..{vocab - 1}): {bad_bias[:5]}",
                             param="logit_bias")
    check_token_ids(vocab, body.stop_token_ids or (), "stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k),
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=bias,
        stop=tuple(body.stop_list()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        n=body.n,
        # The engine takes a non-negative seed; OpenAI accepts any int64.
        seed=None if body.seed is None else body.seed % (2**63),
    )


async def merged_outputs(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the engine streams of several prompts as (prompt index, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, done))
        except Exception as e:  # hand it to the consumer, who raises it in the request's context
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def one_prompt_batches(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
    async for out in stream:
        yield [(0, out)]


def client_templates_allowed(raw: Request) -> bool:
    return bool(getattr(getattr(raw.app.state, "settings", None), "allow_client_chat_template", False))


class OpenAIServing:
    def __init__(self, engine: EngineClient, admission: Admission, metrics: Optional[ServingMetrics] = None):
        self.engine = engine
        self.admission = admission
        self.metrics = metrics  # every stream is observed for it (request_observer.py)
        self.prompts = PromptWorker()  # templates and tokenization, off the event loop
        self.started = int(time.time())  # a base model's `created` in /v1/models: the same on every call

    # ---- models ---------------------------------------------------------------------------------

    def _model_cards(self) -> list[dict]:
        return self.engine.model_cards()

    def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": self._model_cards()})

    def model(self, name: str) -> JSONResponse:
        """One entry of /v1/models (the SDK's models.retrieve); an unknown name is a 404 listing them."""
        cards = self._model_cards()
        for card in cards:
            if card["id"] == name:
                return JSONResponse(card)
        raise UnknownModel(name, [card["id"] for card in cards])

    def _resolve_model(self, name: str) -> tuple[str, Optional[str]]:
        """(base model, adapter or None). `"model": "<adapter name>"` runs the adapter's base model
        with that adapter, as in vLLM; responses then name the adapter, the model the client asked for."""
        names = self.engine.model_names()
        if name in names:
            return name, None
        parent = self.engine.adapter_parent(name)
        if parent is not None:
            return parent, name
        raise UnknownModel(name, names + [a.name for a in self.engine.adapters() if not a.unloading])

    # ---- routes ---------------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, raw: Request) -> Response:
        model, adapter = self._resolve_model(body.model)
        tokenizer = self.engine.tokenizer(model)
        context = self.engine.context_length(model)
        template = client_template(tokenizer, body)
        if template is None:  # the model's own: rendered in-process on the prompt thread
            size = sum(len(m.text()) for m in body.messages)
            prompt = await self.prompts.run(size, chat_prompt, tokenizer, body, model, context)
        elif not client_templates_allowed(raw):
            raise ClientTemplateRefused()
        else:  # the client's: rendered in a sandbox process, then tokenized on the prompt thread
            text = await self.prompts.render_client_template(template, sandbox_context(tokenizer, body))
            prompt = await self.prompts.run(len(text), text_prompt, tokenizer, text, context)
        top = body.top_logprobs or 0
        params = sampling_params(body, prompt, context, len(tokenizer), None, body.logprobs, top)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        requests = [EngineRequest(request_id=response_id, prompt_token_ids=prompt.token_ids, sampling=params,
                                  model=model, adapter=adapter)]
        if body.stream:
            return await self._stream(requests, raw, self._chat_chunks(body, response_id, body.model, requests))
        collected = await self._collect(requests, raw, n=body.n)
        if collected is None:
            return Response(status_code=499)
        choices = [
            ChatChoice(index=i, message=ChatResponseMessage(content="".join(c.text)),
                       logprobs=chat_logprobs(c.logprobs) if body.logprobs else None, finish_reason=c.finish_reason)
            for i, c in sorted(collected.choices.items())]
        return JSONResponse(ChatCompletionResponse(id=response_id, model=body.model, choices=choices,
                                                   usage=usage_info(collected.usages)).model_dump())

    async def completions(self, body: CompletionRequest, raw: Request) -> Response:
        model, adapter = self._resolve_model(body.model)
        tokenizer = self.engine.tokenizer(model)
        if body.echo and body.logprobs is not None:
            raise InvalidRequest("echo together with logprobs is not supported.", param="echo")
        texts = body.prompts()
        self.admission.check_size(len(texts))  # before tokenizing a batch that could never be admitted
        context = self.engine.context_length(model)
        if any(isinstance(p, str) for p in texts):
            size = sum(len(p) for p in texts if isinstance(p, str))
            prompts = await self.prompts.run(size, lambda: [completion_prompt(tokenizer, p, context) for p in texts])
        else:  # token ids only: nothing to tokenize, no thread hop
            prompts = [completion_prompt(tokenizer, p) for p in texts]
        response_id = f"cmpl-{uuid.uuid4().hex}"
        requests = []
        for i, prompt in enumerate(prompts):
            params = sampling_params(body, prompt, context, len(tokenizer), DEFAULT_COMPLETION_MAX_TOKENS,
                                     body.logprobs is not None, body.logprobs or 0)
            requests.append(EngineRequest(request_id=f"{response_id}-{i}", prompt_token_ids=prompt.token_ids,
                                          sampling=params, model=model, adapter=adapter))
        echo = [prompt_text(tokenizer, p) if body.echo else "" for p in prompts]
        if body.stream:
            return await self._stream(requests, raw,
                                      self._completion_chunks(body, response_id, body.model, requests, echo))
        collected = await self._collect(requests, raw, n=body.n)
        if collected is None:
            return Response(status_code=499)
        choices = []
        for index, c in sorted(collected.choices.items()):
            prefix = echo[index // body.n]
            logprobs = completion_logprobs(c.logprobs, len(prefix)) if body.logprobs is not None else None
            choices.append(CompletionChoice(index=index, text=prefix + "".join(c.text), logprobs=logprobs,
                                            finish_reason=c.finish_reason))
        return JSONResponse(CompletionResponse(id=response_id, model=body.model, choices=choices,
                                               usage=usage_info(collected.usages)).model_dump())

    # ---- running --------------------------------------------------------------------------------

    def _generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        return observe_stream(self.metrics, request.model, self.engine.generate(request))

    def _admit(self, requests: list[EngineRequest]):
        for r in requests:
            self.engine.validate(r)
        return self.admission.acquire(len(requests))

    async def _abort_all(self, requests: list[EngineRequest]) -> None:
        for r in requests:
            await self.engine.abort(r.request_id)

    async def _collect(self, requests: list[EngineRequest], raw: Request, n: int) -> Optional[Collected]:
        """Run the requests to completion; None when the client left first (requests aborted)."""
        ticket = self._admit(requests)
        collected = Collected()
        finished = False

        async def run() -> None:
            nonlocal finished
            async for prompt_index, out in merged_outputs([self._generate(r) for r in requests]):
                collected.add(prompt_index * n + out.index, out)
            finished = True

        work = asyncio.ensure_future(run())
        watcher = asyncio.ensure_future(wait_for_disconnect(raw))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()  # raises the engine's error, if any
                return collected
            return None
        finally:
            for task in (work, watcher):
                task.cancel()
            if not finished:
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(work, return_exceptions=True)
                    await self._abort_all(requests)
            ticket.release()

    async def _stream(self, requests: list[EngineRequest], raw: Request, chunks: AsyncIterator[bytes]) -> Response:
        ticket = self._admit(requests)

        async def close() -> None:
            # Idempotent: ids that already finished are unknown to the engine and ignored.
            await self._abort_all(requests)
            ticket.release()

        chunks = await opened_stream(chunks, raw, close)  # the headers wait for the first output
        if chunks is None:  # the client left first
            return Response(status_code=499)
        return ReleasingEventSource(self._guard_stream(chunks), on_close=close, ping=15)

    async def _guard_stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """An engine error mid-stream becomes an error event; the stream always ends with [DONE]."""
        try:
            async for chunk in chunks:
                yield chunk
        except EngineError as e:
            yield sse([json.dumps(engine_error_payload(e))])
        yield sse(["[DONE]"])

    def _output_batches(self, requests: list[EngineRequest]) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        streams = [self._generate(r) for r in requests]
        if len(streams) == 1:
            # One prompt: the engine already merged whatever piled up while the loop was busy
            # (OutputCollector), so each output is a batch; no pump task, one wake-up per chunk.
            return one_prompt_batches(streams[0])
        return batches(merged_outputs(streams))

    async def _chat_chunks(self, body: ChatCompletionRequest, response_id: str, model: str,
                           requests: list[EngineRequest]) -> AsyncIterator[bytes]:
        writer = ChunkWriter(response_id, model, "chat")
        usages = []

        def payloads_of(batch: list[tuple[int, RequestOutput]], ended: set[int]) -> list[str]:
            payloads = []
            for index, out in coalesce(batch, body.n):
                if out.text or out.logprobs or out.finish_reason:
                    text = out.text if (out.text or out.logprobs) else None
                    if body.logprobs:
                        logprobs = chat_logprobs(out.logprobs or []).model_dump()
                        payloads.append(writer.chunk([writer.choice(index, text, out.finish_reason, logprobs)]))
                    else:
                        payloads.append(writer.text_chunk(index, text, out.finish_reason))
                if out.finish_reason:
                    ended.add(index)
                if out.finished and out.usage is not None:
                    usages.append(out.usage)
            return payloads

        def tail() -> list[str]:
            return [writer.chunk([], usage=usage_info(usages))] if body.include_usage_in_stream() else []

        head = [writer.chunk([writer.choice(i, "", role="assistant")]) for i in range(body.n)]
        async for chunk in framed(self._output_batches(requests), head, payloads_of, tail, writer, body.n):
            yield chunk

    async def _completion_chunks(self, body: CompletionRequest, response_id: str, model: str,
                                 requests: list[EngineRequest], echo: list[str]) -> AsyncIterator[bytes]:
        writer = ChunkWriter(response_id, model, "completion")
        choices = len(requests) * body.n
        offsets: dict[int, int] = {}  # choice index -> characters sent so far (for logprobs text_offset)
        usages = []

        def payloads_of(batch: list[tuple[int, RequestOutput]], ended: set[int]) -> list[str]:
            payloads = []
            for index, out in coalesce(batch, body.n):
                if out.text or out.logprobs or out.finish_reason:
                    if body.logprobs is not None:
                        logprobs = completion_logprobs(out.logprobs or [], offsets.get(index, 0)).model_dump()
                        payloads.append(writer.chunk([writer.choice(index, out.text, out.finish_reason, logprobs)]))
                    else:
                        payloads.append(writer.text_chunk(index, out.text, out.finish_reason))
                    offsets[index] = offsets.get(index, 0) + len(out.text)
                if out.finish_reason:
                    ended.add(index)
                if out.finished and out.usage is not None:
                    usages.append(out.usage)
            return payloads

        def tail() -> list[str]:
            return [writer.chunk([], usage=usage_info(usages))] if body.include_usage_in_stream() else []

        head = []
        if body.echo:
            for index in range(choices):
                offsets[index] = len(echo[index // body.n])
            head = [writer.chunk([writer.choice(i, echo[i // body.n])]) for i in range(choices)]
        async for chunk in framed(self._output_batches(requests), head, payloads_of, tail, writer, choices):
            yield chunk
