"""A live server on 127.0.0.1 (uvicorn in a thread, free port) for the real openai client."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
from live_app import free_port, run_app_in_thread  # noqa: F401  free_port is imported from here by other tests
import uvicorn

from parallm.server.app import create_app
from parallm.server.config import ServerSettings

from tests.conftest import TOKENIZER_DIR




@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    engine: object
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "server thread did not stop"


def start_server(engine, **settings) -> LiveServer:
    port = free_port()
    settings = ServerSettings(port=port, **settings)
    app = create_app(engine, settings)
    server, thread = run_app_in_thread(app, port)
    return LiveServer(url=f"http://127.0.0.1:{port}", engine=engine, app=app, server=server, thread=thread)


@pytest.fixture(scope="session")
def hf_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """The tiny random Llama through the real loader, named 'tiny'."""
    from parallm.models import load
    return load(str(tiny_model_dir), device="cpu", name="tiny")


def real_engine(loaded, **config):
    from parallm.engine.async_engine import AsyncEngine
    from parallm.engine.engine import EngineConfig
    return AsyncEngine(loaded, EngineConfig(**config))
