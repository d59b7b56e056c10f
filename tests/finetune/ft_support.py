"""Helpers for the fine-tuning tests: a small model, datasets, and a real HTTP server (uvicorn on
127.0.0.1 in a thread) around the files and fine-tuning routers, for the real openai client."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from tiny_models import write_tiny_llama
from parallm.finetune import FineTuning
from parallm.server.routes_files import files_router
from parallm.server.routes_fine_tuning import fine_tuning_router

TERMINAL = ("succeeded", "failed", "cancelled")


def write_small_model(path: Path) -> Path:
    """Smaller than the shared fixture (hidden 16): the vocab projection dominates CPU steps."""
    return write_tiny_llama(path, hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32, num_layers=2)


def text_rows(n: int) -> bytes:
    return "".join(json.dumps({"text": f"Zorbs are teal {i}."}) + "\n" for i in range(n)).encode()


def chat_rows(n: int) -> bytes:
    return "".join(json.dumps({"messages": [
        {"role": "user", "content": f"What colour are zorbs? ({i})"},
        {"role": "assistant", "content": "Zorbs are teal."}]}) + "\n" for i in range(n)).encode()


def open_fine_tuning(data_dir, **kwargs) -> FineTuning:
    """FineTuning.open for tests: the worker at normal CPU priority (the default, nice 19, would
    starve it on a busy shared test machine)."""
    kwargs.setdefault("worker_nice", 0)
    return FineTuning.open(data_dir, **kwargs)


def build_app(ft: FineTuning) -> FastAPI:
    app = FastAPI()
    app.include_router(files_router(ft.files))
    app.include_router(fine_tuning_router(ft.jobs))
    return app


class LiveServer:
    def __init__(self, app: FastAPI, lifespan: str = "off"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan=lifespan))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_for(predicate, timeout: float = 240.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
