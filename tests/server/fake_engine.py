"""A small EngineClient double for serving-layer tests (no model): it "generates" by walking the
prompt's own token ids (or seeded random ids), detokenized through the real tokenizer, so the
server sees real token streams, real text and real usage counts.

It honours max_tokens, n, stop strings, logprobs/top_logprobs, seed, a waiting queue with
QueueFull, abort, drain on shutdown, and a per-token delay so that tests can disconnect mid-way.
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from typing import AsyncIterator

from parallm.engine.errors import EngineDraining, PromptTooLong, QueueFull, UnknownModel
from parallm.engine.types import (EngineRequest, EngineStats, RequestOutput, RequestTimes, TokenLogprob,
                                  TopLogprob, Usage)


class FakeEngine:
    def __init__(self, tokenizer, *, model_name: str = "tiny", context_length: int = 512,
                 max_running: int = 4, max_queue: int = 8, token_delay: float = 0.0):
        self._tokenizer = tokenizer
        self.model_name = model_name
        self._context_length = context_length
        self.max_running = max_running
        self.max_queue = max_queue
        self.token_delay = token_delay
        self.running: set[str] = set()
        self.waiting: set[str] = set()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.draining = False
        self.started = False
        self._slots: asyncio.Semaphore | None = None
        self._abort_events: dict[str, asyncio.Event] = {}

    # ---- EngineClient ----
    async def start(self) -> None:
        self.started = True
        self._slots = asyncio.Semaphore(self.max_running)

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        self.draining = True
        deadline = time.monotonic() + drain_timeout
        while (self.running or self.waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for rid in list(self.running | self.waiting):
            await self.abort(rid)

    def validate(self, request: EngineRequest) -> None:
        if self.draining:
            raise EngineDraining()
        if request.model != self.model_name:
            raise UnknownModel(request.model, self.model_names())
        total = len(request.prompt_token_ids) + request.sampling.max_tokens
        if total > self._context_length:
            raise PromptTooLong(len(request.prompt_token_ids), request.sampling.max_tokens, self._context_length)
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(self.max_queue)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.validate(request)
        rid = request.request_id
        abort = self._abort_events[rid] = asyncio.Event()
        times = RequestTimes(arrival=time.monotonic())
        self.waiting.add(rid)
        try:
            async with self._slots:
                self.waiting.discard(rid)
                self.running.add(rid)
                times.first_scheduled = time.monotonic()
                async for out in self._run(request, abort, times):
                    yield out
        finally:
            # A consumer that stops iterating (aclose/cancel) aborts the request, as in the engine.
            if rid not in self.finished and rid not in self.aborted:
                self.aborted.append(rid)
            self.waiting.discard(rid)
            self.running.discard(rid)
            self._abort_events.pop(rid, None)

    async def _run(self, request: EngineRequest, abort: asyncio.Event, times: RequestTimes):
        sp = request.sampling
        prompt = request.prompt_token_ids
        vocab = len(self._tokenizer)
        base_seed = random.randrange(2**31) if sp.seed is None else sp.seed
        rngs = {i: random.Random(base_seed + i) for i in range(sp.n)}
        tokens: dict[int, list[int]] = {i: [] for i in range(sp.n)}
        texts = {i: "" for i in range(sp.n)}
        open_choices = set(range(sp.n))
        while open_choices and not abort.is_set():
            await asyncio.sleep(self.token_delay)
            for i in sorted(open_choices):
                k = len(tokens[i])
                # greedy: walk the prompt; sampling: seeded random ids (the same seed, the same ids)
                token = prompt[k % len(prompt)] if sp.temperature == 0 else rngs[i].randrange(vocab)
                tokens[i].append(token)
                full = self._tokenizer.decode(tokens[i])
                stop_hit = next((s for s in sp.stop if s in full), None)
                reason = None
                if stop_hit is not None:
                    full = full[:full.index(stop_hit)]
                    reason = "stop"
                elif len(tokens[i]) >= sp.max_tokens:
                    reason = "length"
                piece = full[len(texts[i]):] if full.startswith(texts[i]) else ""
                texts[i] = full
                logprobs = None
                if sp.logprobs:
                    top = [TopLogprob(token_id=(token + j) % vocab, token=self._tokenizer.decode([(token + j) % vocab]),
                                      logprob=-float(j + 1)) for j in range(sp.top_logprobs)]
                    logprobs = [TokenLogprob(token_id=token, token=self._tokenizer.decode([token]),
                                             logprob=-math.log(2.0), top=top)]
                if times.first_token is None:
                    times.first_token = time.monotonic()
                if reason:
                    open_choices.discard(i)
                yield RequestOutput(request_id=request.request_id, index=i, text=piece, token_ids=[token],
                                    logprobs=logprobs, finish_reason=reason, stop_reason=stop_hit)
        for i in sorted(open_choices):  # aborted
            yield RequestOutput(request_id=request.request_id, index=i, finish_reason="abort")
        times.finished = time.monotonic()
        (self.aborted if abort.is_set() else self.finished).append(request.request_id)
        yield RequestOutput(request_id=request.request_id, index=0, finished=True, times=times,
                            usage=Usage(prompt_tokens=len(prompt),
                                        completion_tokens=sum(len(t) for t in tokens.values())))

    async def abort(self, request_id: str) -> None:
        event = self._abort_events.get(request_id)
        if event is not None:
            event.set()

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_waiting=len(self.waiting))

    def model_names(self) -> list[str]:
        return [self.model_name]

    def tokenizer(self, model: str):
        return self._tokenizer

    def context_length(self, model: str) -> int:
        return self._context_length
