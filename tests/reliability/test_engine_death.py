"""A dead engine is loud: the cause is logged with its traceback, /health says 503 with the
reason, every request gets 503 engine_dead, and the process exits non-zero so that launchd or
systemd restarts it (unless --no-exit-on-engine-death)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from tests.server.conftest import free_port

from .live import MODEL, ROOT

DYING_SERVE = ROOT / "tests" / "reliability" / "dying_serve.py"


def start_dying(model_dir, log_path, *args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, str(DYING_SERVE), "serve", "--model", str(model_dir),
                                 "--served-model-name", MODEL, "--port", str(port), "--device", "cpu", *args],
                                cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)


def test_dead_engine_answers_503_logs_the_cause_and_exits_non_zero(short_model_dir, tmp_path):
    log_path = tmp_path / "serve.log"
    proc, url = start_dying(short_model_dir, log_path)
    try:
        first = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4}, timeout=30)
        assert first.status_code == 503, first.text
        assert first.json()["error"]["code"] == "engine_dead"
        assert "simulated device failure" in first.json()["error"]["message"]
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 503
        assert health.json()["status"] == "unhealthy"
        assert "simulated device failure" in health.json()["error"]
        later = httpx.post(url + "/v1/chat/completions", timeout=30,
                           json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert later.status_code == 503 and later.json()["error"]["code"] == "engine_dead"
        assert proc.wait(30) == 3  # EXIT_ENGINE_DIED, after the grace period
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text()
    assert "ERROR" in log and "died" in log
    assert "Traceback" in log and "RuntimeError: simulated device failure" in log


def test_no_exit_on_engine_death_keeps_answering_503(short_model_dir, tmp_path):
    proc, url = start_dying(short_model_dir, tmp_path / "serve.log", "--no-exit-on-engine-death")
    try:
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4}, timeout=30)
        assert r.status_code == 503
        time.sleep(7)  # past the grace period the default would exit after
        assert proc.poll() is None
        assert httpx.get(url + "/health", timeout=10).status_code == 503
    finally:
        proc.terminate()
        proc.wait(30)
