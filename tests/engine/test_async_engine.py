"""AsyncEngine: the loop stays free, errors are typed, streams always end."""
from __future__ import annotations

import asyncio
import time

import pytest

from parallm.engine.async_engine import AsyncEngine
from parallm.engine.engine import EngineConfig
from parallm.engine.errors import (EngineDead, EngineDraining, InvalidRequest, PromptTooLong, QueueFull,
                                   UnknownModel)
from parallm.engine.types import EngineRequest, SamplingParams

from engine_helpers import make_prompt, reference_greedy


def req(rid, prompt, max_tokens=5, **kw):
    return EngineRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                     ignore_eos=True, **kw))


async def collect(engine, request):
    return [o async for o in engine.generate(request)]


def test_loop_stays_responsive_while_worker_runs(tiny_loaded):
    async def main():
        engine = AsyncEngine(tiny_loaded, EngineConfig(max_num_batched_tokens=64))
        await engine.start()
        ticks = 0
        gaps = []
        steps_seen: list[int] = []

        async def ticker(stop):
            nonlocal ticks
            loop = asyncio.get_running_loop()
            last = loop.time()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = loop.time()
                gaps.append(now - last)
                steps_seen.append(engine.stats().steps)
                last = now
                ticks += 1

        stop = asyncio.Event()
        tick_task = asyncio.create_task(ticker(stop))
        prompts = [make_prompt(i, 30 + 20 * i) for i in range(6)]
        results = await asyncio.gather(*(collect(engine, req(f"r{i}", p, 20)) for i, p in enumerate(prompts)))
        stop.set()
        await tick_task
        await engine.shutdown()
        return prompts, results, ticks, engine, steps_seen

    prompts, results, ticks, engine, steps_seen = asyncio.run(main())
    for i, (p, outs) in enumerate(zip(prompts, results)):
        assert [t for o in outs for t in o.token_ids] == reference_greedy(tiny_loaded, p, 20)
        assert outs[-1].finished and outs[-1].usage.completion_tokens == 20
    # the ticker kept running while the worker stepped (it would starve if mlx ran on the loop)
    # the ticker ran between engine steps, at many different step counts
    assert len(set(steps_seen)) >= 3 and engine.stats().steps > max(steps_seen[:1] or [0])


def test_typed_errors_before_queueing(tiny_loaded):
    async def main():
        engine = AsyncEngine(tiny_loaded, EngineConfig(max_queue=1))
        with pytest.raises(PromptTooLong) as e:
            engine.validate(req("a", make_prompt(0, 2000), 100))
        assert "2048" in str(e.value) and "2000" in str(e.value)
        with pytest.raises(InvalidRequest):
            engine.validate(req("b", [], 5))
        with pytest.raises(UnknownModel) as e:
            engine.validate(EngineRequest("c", [1, 2], SamplingParams(), model="nope"))
        assert "tiny" in str(e.value)
        with pytest.raises(UnknownModel):
            engine.validate(EngineRequest("d", [1, 2], SamplingParams(), adapter="no-such-lora"))
        # as if every row were taken and one request were waiting
        engine._streams = {f"held{i}": None for i in range(engine.config.max_num_seqs + 1)}
        with pytest.raises(QueueFull):
            engine.validate(req("e", [1, 2]))
        engine._streams = {}
        await engine.start()
        await engine.shutdown()
        with pytest.raises(EngineDraining):
            await collect(engine, req("f", [1, 2]))

    asyncio.run(main())


def test_cancelled_stream_aborts_and_frees_row(tiny_loaded):
    async def main():
        engine = AsyncEngine(tiny_loaded, EngineConfig(max_num_seqs=4))
        await engine.start()
        agen = engine.generate(req("long", make_prompt(1, 10), 1000))
        first = await agen.__anext__()
        assert first.token_ids
        await agen.aclose()  # the client went away
        for _ in range(200):
            await asyncio.sleep(0.01)
            if engine.stats().num_running == 0 and not engine.engine.has_unfinished():
                break
        stats = engine.stats()
        # and a later request still works
        outs = await collect(engine, req("next", make_prompt(2, 6), 3))
        await engine.shutdown()
        return stats, outs

    stats, outs = asyncio.run(main())
    assert stats.num_running == 0
    assert [t for o in outs for t in o.token_ids] == reference_greedy(tiny_loaded, make_prompt(2, 6), 3)


async def abort_after_two_outputs(engine, request_id: str, prompt: list[int]) -> list:
    """Stream a long request and abort it by id once two outputs came; returns all its outputs."""
    outs = []

    async def consume():
        async for o in engine.generate(req(request_id, prompt, 1000)):
            outs.append(o)
            if len(outs) == 2:
                await engine.abort(request_id)

    await asyncio.wait_for(consume(), 30)
    return outs


def test_abort_by_id_ends_stream_with_abort(tiny_loaded):
    async def main():
        engine = AsyncEngine(tiny_loaded, EngineConfig())
        await engine.start()
        outs = await abort_after_two_outputs(engine, "x", make_prompt(3, 8))
        await engine.shutdown()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "abort" and outs[-1].finished


def test_shutdown_drains_then_aborts(tiny_loaded):
    async def main():
        engine = AsyncEngine(tiny_loaded, EngineConfig())
        await engine.start()
        short = asyncio.create_task(collect(engine, req("short", make_prompt(1, 4), 2)))
        long = asyncio.create_task(collect(engine, req("long", make_prompt(2, 4), 2000)))
        await asyncio.sleep(0.05)
        await engine.shutdown(drain_timeout=0.5)
        return await short, await long

    short, long = asyncio.run(main())
    assert short[-1].finish_reason == "length"
    assert long[-1].finish_reason == "abort" and long[-1].finished


