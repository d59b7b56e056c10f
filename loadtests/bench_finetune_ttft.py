"""TTFT of chat requests while a fine-tuning job trains, against idle, on the full server.

    python loadtests/bench_finetune_ttft.py [--requests 6] [--no-priority] [--worker-nice 19]

One process serves the default model (create_app + AsyncEngine + the files/fine-tuning routers,
uvicorn on 127.0.0.1). It measures the time to the first streamed token of short chat requests,
sent one after another: idle, then while a job (24 rows, auto hyperparameters) trains, then
idle again. Serving priority: the runner's serving_busy is the server's in-flight count, so the
worker waits between steps while a request is in flight (--no-priority turns that off).
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's parallm
sys.path.insert(0, str(Path(__file__).resolve().parent))
import parallm  # noqa: E402,F401  (BLAS preload before mlx)

from bench_finetune import dataset_bytes  # noqa: E402


def ttft(client, model: str, question: str) -> float:
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=4, temperature=0, stream=True)
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
    return first if first is not None else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--no-priority", action="store_true", help="the worker does not wait between steps")
    parser.add_argument("--worker-nice", type=int, default=19, help="the worker's CPU niceness (default 19)")
    args = parser.parse_args()

    import openai
    import uvicorn
    from parallm.engine.async_engine import AsyncEngine
    from parallm.engine.engine import EngineConfig
    from parallm.finetune import FineTuning, JobRequest
    from parallm.models import load
    from parallm.server.app import create_app
    from parallm.server.config import ServerSettings
    from parallm.server.routes_files import files_router
    from parallm.server.routes_fine_tuning import fine_tuning_router

    loaded = load()
    engine = AsyncEngine(loaded, EngineConfig())
    data_dir = Path(tempfile.mkdtemp(prefix="parallm-ft-ttft-"))
    holder = {}
    busy = None if args.no_priority else (lambda: holder["app"].state.admission.in_flight > 0)
    ft = FineTuning.open(data_dir, base_models={loaded.name: loaded.name}, serving_busy=busy,
                         worker_nice=args.worker_nice)
    app = create_app(engine, ServerSettings(), routers=[files_router(ft.files), fine_tuning_router(ft.jobs)])
    holder["app"] = app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    ft.start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    model = loaded.name
    questions = [f"Say hello number {i}." for i in range(args.requests)]
    try:
        ttft(client, model, "warm up")
        idle_before = [ttft(client, model, q) for q in questions]
        f = client.files.create(file=("z.jsonl", dataset_bytes()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=model, training_file=f.id, seed=0)
        while not [e for e in client.fine_tuning.jobs.list_events(job.id, limit=5).data if e.type == "metrics"]:
            time.sleep(0.5)  # the worker has loaded and trains
        during = []
        for q in questions:
            if client.fine_tuning.jobs.retrieve(job.id).status != "running":
                break
            during.append(ttft(client, model, q))
            time.sleep(1.0)  # let a step or two run between requests
        client.fine_tuning.jobs.cancel(job.id)
        while ft.runner.current is not None:
            time.sleep(0.2)
        idle_after = [ttft(client, model, q) for q in questions]
    finally:
        ft.shutdown()
        server.should_exit = True
        thread.join(30)
        shutil.rmtree(data_dir, ignore_errors=True)
    idle = idle_before + idle_after
    med = statistics.median
    print(json.dumps({"idle_before_s": idle_before, "during_training_s": during, "idle_after_s": idle_after}))
    print(f"pause between steps: {'off' if args.no_priority else 'on'}, worker nice {args.worker_nice}; median TTFT idle {med(idle) * 1000:.0f} ms, "
          f"during training {med(during) * 1000:.0f} ms (n={len(during)}), ratio {med(during) / med(idle):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
