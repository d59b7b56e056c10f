"""deploy/nginx-parallm.conf in front of 2 parallm replicas: sessions stick, SSE streams pass.

Needs the nginx binary (skipped without it). The config is used as shipped, with only its
listen port and upstream addresses rewritten to this test's free ports.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.distributed.cluster import REPO, free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def _wait_up(url: str, procs: list, deadline: float) -> None:
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a process exited during startup")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def test_sessions_stick_to_one_replica_and_streams_pass(tiny_model_dir, tmp_path):
    ports = [free_port(), free_port()]
    front = free_port()
    conf = (REPO / "deploy" / "nginx-parallm.conf").read_text()
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;" for p in ports)
    conf = re.sub(r"(?:        server 127\.0\.0\.1:800[1-4][^\n]*\n)+", servers + "\n", conf)
    conf = conf.replace("listen 127.0.0.1:8000;", f"listen 127.0.0.1:{front};")
    assert conf.count(f"127.0.0.1:{ports[1]}") == 2  # both pools rewritten
    (tmp_path / "nginx.conf").write_text(conf)
    (tmp_path / "logs").mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = []
    try:
        for p in ports:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "parallm", "serve", "--model", str(tiny_model_dir), "--port", str(p),
                 "--served-model-name", "tiny", "--log-level", "warning"],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(
            [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "logs/error.log"),
             "-g", f"daemon off; pid {tmp_path}/nginx.pid;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 180
        for p in ports:
            _wait_up(f"http://127.0.0.1:{p}/health", procs, deadline)
        base = f"http://127.0.0.1:{front}"
        _wait_up(base + "/health", procs, deadline)

        body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0}
        for session in ("conv-a", "conv-b", "conv-c", "conv-d"):
            seen = set()
            for _ in range(3):
                r = httpx.post(base + "/v1/completions", json=body, headers={"X-Session-ID": session}, timeout=60)
                assert r.status_code == 200, r.text
                seen.add(r.headers["x-parallm-replica"])
            assert len(seen) == 1, f"session {session} moved between replicas: {seen}"
        free = {httpx.post(base + "/v1/completions", json=body, timeout=60).headers["x-parallm-replica"]
                for _ in range(8)}
        assert free <= {f"127.0.0.1:{p}" for p in ports}

        with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True, "max_tokens": 6},
                          headers={"X-Session-ID": "conv-a"}, timeout=60) as r:
            lines = [l for l in r.iter_lines() if l.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and any(l.startswith("data: {") for l in lines[:-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
