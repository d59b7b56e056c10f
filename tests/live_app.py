"""Run a FastAPI app under uvicorn on a thread, on loopback, for tests that need a real socket."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_app_in_thread(app, port: int, timeout: float = 30.0) -> tuple[uvicorn.Server, threading.Thread]:
    """Start uvicorn serving `app` on 127.0.0.1:port; return once it accepts connections.
    Stop it with `server.should_exit = True; thread.join()`."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    return server, thread
