"""A 2-rank `parallm serve --distributed` job on loopback (ring backend), for tests.

The ranks are started the way `mlx.launch --backend ring` starts them locally: the same command per
rank with MLX_RANK and MLX_HOSTFILE (a JSON list of each rank's "ip:port" list). Starting them here
rather than through mlx.launch lets a test kill one rank by pid and read each rank's exit status
(mlx.launch reports 0 whatever its children do). Every process is killed on stop(), even after a
failed assertion.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    url: str
    ranks: list[subprocess.Popen]
    logs: list[Path]
    extra: dict = field(default_factory=dict)

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def wait_exit(self, rank: int, timeout: float) -> Optional[int]:
        try:
            return self.ranks[rank].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """SIGTERM to rank 0 (it drains, then sends SHUTDOWN to the others); whatever is still
        running after that gets SIGKILL."""
        if self.ranks[0].poll() is None:
            self.ranks[0].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.ranks:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.ranks:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def start_cluster(model_dir: Path, workdir: Path, *, size: int = 2, extra_args: tuple[str, ...] = (),
                  startup_timeout: float = 180.0) -> Cluster:
    port = free_port()
    hostfile = workdir / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(size)]))
    cmd = [sys.executable, "-m", "parallm", "serve", "--model", str(model_dir), "--port", str(port),
           "--distributed", "--distributed-backend", "ring", "--log-level", "warning", *extra_args]
    ranks, logs = [], []
    for rank in range(size):
        env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        log = workdir / f"rank{rank}.log"
        logs.append(log)
        with open(log, "wb") as f:
            ranks.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
    cluster = Cluster(f"http://127.0.0.1:{port}", ranks, logs)
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            dead = [r for r, p in enumerate(ranks) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"rank(s) {dead} exited during startup:\n" +
                                   "\n".join(f"--- rank {r}\n{cluster.log(r)[-3000:]}" for r in range(size)))
            try:
                if httpx.get(cluster.url + "/health", timeout=2).status_code == 200:
                    return cluster
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the distributed server did not come up in time")
            time.sleep(0.2)
    except BaseException:
        cluster.stop()
        raise
