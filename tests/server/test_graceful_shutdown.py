"""SIGTERM: new requests get 503, the requests in flight finish, the process exits 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from tests.server.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def start(model_dir: Path, port: int, drain_timeout: float) -> subprocess.Popen:
    """`parallm serve` on the tiny model, as a user would run it."""
    proc = subprocess.Popen([sys.executable, "-m", "parallm", "serve", "--model", str(model_dir),
                             "--served-model-name", "tiny", "--port", str(port), "--device", "cpu",
                             "--drain-timeout", str(drain_timeout), "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not come up")


def stream_in_thread(url: str, body: dict, first_line: threading.Event, sink: list) -> threading.Thread:
    def run():
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            sink.append(r.status_code)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    sink.append(line[len("data: "):])
                    first_line.set()
        first_line.set()
    t = threading.Thread(target=run)
    t.start()
    return t


def sse_finish_reasons(lines: list) -> list:
    return [c["finish_reason"] for d in lines if isinstance(d, str) and d != "[DONE]"
            for c in json.loads(d)["choices"] if c["finish_reason"]]


def test_sigterm_drains_requests_in_flight_then_exits_0(tiny_model_dir):
    port = free_port()
    proc = start(tiny_model_dir, port, drain_timeout=120)
    base = f"http://127.0.0.1:{port}"
    try:
        first, sink = threading.Event(), []
        body = {"model": "tiny", "prompt": "drain me", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        t = stream_in_thread(base + "/v1/completions", body, first, sink)
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        # New work is refused with 503 (not a refused connection) while the stream goes on.
        deadline = time.monotonic() + 10
        while (r := httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1},
                               timeout=10)).status_code != 503:
            assert time.monotonic() < deadline, r.status_code
            time.sleep(0.05)
        assert r.json()["error"]["code"] == "draining"
        assert httpx.get(base + "/health").json()["status"] == "draining"
        assert t.is_alive() and sink[-1] != "[DONE]"  # the stream was still in flight when 503s began
        t.join(120)
        assert sink[0] == 200 and sink[-1] == "[DONE]"
        assert sse_finish_reasons(sink) == ["length"]  # it ran to its end, not cut off
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigint_past_the_drain_timeout_aborts_what_is_left_and_exits_0(tiny_model_dir):
    port = free_port()
    proc = start(tiny_model_dir, port, drain_timeout=0.2)
    base = f"http://127.0.0.1:{port}"
    try:
        first, sink = threading.Event(), []
        body = {"model": "tiny", "prompt": "too long", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        t = stream_in_thread(base + "/v1/completions", body, first, sink)
        assert first.wait(30)
        proc.send_signal(signal.SIGINT)
        t.join(60)
        assert sink[-1] == "[DONE]" and sse_finish_reasons(sink) == ["abort"]
        assert len(sink) - 2 < 2000  # status + [DONE] aside, it was cut short
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
