"""Does CPU load elsewhere on the host slow the engine? The engine baseline of bench_serving.py
(an in-process AsyncEngine, no HTTP), run alternately on a quiet host and beside N "burner"
processes that each spin pure Python for --duty of every millisecond-scale period, the way the
load generator's processes and the server's event loop occupy cores during a server level.

Why: on the H200 the server's engine ran 0.71-0.92 of the baseline's throughput with the same
steps and the same batch occupancy (BENCHMARKS.md, "fifth session"), i.e. each of its steps took
longer, and moving the engine to a process of its own did not help. A decode step at this size is
bound by the host's single-thread speed (MLX dispatching ~300 kernels), and a server CPU's clock
drops as more of its cores are busy. If the engine slows beside burners that share nothing with
it (no GIL, no memory, no sockets), part of "server overhead" is the host, not the server.

  python loadtests/bench_engine_cpu_load.py --model DIR --burners 5 --duty 0.35 --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def burn(duty: float, stop) -> None:
    """Spin Python for `duty` of each 4 ms period, sleep for the rest, until stopped."""
    period = 0.004
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < duty * period:
            pass
        time.sleep(max(0.0, period - (time.perf_counter() - start)))


def cpu_mhz() -> list[float]:
    try:
        return [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    except OSError:
        return []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--burners", type=int, default=5)
    p.add_argument("--duty", type=float, default=0.35, help="share of each burner's time spent spinning")
    p.add_argument("--rounds", type=int, default=3, help="quiet/loaded pairs, order alternating")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args()

    import bench_serving
    from engine_baseline import load_engine, run_engine_level

    engine = load_engine(args.model, max_num_seqs=max(128, args.concurrency), max_queue=256)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    loop = asyncio.new_event_loop()
    ctx = multiprocessing.get_context("spawn")
    n = args.concurrency * args.requests_per_client
    loop.run_until_complete(run_engine_level(engine, tokenizer, args.concurrency,
                                             bench_serving.make_prompts(args.concurrency, args.input_len, 1),
                                             8, 120))  # warm: same shapes once before the clock
    rows = []
    for r in range(args.rounds):
        for loaded in ((False, True) if r % 2 == 0 else (True, False)):
            stop, procs = ctx.Event(), []
            if loaded:
                procs = [ctx.Process(target=burn, args=(args.duty, stop), daemon=True) for _ in range(args.burners)]
                for proc in procs:
                    proc.start()
                time.sleep(1.0)  # the burners are spinning before the clock starts
            mhz_before = cpu_mhz()
            lv = loop.run_until_complete(run_engine_level(
                # fresh prompts per level: with one set per round, the second level of a pair found
                # them in the prefix cache and ran ~4-5% faster whichever way it was loaded
                engine, tokenizer, args.concurrency, bench_serving.make_prompts(n, args.input_len, 100 + 2 * r + loaded),
                args.output_len, 120))
            mhz = cpu_mhz()
            stop.set()
            for proc in procs:
                proc.join(5)
            row = dict(round=r, burners=args.burners if loaded else 0, tok_s=round(lv.throughput_tok_s, 1),
                       ms_per_step=lv.ms_per_step and round(lv.ms_per_step, 3),
                       rows_per_step=lv.rows_per_step and round(lv.rows_per_step, 1),
                       ttft_p50_ms=round(1e3 * (lv.ttft_p50 or 0)), ttft_p99_ms=round(1e3 * (lv.ttft_p99 or 0)),
                       mean_mhz=round(sum(mhz) / len(mhz)) if mhz else None,
                       mean_mhz_before=round(sum(mhz_before) / len(mhz_before)) if mhz_before else None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    loop.run_until_complete(engine.shutdown())
    quiet = [r["tok_s"] for r in rows if not r["burners"]]
    busy = [r["tok_s"] for r in rows if r["burners"]]
    pairs = [b / q for q, b in zip(quiet, busy)]
    summary = dict(args=vars(args), cpu_count=os.cpu_count(), rows=rows,
                   loaded_over_quiet=[round(x, 3) for x in pairs])
    print(json.dumps({"loaded_over_quiet": summary["loaded_over_quiet"]}))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
