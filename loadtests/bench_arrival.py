"""What the HTTP path's arrival pattern costs the engine, and whether --prefill-wait-steps wins it back.

The engine baseline of bench_serving.py (an in-process AsyncEngine, closed-loop clients, no HTTP)
run two ways: "plain" (a finished client resubmits at once, so a wave of prompts reaches the engine
in one step) and "gated" (every request first passes one gate held --admission-ms, so a wave
trickles in one request at a time, as through a server that spends that long per request). Each
on two engines loaded side by side: one that admits at once and one with prefill_wait_steps = N.
Levels alternate between the four combinations so that the machine's drift hits them alike.

Why: on the H200 the server's engine ran 0.65-0.92 of the baseline with the same steps and batch
occupancy but slower steps (BENCHMARKS.md, "fifth session"). If gated/plain shows the same loss,
the arrival pattern is the cause (every step that admits a prompt runs a whole prefill pass); if
the wait-N engine's gated level recovers it, the remedy is a scheduling default.

  python loadtests/bench_arrival.py --model DIR --admission-ms 2.5 --wait-steps 4 --rounds 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def host_clock() -> tuple[float, float, float]:
    """(wall, this process's CPU seconds, the machine's steal seconds). Steal is the time a VM's
    vCPUs were ready but the hypervisor ran something else: on a lent machine, a cause of slower
    steps that neither the engine nor the server controls. CPU seconds per step that grow with
    the wall time per step say instead that the same work ran slower."""
    steal = 0.0
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        steal = int(fields[8]) / os.sysconf("SC_CLK_TCK")  # "cpu  user nice system idle iowait irq softirq steal"
    except (OSError, IndexError, ValueError):
        pass
    return time.perf_counter(), time.process_time(), steal


async def run(args) -> list[dict]:
    import bench_serving
    from engine_baseline import level_row, load_engine, run_engine_level

    engines = {w: load_engine(args.model, max_num_seqs=args.max_num_seqs, max_queue=4 * args.concurrency,
                              prefill_wait_steps=w) for w in (0, args.wait_steps)}
    tokenizer = engines[0].tokenizer("bench")
    for engine in engines.values():  # warm: the same shapes once before any clock
        await run_engine_level(engine, tokenizer, args.concurrency,
                               bench_serving.make_prompts(args.concurrency, args.input_len, 1), 8, 300)
    combos = [(w, a) for w in engines for a in (0.0, args.admission_ms / 1e3)]
    rows, level = [], 0
    for r in range(args.rounds):
        for wait, admission in (combos if r % 2 == 0 else list(reversed(combos))):
            engine = engines[wait]
            level += 1
            prompts = bench_serving.make_prompts(args.concurrency * args.requests_per_client, args.input_len,
                                                 100 + level)  # fresh prompts: no prefix-cache hits
            clock0 = host_clock()
            lv = await run_engine_level(engine, tokenizer, args.concurrency, prompts, args.output_len, 300,
                                        admission_s=admission)
            wall, cpu, steal = (b - a for a, b in zip(clock0, host_clock()))
            row = dict(round=r, wait_steps=wait, admission_ms=round(admission * 1e3, 2), **level_row(lv),
                       cpu_ms_per_step=lv.engine_steps and round(1e3 * cpu / lv.engine_steps, 2),
                       cpu_of_wall=round(cpu / wall, 2), steal_s=round(steal, 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for engine in engines.values():
        await engine.shutdown()
    return rows


def main() -> int:
    from engine_baseline import add_level_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--admission-ms", type=float, default=2.5, help="gap between gated requests (a server's "
                   "per-request cost: 2.6-3.4 ms measured on the H200 host)")
    p.add_argument("--wait-steps", type=int, default=4, help="prefill_wait_steps of the second engine")
    p.add_argument("--rounds", type=int, default=2)
    add_level_arguments(p)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args()
    import parallm  # noqa: F401  (BLAS preload and the MLX environment before mlx)

    rows = asyncio.run(run(args))

    def mean_tok_s(wait, gated):
        xs = [r["tok_s"] for r in rows if r["wait_steps"] == wait and (r["admission_ms"] > 0) == gated]
        return sum(xs) / len(xs)

    summary = {f"gated/plain wait={w}": round(mean_tok_s(w, True) / mean_tok_s(w, False), 3)
               for w in (0, args.wait_steps)}
    summary[f"gated wait={args.wait_steps} / plain wait=0"] = round(mean_tok_s(args.wait_steps, True)
                                                                     / mean_tok_s(0, False), 3)
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
