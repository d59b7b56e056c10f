"""CPU per token of the server's stream chain on the event loop, without sockets or a model.

64 streams get one output each per step, handed over in one loop callback as AsyncEngine does,
and each stream is consumed the way the serving layer consumes it for one prompt: the engine's
per-request delivery, observe_stream (metrics), then either the pump-task `batches` of the old
path or `one_prompt_batches` over the OutputCollector. Prints microseconds of loop CPU per token
for each, interleaved over --reps, and their ratio.

  python loadtests/bench_stream_chain.py --streams 64 --steps 256 --reps 5
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm.engine.output_collector import OutputCollector  # noqa: E402
from parallm.engine.types import RequestOutput, Usage  # noqa: E402
from parallm.server.observed_engine import observe_stream  # noqa: E402
from parallm.server.serving import merged_outputs, one_prompt_batches  # noqa: E402
from parallm.server.streaming import batches, coalesce  # noqa: E402


class QueueDelivery:
    """The delivery before OutputCollector: one asyncio.Queue item per output."""

    def __init__(self):
        self.queue = asyncio.Queue()

    def put(self, item):
        self.queue.put_nowait(item)

    async def stream(self):
        while True:
            item = await self.queue.get()
            yield item
            if item.finished:
                return


class CollectorDelivery:
    def __init__(self):
        self.collector = OutputCollector()

    def put(self, item):
        self.collector.put(item)

    async def stream(self):
        while True:
            for item in await self.collector.get():
                yield item
                if item.finished:
                    return


async def run(kind: str, streams: int, steps: int) -> float:
    deliveries = [(CollectorDelivery if kind == "collector" else QueueDelivery)() for _ in range(streams)]
    received = 0

    async def consume(d):
        nonlocal received
        chain = observe_stream(None, "m", d.stream())
        source = one_prompt_batches(chain) if kind == "collector" else batches(merged_outputs([chain]))
        async for batch in source:
            for _, out in coalesce(batch, 1):
                received += len(out.token_ids)

    tasks = [asyncio.ensure_future(consume(d)) for d in deliveries]
    await asyncio.sleep(0)
    cpu = time.process_time()
    for step in range(steps):
        last = step == steps - 1
        outs = [RequestOutput(f"r{i}", text="tok", token_ids=[step], finished=last,
                              finish_reason="length" if last else None,
                              usage=Usage(1, steps) if last else None) for i in range(streams)]
        asyncio.get_running_loop().call_soon(lambda o=outs: [d.put(x) for d, x in zip(deliveries, o)])
        await asyncio.sleep(0)  # let the consumers run, as between engine steps
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert received == streams * steps, (received, streams * steps)
    return 1e6 * (time.process_time() - cpu) / received


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    results = {"queue+pump": [], "collector": []}
    for _ in range(args.reps):
        for kind in ("queue+pump", "collector"):
            results[kind].append(asyncio.run(run(kind, args.streams, args.steps)))
    med = {k: round(statistics.median(v), 2) for k, v in results.items()}
    print(json.dumps({"us_per_token_median": med, "collector_vs_queue_pump": round(med["collector"] / med["queue+pump"], 3),
                      "runs": {k: [round(x, 2) for x in v] for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
