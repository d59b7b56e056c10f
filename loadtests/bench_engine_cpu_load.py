"""Does other work on the host slow the engine, and which kind? The engine baseline of
bench_serving.py (an in-process AsyncEngine, no HTTP), run on a quiet host and beside N "burners"
of one kind at a time, each busy --duty of every millisecond-scale period, the way the load
generator's processes and the server's event loop occupy the host during a server level:
  spin     processes spinning pure Python (cores busy; nothing shared with the engine)
  memory   processes copying 64 MiB arrays (the host's caches and memory bandwidth)
  sockets  processes streaming small writes over loopback TCP, ~2,000 a second each, in bursts
           (the syscalls and softirqs of SSE traffic, as server and clients cause them)
  gil      one thread in the engine's own process spinning Python (the GIL, as an event loop
           that holds it for --duty of the time would take it; one thread whatever --burners says)
Kinds are interleaved in an order that reverses every round, so the machine's drift hits all alike.

Why: on the H200 the server's engine ran 0.71-0.92 of the baseline's throughput with the same
steps and the same batch occupancy (BENCHMARKS.md, "fifth session"), i.e. each of its steps took
longer, and moving the engine to a process of its own did not help. A decode step at this size is
bound by the host's single-thread speed (MLX dispatching ~300 kernels), and a server CPU's clock
drops as more of its cores are busy. If the engine slows beside burners that share nothing with
it (no GIL, no memory, no sockets), part of "server overhead" is the host, not the server.
Found on the H200 (BENCHMARKS.md, "sixth session"): the other way round. Every kind made the
engine faster than on the quiet host, loopback sockets by 1.16-1.60x: an idle VM is the slow case.

  python loadtests/bench_engine_cpu_load.py --model DIR --burners 5 --duty 0.35 --rounds 3
  python loadtests/bench_engine_cpu_load.py --model DIR --kinds quiet,spin,memory,sockets,gil --burners 4 \
      --duty 0.4 --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
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


def copy_memory(duty: float, stop) -> None:
    """Copy 64 MiB (more than a server CPU's last-level cache) for `duty` of each 4 ms period."""
    import numpy as np
    src, dst = np.ones(1 << 23), np.empty(1 << 23)  # 8 Mi float64 = 64 MiB each
    period = 0.004
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < duty * period:
            dst[:] = src[: dst.size]
        time.sleep(max(0.0, period - (time.perf_counter() - start)))


def stream_sockets(duty: float, stop) -> None:
    """Write bursts of 16 SSE-sized chunks over loopback TCP every 8 ms and read them back: the
    per-chunk syscalls and network softirqs of a server's streams (`duty` unused)."""
    server = socket.create_server(("127.0.0.1", 0))
    writer = socket.create_connection(server.getsockname())
    reader, _ = server.accept()
    writer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chunk = b"data: " + b"x" * 200 + b"\n\n"
    while not stop.is_set():
        start = time.perf_counter()
        for _ in range(16):
            writer.sendall(chunk)
            got = 0
            while got < len(chunk):
                got += len(reader.recv(65536))
        time.sleep(max(0.0, 0.008 - (time.perf_counter() - start)))


BURNERS = {"spin": burn, "memory": copy_memory, "sockets": stream_sockets}


def start_burners(kind: str, n: int, duty: float, ctx):
    """Start n burners of `kind`; returns the Event that stops them and what to join."""
    if kind == "gil":  # a thread of this process, as the server's one event loop: it contends for the GIL
        stop = threading.Event()
        workers = [threading.Thread(target=burn, args=(duty, stop), daemon=True)]
    else:
        stop = ctx.Event()
        workers = [ctx.Process(target=BURNERS[kind], args=(duty, stop), daemon=True) for _ in range(n)]
    for w in workers:
        w.start()
    return stop, workers


def cpu_mhz() -> list[float]:
    try:
        return [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    except OSError:
        return []


def main() -> int:
    from engine_baseline import add_level_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the model dir (not needed with --burn-only)")
    p.add_argument("--burn-only", metavar="KIND", help="only run --burners of KIND until stopped (SIGTERM), "
                   "e.g. beside a whole server run")
    p.add_argument("--burners", type=int, default=5)
    p.add_argument("--duty", type=float, default=0.35, help="share of each burner's time spent spinning")
    p.add_argument("--kinds", default="quiet,spin", help="comma list from quiet, spin, memory, sockets, gil")
    p.add_argument("--rounds", type=int, default=3, help="levels of every kind per round, order alternating")
    add_level_arguments(p)
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args()
    ctx = multiprocessing.get_context("spawn")
    if args.burn_only:
        if args.burn_only not in BURNERS:
            p.error(f"--burn-only takes one of {sorted(BURNERS)}")
        stop, workers = start_burners(args.burn_only, args.burners, args.duty, ctx)
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.is_set():
                time.sleep(0.2)
        except KeyboardInterrupt:
            stop.set()
        for w in workers:
            w.join(5)
        return 0
    if not args.model:
        p.error("--model is required")
    kinds = args.kinds.split(",")
    unknown = set(kinds) - {"quiet", "gil", *BURNERS}
    if unknown:
        p.error(f"unknown kinds: {sorted(unknown)}")

    import bench_serving
    from engine_baseline import level_row, load_engine, run_engine_level

    engine = load_engine(args.model, max_num_seqs=max(128, args.concurrency), max_queue=256)
    tokenizer = engine.tokenizer("bench")  # the engine's own: loading it a second time adds nothing
    loop = asyncio.new_event_loop()
    n = args.concurrency * args.requests_per_client
    loop.run_until_complete(run_engine_level(engine, tokenizer, args.concurrency,
                                             bench_serving.make_prompts(args.concurrency, args.input_len, 1),
                                             8, 120))  # warm: same shapes once before the clock
    rows, level = [], 0
    for r in range(args.rounds):
        for kind in (kinds if r % 2 == 0 else list(reversed(kinds))):
            level += 1
            stop, workers = None, []
            if kind != "quiet":
                stop, workers = start_burners(kind, args.burners, args.duty, ctx)
                time.sleep(1.0)  # the burners are running before the clock starts
            mhz_before = cpu_mhz()
            lv = loop.run_until_complete(run_engine_level(
                # fresh prompts per level: a repeated set is served partly from the prefix cache
                engine, tokenizer, args.concurrency, bench_serving.make_prompts(n, args.input_len, 100 + level),
                args.output_len, 120))
            mhz = cpu_mhz()
            if stop is not None:
                stop.set()
            for w in workers:
                w.join(5)
            row = dict(round=r, kind=kind, burners=len(workers), **level_row(lv),
                       mean_mhz=round(sum(mhz) / len(mhz)) if mhz else None,
                       mean_mhz_before=round(sum(mhz_before) / len(mhz_before)) if mhz_before else None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    loop.run_until_complete(engine.shutdown())
    # each kind against the quiet level of the same round (one ratio per round)
    quiet = {r["round"]: r["tok_s"] for r in rows if r["kind"] == "quiet"}
    over_quiet = {kind: [round(r["tok_s"] / quiet[r["round"]], 3) for r in rows if r["kind"] == kind]
                  for kind in kinds if kind != "quiet" and quiet}
    summary = dict(args=vars(args), cpu_count=os.cpu_count(), rows=rows, over_quiet=over_quiet)
    print(json.dumps({"over_quiet": over_quiet}))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
