"""The server's own CPU cost per streamed token and per request, with no model behind it.

The server process runs parallm's real app (routes, serving layer, metrics, SSE, uvicorn) in front
of a paced fake engine: every --step-ms it hands one token to every running request in one
hand-over, as AsyncEngine does after each engine step. A bench_serving level streams through it,
and the server's CPU seconds over the level (time.process_time in the server) are divided by the
tokens and requests it served. On a GPU this cost is not free: the server's event loop shares the
GIL with the engine thread, so every microsecond here is one the engine may wait (BENCHMARKS.md).

CPU time per token is steadier than throughput on a shared machine, but the client shares the
cores, so compare code versions with --reps in the same session, not across sessions.

  python loadtests/profile_server_path.py --concurrency 64 --output-len 128 --reps 3
  python loadtests/profile_server_path.py --serve 8125   # just the server, e.g. for py-spy
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Optional

import httpx

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO_ROOT))
TOKENIZER_DIR = REPO_ROOT / "tests" / "assets" / "tok"


class PacedEngine:
    """An EngineClient that 'decodes' one token per request every step, for every running request
    at once. The tokens are real vocabulary pieces so the detokenized text has realistic lengths.

    With python_s > 0 a worker thread plays the engine the way a GPU engine uses the interpreter:
    per step it runs Python for python_s (building the step's graph, holding the GIL), then waits
    native_s with the GIL released (MLX dispatching and the device computing), then hands the
    outputs to the loop (with gil_slices > 1, the two alternate in that many pieces per step: a
    py-spy --gil profile of the H200 engine thread showed it holding the GIL ~22% of the time,
    most of the rest in mx.async_eval). Its steps per second, with and without HTTP load, say how
    much the server slows such an engine. Without it an asyncio task ticks every native_s."""

    def __init__(self, tokenizer, native_s: float, python_s: float = 0.0, context_length: int = 4096,
                 gil_slices: int = 1, handoff_before_native: bool = False):
        self._tokenizer = tokenizer
        self._native_s = native_s
        self._python_s = python_s
        self._gil_slices = max(1, gil_slices)
        self._handoff_before_native = handoff_before_native
        self._context_length = context_length
        self._streams: dict[str, tuple[asyncio.Queue, object]] = {}
        self._ticker: Optional[asyncio.Task] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._pieces = [tokenizer.decode([i]) for i in range(1000, 1256)]
        self.steps = 0
        self.engine_cpu_s = 0.0  # the worker thread's own CPU time, to leave out of the server's

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._python_s > 0:
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, args=(loop,), daemon=True)
                self._thread.start()
        elif self._ticker is None:
            self._ticker = loop.create_task(self._tick())

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.cancel()

    def _worker(self, loop: asyncio.AbstractEventLoop) -> None:
        slices = self._gil_slices
        while not self._stop.is_set():
            for i in range(slices):  # e.g. graph building between MLX calls that release the GIL
                end = time.perf_counter() + self._python_s / slices
                x = 0
                while time.perf_counter() < end:  # Python bytecode: holds the GIL but at forced switches
                    x += 1
                if self._handoff_before_native and i == slices - 1:
                    loop.call_soon_threadsafe(self._step_outputs)  # the loop streams while we dispatch
                time.sleep(self._native_s / slices)  # the GIL is free, as in mx.async_eval / a device wait
            self.engine_cpu_s = time.thread_time()
            if not self._handoff_before_native:
                loop.call_soon_threadsafe(self._step_outputs)

    def validate(self, request) -> None:
        from parallm.engine.errors import PromptTooLong
        total = len(request.prompt_token_ids) + request.sampling.max_tokens
        if total > self._context_length:
            raise PromptTooLong(len(request.prompt_token_ids), request.sampling.max_tokens, self._context_length)

    async def generate(self, request) -> AsyncIterator:
        """Delivers as AsyncEngine does: through its OutputCollector where this checkout has one
        (merging what a late consumer has not taken), else one output at a time from a queue."""
        from parallm.engine.types import RequestTimes
        self.validate(request)
        out = _collector()
        now = time.monotonic()
        self._streams[request.request_id] = (out, [request, 0, RequestTimes(arrival=now, first_scheduled=now)])
        try:
            while True:
                for item in await out.get():
                    yield item
                    if item.finished:
                        return
        finally:
            self._streams.pop(request.request_id, None)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._native_s)
            self._step_outputs()

    def _step_outputs(self) -> None:
        """One step's hand-over: one token to every running request (on the loop)."""
        from parallm.engine.types import RequestOutput, Usage
        self.steps += 1
        now = time.monotonic()
        for out, state in list(self._streams.values()):
            request, done, times = state
            done += 1
            state[1] = done
            last = done >= request.sampling.max_tokens
            if times.first_token is None:
                times.first_token = now
            if last:
                times.finished = now
            out.put(RequestOutput(
                request.request_id, text=self._pieces[done % 256], token_ids=[1000 + done % 256],
                finish_reason="length" if last else None, finished=last,
                usage=Usage(len(request.prompt_token_ids), done) if last else None,
                times=times if last else None))

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def stats(self):
        from parallm.engine.types import EngineStats
        return EngineStats(num_running=len(self._streams), steps=self.steps)

    def model_names(self) -> list[str]:
        return ["paced"]

    def adapter_parent(self, name: str):
        return None

    def adapter_infos(self) -> list:
        return []

    def tokenizer(self, model: str):
        return self._tokenizer

    def context_length(self, model: str) -> int:
        return self._context_length


class _QueueCollector:
    """OutputCollector's interface over an asyncio.Queue, for checkouts from before it existed."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self._queue.put_nowait(item)

    async def get(self) -> list:
        return [await self._queue.get()]


def _collector():
    try:
        from parallm.engine.output_collector import OutputCollector
    except ImportError:
        return _QueueCollector()
    return OutputCollector()


def serve(port: int, native_ms: float, python_ms: float, gil_switch_interval_ms=None, gil_slices: int = 1,
          handoff_before_native: bool = False, event_loop: str = "auto") -> None:
    from transformers import AutoTokenizer
    from parallm.server.app import create_app
    from parallm.server.config import ServerSettings
    from parallm.server.runner import run_server

    engine = PacedEngine(AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)), native_ms / 1000, python_ms / 1000,
                         gil_slices=gil_slices, handoff_before_native=handoff_before_native)
    settings = ServerSettings(port=port, max_num_seqs=1024, max_queue=1024)
    app = create_app(engine, settings)

    @app.get("/_cpu")
    async def cpu():  # the server's own CPU seconds so far (not the fake engine's), for the measuring side
        return {"process_time": time.process_time() - engine.engine_cpu_s, "steps": engine.steps,
                "time": time.perf_counter()}

    run_server(app, "127.0.0.1", port, drain_timeout=1.0, log_level="warning",
               gil_switch_interval_ms=gil_switch_interval_ms, event_loop=event_loop)


def measure(args) -> dict:
    from bench_serving import free_port, make_prompts, run_level

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--native-ms", str(args.native_ms),
                             "--python-ms", str(args.python_ms), "--gil-slices", str(args.gil_slices)]
                            + (["--handoff-before-native"] if args.handoff_before_native else [])
                            + ["--event-loop", args.event_loop]
                            + ([] if args.gil_switch_interval_ms is None
                               else ["--gil-switch-interval-ms", str(args.gil_switch_interval_ms)]), cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the paced server did not start")
            time.sleep(0.2)
        reps = []
        for rep in range(args.reps):
            prompts = make_prompts(args.concurrency * args.requests_per_client, args.input_len, seed=rep)
            idle = _engine_steps_per_s(url, 1.0)  # the engine with no requests: its own pace
            before = httpx.get(url + "/_cpu").json()
            level = asyncio.run(run_level("paced", url, "paced", args.concurrency, prompts, args.output_len,
                                          args.endpoint, 120.0, client_procs=args.client_procs))
            after = httpx.get(url + "/_cpu").json()
            cpu = after["process_time"] - before["process_time"]
            loaded = (after["steps"] - before["steps"]) / (after["time"] - before["time"])
            ok = level.requests - level.failures
            reps.append({"server_cpu_s": round(cpu, 4), "tokens": level.output_tokens, "requests": ok,
                         "server_cpu_us_per_token": round(1e6 * cpu / max(level.output_tokens, 1), 2),
                         "server_cpu_share": round(cpu / level.wall_s, 3), "client_cpu": level.client_cpu,
                         "engine_steps_per_s_idle": round(idle, 1), "engine_steps_per_s_loaded": round(loaded, 1),
                         "engine_pace_kept": round(loaded / idle, 3) if idle else None,
                         "ttft_p50_ms": round(1e3 * (level.ttft_p50 or 0), 1),
                         "ttft_p99_ms": round(1e3 * (level.ttft_p99 or 0), 1),
                         "tok_s": round(level.throughput_tok_s, 1), "failures": level.failures})
            print(json.dumps(reps[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    def median(key):
        values = sorted(r[key] for r in reps if r[key] is not None)
        return values[len(values) // 2] if values else None

    return {"args": vars(args), "reps": reps, "server_cpu_us_per_token_median": median("server_cpu_us_per_token"),
            "engine_pace_kept_median": median("engine_pace_kept"), "ttft_p99_ms_median": median("ttft_p99_ms")}


def _engine_steps_per_s(url: str, seconds: float) -> float:
    before = httpx.get(url + "/_cpu").json()
    time.sleep(seconds)
    after = httpx.get(url + "/_cpu").json()
    return (after["steps"] - before["steps"]) / (after["time"] - before["time"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, metavar="PORT", help="only run the paced server on PORT")
    p.add_argument("--native-ms", type=float, default=4.0,
                   help="per step, the fake engine's time with the GIL released (dispatch, device)")
    p.add_argument("--python-ms", type=float, default=3.0,
                   help="per step, its Python time holding the GIL (0: no engine thread, a loop timer)")
    p.add_argument("--gil-slices", type=int, default=1, help="split each step's Python and GIL-free time into "
                   "this many alternating pieces (the H200 engine thread takes the GIL back several times a step)")
    p.add_argument("--handoff-before-native", action="store_true", help="hand a step's outputs to the loop "
                   "before the step's last GIL-free piece instead of after it (the loop streams while the "
                   "engine dispatches)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--client-procs", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gil-switch-interval-ms", type=float, help="the server's --gil-switch-interval-ms "
                   "(default: Python's 5 ms)")
    p.add_argument("--event-loop", default="auto", choices=("auto", "asyncio", "uvloop"),
                   help="the server's --event-loop")
    p.add_argument("--out", help="write the JSON result here too")
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.native_ms, args.python_ms, args.gil_switch_interval_ms, args.gil_slices,
              args.handoff_before_native, args.event_loop)
        return 0
    result = measure(args)
    print(json.dumps({k: v for k, v in result.items() if k != "reps"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
