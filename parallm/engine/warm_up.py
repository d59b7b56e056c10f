"""Engine warm-up: run a few throw-away requests before the first real one.

Why: on a GPU the first pass of each kind pays one-off costs (MLX compiling the kernels of its
fused and indexing ops, the BLAS library choosing its algorithms, memory pools growing). Paid
inside the first real requests they stall every stream of the batch: on an H200 the first level
of a 64-client load test had a TTFT p99 of several seconds where later levels had a few hundred
milliseconds (BENCHMARKS.md, serving). AsyncEngine runs this before it takes requests, so the
server starts listening already warm.

What runs: one request alone (a single stream: unmasked prefill, the exact-length decode path),
then two together with different prompt lengths (padded prefill with a mask, decode rows at
different offsets), one greedy, one that samples with every sampling option and asks for
logprobs. Afterwards the prefix cache and the counters are reset, so the warm-up leaves no trace
in the cache or in /metrics.

On CUDA, then a round with every row at once (128-token prompts): the K/V buffers grow through
each slot count once, so a burst of clients finds them in MLX's buffer cache (see _full_round).
Warming every prefill bucket too cost ~40 s of start-up for a 1B model and was not needed: the
first burst of 64 clients after these rounds had a TTFT p99 of 182 ms against 118 ms for the
second (BENCHMARKS.md, "Start-up"), with MLX's compiled kernels on disk (parallm/_mlx_env.py).
"""
from __future__ import annotations

import logging
import time
from parallm.engine.engine import _vocab_size
from parallm.engine.types import EngineRequest, SamplingParams
from parallm.models.device import computing_on_cuda

log = logging.getLogger(__name__)

_GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
_SAMPLED = SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, top_k=20, min_p=0.05,
                          repetition_penalty=1.1, presence_penalty=0.1, frequency_penalty=0.1,
                          logprobs=True, top_logprobs=2, ignore_eos=True, seed=0)


def warm_up(engine) -> float:
    """Run the warm-up requests through `engine` (idle, on its own thread); returns seconds taken."""
    started = time.monotonic()
    vocab = max(2, _vocab_size(engine.loaded))
    limit = max(8, engine.loaded.context_length // 4)

    def prompt(n: int, offset: int) -> list[int]:
        return [(offset + 7 * i) % (vocab - 1) + 1 for i in range(min(n, limit))]

    rounds = [[EngineRequest("warm-up-0", prompt(16, 3), _GREEDY)],
              [EngineRequest("warm-up-1", prompt(24, 5), _GREEDY),
               EngineRequest("warm-up-2", prompt(40, 11), _SAMPLED)]]
    if computing_on_cuda():
        rounds.append(_full_round(engine, prompt))
    for requests in rounds:
        for request in requests:
            engine.validate(request)
            engine.add_request(request)
        while engine.has_unfinished():
            engine.step()
    engine.reset_after_warm_up()
    seconds = time.monotonic() - started
    log.info("engine warmed up in %.1f s (%d rounds)", seconds, len(rounds))
    return seconds




def _full_round(engine, prompt) -> list[EngineRequest]:
    """Every row at once with a 128-token prompt and a few output tokens: the K/V buffers grow
    through each slot count a burst of clients makes them grow through, and MLX's CUDA allocator
    keeps freed buffers for reuse, so a burst finds them already made. Measured on an H200 (1B
    model, 64 x 128-token prompts, kernels already compiled): the first burst after this
    warm-up had a TTFT p99 of 182 ms, the second 118 ms."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    rows = min(engine.config.max_num_seqs, max(1, engine.scheduler.config.kv_budget_tokens // (128 + 8)))
    return [EngineRequest(f"warm-up-full-{i}", prompt(128, 50000 + 17 * i), params) for i in range(rows)]
