"""Servers for the reliability suite, and the checks every case shares.

Two kinds of server:
- `ServeProcess`: a real `python -m parallm serve` subprocess (what users run). Used where the
  process matters: load, memory (RSS of the server alone), SIGTERM.
- `FullServer`: create_app in this process (uvicorn in a thread) with every router the project
  has (OpenAI, files, fine-tuning, adapters), so that fuzzing, bad input, path safety and auth
  cover all routes, including those `parallm serve` does not mount yet.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx
import uvicorn

from tests.server.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"


# ---- a `parallm serve` subprocess --------------------------------------------------------------

@dataclass
class ServeProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        """Resident set size of the server process (Linux /proc; `ps` elsewhere)."""
        status = Path(f"/proc/{self.proc.pid}/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(self.proc.pid)], capture_output=True, text=True)
        return int(out.stdout.strip()) * 1024

    def health(self, timeout: float = 10.0) -> dict:
        return httpx.get(self.url + "/health", timeout=timeout).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def serve(model_dir: Path, log_dir: Path, *args: str, ready_timeout: float = 90.0) -> ServeProcess:
    """Start `parallm serve --model model_dir` on a free loopback port; wait until /health answers."""
    port = free_port()
    log_path = log_dir / f"serve-{port}.log"
    log_file = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "parallm", "serve", "--model", str(model_dir),
                             "--served-model-name", MODEL, "--port", str(port), "--device", "cpu",
                             "--log-level", "warning", *args],
                            cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    log_file.close()
    server = ServeProcess(proc, port, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"parallm serve exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"parallm serve did not come up:\n{server.log()}")


# ---- the full app in this process --------------------------------------------------------------

@dataclass
class FullServer:
    url: str
    app: object
    manager: object  # AdapterManager
    fine_tuning: object  # FineTuning (its runner is not started: jobs stay queued)
    root: Path  # everything the server may write lives under it
    adapters_dir: Path
    data_dir: Path
    server: uvicorn.Server = field(repr=False)
    thread: threading.Thread = field(repr=False)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def alive(self) -> bool:
        return httpx.get(self.url + "/health", timeout=30).status_code == 200

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.fine_tuning.shutdown()


def start_full_server(model_dir: Path, root: Path, **settings) -> FullServer:
    """create_app(engine, settings, routers=[files, fine-tuning, adapters]) on a free port."""
    from parallm.engine.adapter_manager import AdapterManager
    from parallm.engine.async_engine import AsyncEngine
    from parallm.engine.engine import EngineConfig
    from parallm.finetune import FineTuning
    from parallm.models import load
    from parallm.server.app import create_app
    from parallm.server.config import ServerSettings
    from parallm.server.routes_files import files_router
    from parallm.server.routes_fine_tuning import fine_tuning_router

    adapters_dir, data_dir = root / "adapters", root / "data"
    adapters_dir.mkdir(parents=True, exist_ok=True)
    loaded = load(str(model_dir), device="cpu", name=MODEL)
    manager = AdapterManager(MODEL, loaded.model, adapters_dir=adapters_dir)
    engine = AsyncEngine(loaded, EngineConfig(max_num_seqs=8, max_num_batched_tokens=128), adapters=manager)
    ft = FineTuning.open(data_dir, base_models={MODEL: str(model_dir)}, max_upload_bytes=64 * 1024,
                         on_adapter_ready=lambda name, path, base: manager.load(name, path, trusted=True),
                         worker_nice=0)
    port = free_port()
    app = create_app(engine, ServerSettings(port=port, **settings),
                     routers=[files_router(ft.files), fine_tuning_router(ft.jobs)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    return FullServer(f"http://127.0.0.1:{port}", app, manager, ft, root, adapters_dir, data_dir, server, thread)


# ---- shared checks -------------------------------------------------------------------------------

def assert_openai_error(response: httpx.Response, status: Optional[int] = None) -> dict:
    """A 4xx (or exactly `status`) whose body is {"error": {"message", "type", "param", "code"}}."""
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:500])
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    try:
        body = response.json()
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON: {response.text[:300]!r}") from None
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error


def sse_data(lines: list[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def finish_reasons(events: list[str]) -> list[str]:
    reasons = []
    for e in events:
        if e == "[DONE]":
            continue
        reasons += [c["finish_reason"] for c in json.loads(e).get("choices", []) if c.get("finish_reason")]
    return reasons


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()
