"""Through the real server (create_app) and the real engine (AsyncEngine on a tiny random Llama):
/metrics counts what was served, the request id round-trips, the access log has the tokens; and
`parallm serve` as a service runs it stops with exit 0 on SIGTERM."""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tiny_models import load_tiny
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from parallm.server.logging_setup import LogSettings, configure_logging

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir):
    return load_tiny(tiny_model_dir)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(all_samples, name, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in all_samples, f"{key} not in {[k for k in all_samples if k[0] == name]}"
    return all_samples[key]


def test_metrics_and_request_ids_through_the_real_server_and_engine(tiny_loaded):
    from parallm.engine.async_engine import AsyncEngine
    from parallm.server.app import create_app
    from parallm.server.config import ServerSettings

    stream = io.StringIO()
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in ("parallm", "uvicorn", "uvicorn.error")}
    configure_logging(LogSettings(format="json"), stream=stream)
    try:
        engine = AsyncEngine(tiny_loaded)
        app = create_app(engine, ServerSettings())
        sent = [("Hello there", 5), ("The quick brown fox jumps", 3), ("Hello there", 4)]
        usages = []
        with TestClient(app) as client:
            for i, (prompt, max_tokens) in enumerate(sent):
                r = client.post("/v1/completions", headers={"X-Request-Id": f"it-{i}"},
                                json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                      "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                assert r.headers["x-request-id"] == f"it-{i}"
                usages.append(r.json()["usage"])
            chat = client.post("/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "ignore_eos": True, "stream": True})
            assert chat.status_code == 200 and chat.headers["x-request-id"]
            assert client.get("/v1/models").status_code == 200
            scrape = client.get("/metrics")
            assert scrape.status_code == 200
            s = samples(scrape.text)
    finally:
        for n, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(n)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate

    m = {"model_name": "tiny"}
    n_requests = len(sent) + 1
    completion_tokens = sum(u["completion_tokens"] for u in usages) + 2
    assert [u["completion_tokens"] for u in usages] == [m_ for _, m_ in sent]  # ignore_eos: exact
    assert get(s, "parallm:generation_tokens_total", **m) == completion_tokens
    assert get(s, "parallm:prompt_tokens_total", **m) >= sum(u["prompt_tokens"] for u in usages)
    assert get(s, "parallm:request_success_total", finished_reason="length", **m) == n_requests
    for hist in ("time_to_first_token_seconds", "request_queue_time_seconds",
                 "e2e_request_latency_seconds", "request_prefill_time_seconds"):
        assert get(s, f"parallm:{hist}_count", **m) == n_requests, hist
    assert get(s, "parallm:e2e_request_latency_seconds_sum", **m) > 0
    assert get(s, "parallm:inter_token_latency_seconds_count", **m) == completion_tokens - n_requests
    assert get(s, "parallm:num_requests_running", **m) == 0
    assert get(s, "parallm:prefix_cache_queries_total", **m) >= 0
    assert get(s, "parallm:http_requests_total", method="POST", route="/v1/completions", status="200", **m) == 3
    assert get(s, "parallm:http_requests_total", method="GET", route="/v1/models", status="200", **m) == 1

    access = [json.loads(line) for line in stream.getvalue().splitlines() if '"parallm.access"' in line]
    by_id = {e["request_id"]: e for e in access}
    for i, usage in enumerate(usages):
        entry = by_id[f"it-{i}"]
        assert entry["route"] == "/v1/completions" and entry["status"] == 200
        assert (entry["prompt_tokens"], entry["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert "quick brown fox" not in stream.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parallm_serve_exits_0_on_sigterm(tiny_model_dir, tmp_path):
    """What launchd/systemd do on stop: SIGTERM, then wait. The server must drain and exit 0,
    or systemd's Restart=on-failure would restart it and launchd would log a crash."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PARALLM_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "parallm", "serve", "--model", str(tiny_model_dir),
                             "--served-model-name", "tiny", "--port", str(port), "--drain-timeout", "5",
                             "--log-format", "json"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={"X-Request-Id": "svc-1"},
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.headers["x-request-id"] == "svc-1"
        assert "parallm:request_success_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(e.get("request_id") == "svc-1" and e.get("logger") == "parallm.access" for e in lines), output


def test_requests_refused_before_routing_are_counted_with_their_status(tiny_loaded):
    """401 (API key) and 413 (body limit) are answered by middleware before the router runs: they
    are counted under `<unmatched>` with their status, and carry a request id."""
    from parallm.engine.async_engine import AsyncEngine
    from parallm.server.app import create_app
    from parallm.server.config import ServerSettings

    app = create_app(AsyncEngine(tiny_loaded), ServerSettings(api_key="k" * 20, max_body_bytes=1024))
    with TestClient(app) as client:
        denied = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
        too_big = client.post("/v1/completions", headers={"Authorization": "Bearer " + "k" * 20,
                                                          "Content-Type": "application/json"}, content=b"x" * 5000)
        s = samples(client.get("/metrics").text)
    assert denied.status_code == 401 and denied.headers["x-request-id"]
    assert too_big.status_code == 413 and too_big.headers["x-request-id"]
    m = {"model_name": "tiny"}
    assert get(s, "parallm:http_requests_total", method="POST", route="<unmatched>", status="401", **m) == 1
    assert get(s, "parallm:http_requests_total", method="POST", route="<unmatched>", status="413", **m) == 1
