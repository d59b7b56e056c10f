"""OutputCollector: a consumer that keeps up gets every output; a late one gets them merged per
choice, the request's closing output last; an error comes after the outputs before it."""
from __future__ import annotations

import asyncio

import pytest

from parallm.engine.output_collector import OutputCollector
from parallm.engine.types import merge_outputs
from parallm.engine.types import RequestOutput, TokenLogprob, Usage


def out(index=0, text="", ids=(), **kw):
    return RequestOutput("r", index=index, text=text, token_ids=list(ids), **kw)


def test_a_consumer_that_keeps_up_gets_each_output_as_it_is():
    async def main():
        c = OutputCollector()
        first = out(text="a", ids=[1])
        c.put(first)
        assert await c.get() == [first]
        second = out(text="b", ids=[2])
        c.put(second)
        assert (await c.get())[0] is second
    asyncio.run(main())


def test_a_late_consumer_gets_one_merged_output_per_choice_closing_output_last():
    async def main():
        c = OutputCollector()
        lp = [TokenLogprob(1, "a", -0.1)]
        c.put(out(1, "x", [7]))
        c.put(out(0, "a", [1], logprobs=lp))
        c.put(out(1, "y", [8], finish_reason="length", finished=True, usage=Usage(3, 2)))
        c.put(out(0, "b", [2], logprobs=[TokenLogprob(2, "b", -0.2)], finish_reason="stop"))
        taken = await c.get()
        assert [o.index for o in taken] == [0, 1]  # the finished=True output last
        zero, one = taken
        assert (zero.text, zero.token_ids, zero.finish_reason, zero.finished) == ("ab", [1, 2], "stop", False)
        assert [lp.token_id for lp in zero.logprobs] == [1, 2]
        assert (one.text, one.token_ids, one.finished, one.usage) == ("xy", [7, 8], True, Usage(3, 2))
        assert c.closed  # the request's closing output was handed over
        assert lp == [TokenLogprob(1, "a", -0.1)]  # the inputs were not changed
    asyncio.run(main())


def test_get_waits_for_the_next_output():
    async def main():
        c = OutputCollector()
        waiter = asyncio.ensure_future(c.get())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        c.put(out(text="late"))
        assert (await asyncio.wait_for(waiter, 1))[0].text == "late"
    asyncio.run(main())


def test_an_error_comes_after_the_outputs_that_preceded_it():
    async def main():
        c = OutputCollector()
        c.put(out(text="a"))
        c.put(RuntimeError("engine died"))
        assert (await c.get())[0].text == "a"
        assert not c.closed
        with pytest.raises(RuntimeError, match="engine died"):
            await c.get()
        assert c.closed
    asyncio.run(main())


def test_merge_keeps_the_earlier_fields_the_later_outputs_leave_unset():
    merged = merge_outputs([out(text="a", ids=[1], logprobs=[TokenLogprob(1, "a", -1.0)], stop_reason="x"),
                            out(text="b", ids=[2]), out(text="c", ids=[3])])
    assert merged.text == "abc" and merged.token_ids == [1, 2, 3] and len(merged.logprobs) == 1
    assert merged.finish_reason is None and not merged.finished and merged.stop_reason == "x"
    lone = out(text="a")
    assert merge_outputs([lone]) is lone
    assert merge_outputs([out(text="a"), out(text="b")]).logprobs is None  # none asked for, none made


def test_a_long_backlog_is_merged_in_one_pass():
    async def main():
        c = OutputCollector()
        for i in range(20_000):
            c.put(out(text="t", ids=[i]))
        (merged,) = await c.get()
        assert merged.token_ids == list(range(20_000)) and len(merged.text) == 20_000
    asyncio.run(main())
