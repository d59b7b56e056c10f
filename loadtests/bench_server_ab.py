"""A/B of two parallm checkouts' HTTP servers under the same streaming load, interleaved.

Measures a change to the server path (parallm/server, the AsyncEngine handoff) against the code
before it: two `parallm serve` processes run side by side on one model, each importing parallm from
its own checkout (PYTHONPATH), and the same bench_serving level runs against A and B in turn
(ABBA order) for --reps pairs. Per pair it takes B/A throughput and A/B TTFT p50 (> 1: B better)
and prints their geometric means, so a noisy shared machine cancels out of the ratio. With
--a-args/--b-args the two servers can be one checkout with different settings.

  git archive <base-commit> | tar -x -C /tmp/base        # the "before" checkout
  python loadtests/bench_server_ab.py --model DIR --a /tmp/base --b . --concurrency 16,64 --reps 4
  python loadtests/bench_server_ab.py --model DIR --a . --b . --b-args "--gil-switch-interval-ms 1"
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import LevelResult, free_port, make_prompts, run_level  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"


def start_server(name: str, checkout: Path, model: str, port: int, max_num_seqs: int,
                 extra_args: str = "") -> subprocess.Popen:
    # the checkout first, then whatever the caller had (on the lent GPU, MLX's CUDA build lives there)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(checkout.resolve()), os.environ.get("PYTHONPATH", "")) if p))
    cmd = [sys.executable, "-m", "parallm", "serve", "--model", model, "--served-model-name", "bench",
           "--port", str(port), "--max-num-seqs", str(max_num_seqs), "--max-queue", str(4 * max_num_seqs),
           "--log-level", "warning", *shlex.split(extra_args)]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    log = open(OUT_DIR / f"ab-{name}.log", "w")
    # cwd = the checkout, so `-m parallm` imports that checkout's package first
    return subprocess.Popen(cmd, env=env, cwd=checkout, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy within {timeout}s")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(whole process, event-loop thread) CPU seconds so far, from /proc (Linux). The loop runs on
    the main thread, whose task id is the pid. CPU per token is steadier than wall-clock throughput
    on a machine shared with other work."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path: str) -> float:
        text = Path(path).read_text()
        fields = text[text.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / tick

    return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model dir both servers load")
    p.add_argument("--a", required=True, help="checkout root of the baseline (A)")
    p.add_argument("--b", required=True, help="checkout root of the candidate (B)")
    p.add_argument("--concurrency", default="16,64", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--reps", type=int, default=4, help="A/B pairs per level")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--a-args", default="", help="extra `parallm serve` arguments for A")
    p.add_argument("--b-args", default="", help="extra `parallm serve` arguments for B")
    p.add_argument("--client-procs", type=int, default=1, help="load-generator processes (bench_serving's)")
    args = p.parse_args()

    max_conc = max(args.concurrency)
    ports = [free_port(), free_port()]
    procs = [start_server(n, Path(c), args.model, port, max_conc, extra)
             for n, c, port, extra in zip("AB", (args.a, args.b), ports, (args.a_args, args.b_args))]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    loop = asyncio.new_event_loop()
    try:
        for url in urls:
            wait_healthy(url, 300)
            loop.run_until_complete(run_level("warm", url, "bench", 4, make_prompts(8, 8, 0), 8, "completions", 300))
        for conc in args.concurrency:
            runs: dict[int, list[LevelResult]] = {0: [], 1: []}
            cpu_us: dict[int, list[tuple[float, float]]] = {0: [], 1: []}  # (process, loop) CPU us per token
            for rep in range(args.reps):
                # new prompts per pair (the same for A and B): a repeated set would come from the prefix caches
                prompts = make_prompts(conc * args.requests_per_client, args.input_len, seed=1000 * conc + rep)
                for i in ((0, 1) if rep % 2 == 0 else (1, 0)):
                    cpu0 = cpu_seconds(procs[i].pid)
                    lv = loop.run_until_complete(run_level("AB"[i], urls[i], "bench", conc, prompts, args.output_len,
                                                           "completions", 300, client_procs=args.client_procs))
                    cpu1 = cpu_seconds(procs[i].pid)
                    tokens = max(lv.output_tokens, 1)
                    cpu_us[i].append((1e6 * (cpu1[0] - cpu0[0]) / tokens, 1e6 * (cpu1[1] - cpu0[1]) / tokens))
                    runs[i].append(lv)
                    print(f"  c={conc} {'AB'[i]} pair {rep}: {lv.throughput_tok_s:7.0f} tok/s  TTFT p50/p99 "
                          f"{lv.ttft_p50 * 1e3:5.0f}/{lv.ttft_p99 * 1e3:5.0f} ms  TPOT p50 {lv.tpot_p50 * 1e3:5.1f} ms  "
                          f"failures {lv.failures}  server CPU/token {cpu_us[i][-1][0]:.0f} us (loop {cpu_us[i][-1][1]:.0f} us)"
                          + (f"  engine {lv.ms_per_step:.2f} ms/step, {lv.rows_per_step:.1f} rows/step"
                             if lv.ms_per_step and lv.rows_per_step else "")
                          + (" (" + ", ".join(f"{k} {v:.2f}" for k, v in lv.phase_ms.items()) + ")"
                             if lv.phase_ms else ""), flush=True)
            a, b = runs[0], runs[1]
            thr = [y.throughput_tok_s / x.throughput_tok_s for x, y in zip(a, b)]
            ttft = [x.ttft_p50 / y.ttft_p50 for x, y in zip(a, b)]
            print(f"c={conc}: B/A throughput per pair {[round(r, 2) for r in thr]} geomean {geomean(thr):.2f}x; "
                  f"A/B TTFT p50 per pair {[round(r, 2) for r in ttft]} geomean {geomean(ttft):.2f}x", flush=True)
            for i in (0, 1):
                print(f"c={conc}: {'AB'[i]} server CPU per token: process {median([c[0] for c in cpu_us[i]]):.0f} us, "
                      f"event loop {median([c[1] for c in cpu_us[i]]):.0f} us (median of {args.reps})", flush=True)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())  # httpx streams left open by the last level
        loop.close()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
