"""The same load as bench_serving.py, straight into an in-process AsyncEngine (no HTTP, no JSON, no
SSE), so that `--engine-baseline` can say how much of the engine's throughput the server delivers.

The prompts go through the same chat-free path as /v1/completions (tokenizer.encode), with the same
max_tokens, greedy sampling and ignore_eos; TTFT, TPOT and ITL are taken on the asyncio side exactly
as the HTTP client takes them (first output with text, gaps between outputs with text).
"""
from __future__ import annotations

import asyncio
import time
import uuid

from bench_serving import RequestResult, LevelResult, add_engine_accounting, engine_counters, summarize


def add_level_arguments(p) -> None:
    """The per-level load of the engine-only benchmarks (bench_arrival, bench_engine_cpu_load): the
    H200 pairs' 64 clients x 4 requests of 128/128 tokens unless told otherwise."""
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)


def level_row(lv: LevelResult) -> dict:
    """A level's throughput, latency and engine accounting as one JSON-ready row."""
    return dict(tok_s=round(lv.throughput_tok_s, 1), failures=lv.failures,
                ttft_p50_ms=round(1e3 * (lv.ttft_p50 or 0)), ttft_p99_ms=round(1e3 * (lv.ttft_p99 or 0)),
                steps=lv.engine_steps, prefill_steps=lv.prefill_steps,
                rows_per_step=lv.rows_per_step and round(lv.rows_per_step, 1),
                ms_per_step=lv.ms_per_step and round(lv.ms_per_step, 3))


def load_engine(model_dir: str, max_num_seqs: int, max_queue: int, max_num_batched_tokens=None,
                prefill_wait_steps=None):
    from parallm.engine.async_engine import AsyncEngine
    from parallm.engine.engine import EngineConfig
    from parallm.models import load

    loaded = load(model_dir, device="auto", name="bench")
    extra = {} if prefill_wait_steps is None else {"prefill_wait_steps": prefill_wait_steps}
    return AsyncEngine(loaded, EngineConfig(max_num_seqs=max_num_seqs, max_queue=max_queue,
                                            max_num_batched_tokens=max_num_batched_tokens, **extra))


async def _one(engine, prompt_ids: list[int], output_len: int) -> RequestResult:
    from parallm.engine.types import EngineRequest, SamplingParams

    request = EngineRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt_ids, model="bench",
                            sampling=SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    first = last = None
    itls, tokens, prompt_tokens = [], 0, None
    try:
        async for out in engine.generate(request):
            if out.text:
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itls.append(now - last)
                last = now
            if out.finished and out.usage:
                tokens, prompt_tokens = out.usage.completion_tokens, out.usage.prompt_tokens
    except Exception as e:  # a typed engine error (QueueFull...) is a failure of this request
        return RequestResult.raised(e, start)
    end = time.perf_counter()
    return RequestResult(ok=True, ttft=None if first is None else first - start, e2e=end - start, itls=itls,
                         output_tokens=tokens, prompt_tokens=prompt_tokens)


async def run_engine_level(engine, tokenizer, concurrency: int, prompts: list[str], output_len: int,
                           level_timeout: float, admission_s: float = 0.0) -> LevelResult:
    """With admission_s > 0 every request first passes one gate that it holds for admission_s, so
    requests reach the engine one at a time, admission_s apart, as through a server whose loop
    spends that long on each request (routing, validation, tokenization). A burst of 64 then
    trickles in over 64 x admission_s: the arrival pattern of the HTTP path without HTTP.
    The result carries the engine's accounting over the level (steps, rows per step, ms per step)."""
    await engine.start()
    encoded = [list(tokenizer.encode(p)) for p in prompts]
    pending = list(reversed(encoded))
    results: list[RequestResult] = []
    gate = asyncio.Lock()

    async def admitted(prompt_ids):
        if admission_s > 0:
            async with gate:
                await asyncio.sleep(admission_s)
        return await _one(engine, prompt_ids, output_len)

    async def worker():
        while pending:
            results.append(await admitted(pending.pop()))

    before, start = engine_counters(engine.stats()), time.perf_counter()
    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    _, late = await asyncio.wait(tasks, timeout=level_timeout)
    for t in late:
        t.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    level = summarize("engine", concurrency, results, len(prompts) - len(results), time.perf_counter() - start)
    add_engine_accounting(level, before, engine_counters(engine.stats()))
    return level
