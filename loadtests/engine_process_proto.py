"""EXPERIMENT, not the product: parallm's HTTP server in one process, its Engine in another.

Question it answers: in `parallm serve` the event loop and the engine thread share one GIL, and
on a GPU the server keeps 0.80-0.89 of its own engine's throughput at 64 clients (BENCHMARKS.md).
Does the engine in a process of its own close that gap? This runs the real app (routes, serving
layer, SSE) in front of `RemoteEngine`, an EngineClient that sends requests and aborts over a pipe
to a child process running the real `Engine` step loop, which sends each step's outputs back.

What it leaves out (so it cannot replace AsyncEngine as it is): adapters, several models, the
registry, fine-tuning, draining with a deadline, the full validate() in the parent (the child
validates; its errors end the stream instead of a 4xx). Model dirs with a Hugging Face tokenizer only.

  python loadtests/engine_process_proto.py --model DIR --port 8130 &     # then, e.g.:
  python loadtests/bench_serving.py --url http://127.0.0.1:8130 --engine-baseline --model DIR \\
      --client-procs 4 --concurrency 64,64,64 --requests-per-client 4 --input-len 128 --output-len 128
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ---- the child: the engine's step loop -------------------------------------------------------------

def engine_main(model_dir: str, config: dict, requests, outputs) -> None:
    """Runs in the child. `requests` brings ("add", EngineRequest) / ("abort", id) / None (stop);
    `outputs` takes ("ready", context_length), ("out", [RequestOutput], EngineStats) per step and
    ("error", request_id, exception)."""
    import parallm  # noqa: F401  (BLAS preload and MLX environment before mlx)
    from parallm.engine.engine import Engine, EngineConfig
    from parallm.engine.warm_up import warm_up
    from parallm.models import load

    loaded = load(model_dir, device="auto", name="proto")
    engine = Engine(loaded, EngineConfig(**config))
    if engine.wants_warm_up():
        warm_up(engine)
    outputs.send(("ready", loaded.context_length))
    while True:
        # block for work only when idle; otherwise take what is queued and step
        while requests.poll(0 if engine.has_unfinished() else 0.1):
            message = requests.recv()
            if message is None:
                return
            kind, payload = message
            if kind == "add":
                try:
                    engine.validate(payload)
                    engine.add_request(payload)
                except Exception as e:  # noqa: BLE001 - typed errors go back to the stream
                    outputs.send(("error", payload.request_id, e))
            elif kind == "abort":
                outs = engine.abort(payload)
                if outs:
                    outputs.send(("out", outs, None))
        if engine.has_unfinished():
            result = engine.step()
            outputs.send(("out", result.outputs, engine.stats()))


# ---- the parent: an EngineClient over the pipes ----------------------------------------------------

class RemoteEngine:
    def __init__(self, model_dir: str, config: dict, name: str = "proto"):
        from transformers import AutoTokenizer

        self._model_dir = model_dir
        self._config = config
        self._name = name
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._context_length = 0
        self._streams: dict[str, Any] = {}  # request id -> OutputCollector
        self._stats = None
        self._process = None
        self._send = None
        self._send_lock = threading.Lock()
        self._dead: Optional[BaseException] = None

    async def start(self) -> None:
        if self._process is not None:
            return
        ctx = multiprocessing.get_context("spawn")  # the child owns the GPU; no fork after CUDA
        req_recv, self._send = ctx.Pipe(duplex=False)
        out_recv, out_send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=engine_main, args=(self._model_dir, self._config, req_recv, out_send),
                                    daemon=True, name="parallm-engine-process")
        self._process.start()
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        threading.Thread(target=self._reader, args=(loop, out_recv, ready), daemon=True).start()
        await ready

    def _reader(self, loop, conn, ready) -> None:
        """Receives (and unpickles) off the loop, hands each message to the loop in one callback."""
        try:
            while True:
                message = conn.recv()
                if message[0] == "ready":
                    self._context_length = message[1]
                    loop.call_soon_threadsafe(lambda: ready.done() or ready.set_result(None))
                else:
                    loop.call_soon_threadsafe(self._dispatch, message)
        except (EOFError, OSError) as e:
            self._dead = e
            loop.call_soon_threadsafe(self._fail_all, e)
            loop.call_soon_threadsafe(lambda: ready.done() or ready.set_exception(RuntimeError("engine died")))

    def _dispatch(self, message) -> None:
        kind = message[0]
        if kind == "out":
            _, outs, stats = message
            if stats is not None:
                self._stats = stats
            for out in outs:
                stream = self._streams.pop(out.request_id) if out.finished else self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
        elif kind == "error":
            _, request_id, error = message
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(error)

    def _fail_all(self, error: BaseException) -> None:
        from parallm.engine.errors import EngineDead
        for request_id in list(self._streams):
            self._streams.pop(request_id).put(EngineDead(f"The engine process died: {error!r}"))

    def _post(self, message) -> None:
        with self._send_lock:
            self._send.send(message)

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        if self._process is None:
            return
        for request_id in list(self._streams):
            self._post(("abort", request_id))
        self._post(None)
        await asyncio.get_running_loop().run_in_executor(None, self._process.join, 10.0)

    def validate(self, request) -> None:
        from parallm.engine.errors import EngineDead, PromptTooLong
        if self._dead is not None:
            raise EngineDead(f"The engine process died: {self._dead!r}")
        total = len(request.prompt_token_ids) + request.sampling.max_tokens
        if self._context_length and total > self._context_length:
            raise PromptTooLong(len(request.prompt_token_ids), request.sampling.max_tokens, self._context_length)

    async def generate(self, request) -> AsyncIterator:
        from parallm.engine.output_collector import OutputCollector
        self.validate(request)
        out = OutputCollector()
        self._streams[request.request_id] = out
        self._post(("add", request))
        try:
            while not out.closed:
                for item in await out.get():
                    yield item
        finally:
            if not out.closed:
                self._streams.pop(request.request_id, None)
                self._post(("abort", request.request_id))

    async def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def stats(self):
        from parallm.engine.types import EngineStats
        return self._stats or EngineStats()

    def model_names(self) -> list[str]:
        return [self._name]

    def adapter_parent(self, name: str):
        return None

    def adapter_infos(self) -> list:
        return []

    def tokenizer(self, model: str):
        return self._tokenizer

    def context_length(self, model: str) -> int:
        return self._context_length


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model dir with a Hugging Face tokenizer")
    p.add_argument("--served-model-name", default="bench")
    p.add_argument("--port", type=int, default=8130)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-queue", type=int, default=256)
    args = p.parse_args()

    from parallm.server.app import create_app
    from parallm.server.config import ServerSettings
    from parallm.server.runner import run_server

    engine = RemoteEngine(args.model, {"max_num_seqs": args.max_num_seqs, "max_queue": args.max_queue},
                          name=args.served_model_name)
    settings = ServerSettings(port=args.port, max_num_seqs=args.max_num_seqs, max_queue=args.max_queue)
    app = create_app(engine, settings)
    started = time.monotonic()
    print(f"engine_process_proto: serving {args.model} as {args.served_model_name} on port {args.port}", flush=True)
    run_server(app, "127.0.0.1", args.port, drain_timeout=5.0, log_level="warning")
    print(f"engine_process_proto: stopped after {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