def test_worker_crash_gives_engine_dead(tiny_loaded):
    async def main():
        engine = AsyncEngine(tiny_loaded, EngineConfig())

        def boom():
            raise RuntimeError("simulated device failure")

        engine.engine.step = boom
        await engine.start()
        with pytest.raises(EngineDead):
            await asyncio.wait_for(collect(engine, req("a", [1, 2, 3])), 10)
        with pytest.raises(EngineDead):
            engine.validate(req("b", [1, 2, 3]))
        await engine.shutdown()

    asyncio.run(main())


def test_warm_up_runs_before_start_returns_and_leaves_no_trace(tiny_loaded):
    """warm_up=True: start() returns after the throw-away requests ran, the engine is clean
    (no steps, no prefix-cache entries or hits counted) and real requests give the reference."""
    prompt = make_prompt(3, 20)

    async def main():
        engine = AsyncEngine(tiny_loaded, EngineConfig(warm_up=True))
        ran = []
        original_step = engine.engine.step

        def counting_step():
            ran.append(1)
            return original_step()

        engine.engine.step = counting_step
        before_reset = []
        original_reset = engine.engine.reset_after_warm_up

        def recording_reset():
            before_reset.append((engine.engine.prefix_cache.nbytes, engine.engine.stats().steps))
            original_reset()

        engine.engine.reset_after_warm_up = recording_reset
        await engine.start()
        warm_steps = len(ran)
        stats_after_start = engine.stats()
        cached = engine.engine.prefix_cache.nbytes if engine.engine.prefix_cache else 0
        outs = await collect(engine, req("real", prompt, 6))
        await engine.shutdown()
        return warm_steps, before_reset, stats_after_start, cached, outs

    warm_steps, before_reset, stats, cached, outs = asyncio.run(main())
    assert warm_steps >= 4  # two rounds, each a prefill and decode steps
    (cached_before, steps_before), = before_reset
    assert cached_before > 0 and steps_before == warm_steps  # the warm-up did fill cache and counters
    assert engine_stats_clean(stats) and cached == 0  # ... and the reset emptied both
    assert [t for o in outs for t in o.token_ids] == reference_greedy(tiny_loaded, prompt, 6)


def engine_stats_clean(stats) -> bool:
    return stats.steps == 0 and stats.prefix_cache_queries == 0 and stats.prefix_cache_hits == 0


def test_warm_up_is_off_by_default_on_the_cpu(tiny_loaded):
    from parallm.engine.engine import Engine

    engine = Engine(tiny_loaded, EngineConfig())
    import mlx.core as mx
    assert engine.wants_warm_up() == (mx.default_device() == mx.gpu)


def test_a_late_consumer_gets_merged_outputs_with_every_token(tiny_loaded):
    """Outputs the consumer has not taken yet are merged (OutputCollector): fewer, longer outputs,
    the same tokens and text as one taken at a time."""
    async def main():
        engine = AsyncEngine(tiny_loaded, EngineConfig())
        await engine.start()
        prompt = make_prompt(3, 12)
        stream = engine.generate(req("late", prompt, 24))
        outs = [await stream.__anext__()]
        steps = engine.stats().steps
        while engine.stats().steps < steps + 6:  # the engine runs on while nobody reads
            await asyncio.sleep(0.005)
        outs += [o async for o in stream]
        prompt_again = await collect(engine, req("eager", prompt, 24))
        await engine.shutdown()
        return outs, prompt_again

    outs, eager = asyncio.run(main())
    tokens = [t for o in outs for t in o.token_ids]
    assert tokens == reference_greedy(tiny_loaded, make_prompt(3, 12), 24)
    assert tokens == [t for o in eager for t in o.token_ids]
    assert "".join(o.text for o in outs) == "".join(o.text for o in eager)
    assert max(len(o.token_ids) for o in outs) > 1 and len(outs) < 24
    assert outs[-1].finished and outs[-1].usage.completion_tokens == 24


def test_idle_time_is_counted_apart_from_steps(tiny_loaded):
    async def main():
        engine = AsyncEngine(tiny_loaded, EngineConfig())
        await engine.start()
        started = time.perf_counter()
        await asyncio.sleep(0.35)  # nothing to run: the worker waits
        waiting = engine.stats()  # read during the wait: it counts up to now
        await collect(engine, req("a", make_prompt(3, 12), 4))
        after = engine.stats()
        elapsed = time.perf_counter() - started
        await engine.shutdown()
        return waiting, after, elapsed

    waiting, after, elapsed = asyncio.run(main())
    assert waiting.idle_seconds >= 0.3 and waiting.decode_rows == 0
    assert after.busy_seconds > 0 and after.decode_rows == 4 and after.idle_seconds >= waiting.idle_seconds
    # busy and idle are disjoint shares of the same clock: together never more than the time
    # that passed (the first version counted a wait again when it ended, inside the next run)
    assert after.idle_seconds + after.busy_seconds <= elapsed + 0.01
    # the worker's hand-over of outputs to the loop is counted beside the step's own phases
    assert after.phase_seconds["emit"] > 0 and after.phase_seconds["dispatch"] > 0
