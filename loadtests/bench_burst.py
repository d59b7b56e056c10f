"""Time to first token of a burst: N requests handed to the engine at once, in rounds.

The first round after start-up pays every one-off cost a new pass shape brings (on CUDA: cuDNN
attention graphs and GEMM plans per prefill shape, tens of ms each); later rounds run on shapes
already built. The gap between round 1 and round 2 is what a warm-up can still remove. MLX keeps
its graph and buffer caches for the life of the process, so each warm-up kind needs a process of
its own; its compiled CUDA kernels it keeps on disk (parallm/_mlx_env.py), so the first process on
a machine at these shapes also pays the compiles (tens of seconds): run one throwaway process
before comparing kinds.

    for w in none basic; do
        python loadtests/bench_burst.py --model DIR --burst 64 --input-len 128 --output-len 128 --warm-up $w
    done

No HTTP: the requests go straight into `Engine` from one thread; TTFT is taken when the step
loop hands back a request's first token. Prints one JSON object per round, with the process's
peak device memory. It also checks that the engine survives a burst as wide as its rows
(`--burst 256 --max-num-seqs 256`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parallm  # noqa: E402,F401  first: preloads an optimized BLAS before mlx loads
from bench_serving import percentile  # noqa: E402  the serving harness's p50/p99, so the two compare


def run_round(engine, burst: int, input_len: int, output_len: int, vocab: int, tag: str) -> dict:
    from parallm.engine.types import EngineRequest, SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    added = {}
    for i in range(burst):
        rid = f"{tag}-{i}"
        # a different first token per request, so no prompt is a prefix-cache hit of another
        ids = [(zlib.crc32(rid.encode()) + 7 * j) % (vocab - 1) + 1 for j in range(input_len)]
        request = EngineRequest(rid, ids, params)
        engine.validate(request)
        engine.add_request(request)
        added[rid] = time.perf_counter()
    first: dict[str, float] = {}
    steps, tokens = [], 0
    while engine.has_unfinished():
        t0 = time.perf_counter()
        result = engine.step()
        now = time.perf_counter()
        steps.append((now - t0, result.num_batched_tokens))
        for out in result.outputs:
            tokens += len(out.token_ids)
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = now - added[out.request_id]
    wall = time.perf_counter() - start
    ttft = list(first.values())
    slowest = sorted(steps, reverse=True)[:5]
    return {"ttft_p50_ms": round(1000 * percentile(ttft, 0.5), 1),
            "ttft_p99_ms": round(1000 * percentile(ttft, 0.99), 1),
            "ttft_max_ms": round(1000 * max(ttft), 1),
            "tok_s": round(tokens / wall, 1), "steps": len(steps), "answered": len(first),
            "slowest_steps_ms_tokens": [(round(1000 * s, 1), n) for s, n in slowest]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--burst", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--warm-up", default="basic", choices=["none", "basic"],
                   help="none, or the default warm-up (basic requests, and on CUDA a round of every row)")
    args = p.parse_args(argv)

    import mlx.core as mx

    from parallm.engine.engine import Engine, EngineConfig, _vocab_size
    from parallm.engine.warm_up import warm_up
    from parallm.models import load

    loaded = load(args.model, device="auto", name="bench")
    vocab = _vocab_size(loaded)
    kind = args.warm_up
    engine = Engine(loaded, EngineConfig(max_num_seqs=args.max_num_seqs,
                                         max_num_batched_tokens=args.max_num_batched_tokens))
    seconds = 0.0 if kind == "none" else warm_up(engine)
    for r in range(args.rounds):
        row = run_round(engine, args.burst, args.input_len, args.output_len, vocab, f"{kind}-{r}")
        print(json.dumps({"warm_up": kind, "warm_up_s": round(seconds, 2), "round": r + 1,
                          "device": str(mx.default_device()), "burst": args.burst,
                          "step_tokens": engine.max_num_batched_tokens, **row,
                          "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
