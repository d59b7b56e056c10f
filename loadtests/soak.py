"""Bounded soak test: N minutes of mixed traffic against `parallm serve`, throughput and memory over time.

  # start `parallm serve` on a model (default: the built-in one), soak it 5 minutes
  python loadtests/soak.py --minutes 5 --concurrency 8
  python loadtests/soak.py --minutes 3 --model path/to/mlx-dir --serve-arg=--max-num-seqs=16
  # a server that is already running (RSS needs its pid)
  python loadtests/soak.py --url http://127.0.0.1:8000 --pid 12345 --minutes 5

The mix (weights with --mix): chat (non-streaming), stream (streaming completion), n (chat with
n=3), adapter (a request naming a LoRA adapter the server lists in /v1/models, when it has any),
abort (a stream the client cuts after its first chunk). Every --sample-s seconds it records the
requests and tokens finished in that window, the server's RSS and /health counters. A 429 is
counted as `rejected` (the server said "come back later", as it should under overload); anything
else that is not a complete answer is a failure: non-200, a dropped connection, a stream without
[DONE], a timeout.

Writes loadtests/out/soak-<timestamp>.json and .png (throughput and RSS over time).
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import httpx

OUT_DIR = Path(__file__).resolve().parent / "out"
REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("chat", "stream", "n", "adapter", "abort")
DEFAULT_MIX = "chat=3,stream=4,n=1,adapter=1,abort=2"


@dataclass
class Event:
    kind: str
    outcome: str  # ok | rejected | failed
    tokens: int
    finished_at: float
    error: str = ""


@dataclass
class Sample:
    t_s: float  # seconds since the soak started
    requests_per_s: float
    tokens_per_s: float
    rss_mib: Optional[float]
    in_flight: Optional[int]
    failures_so_far: int


@dataclass
class SoakReport:
    config: dict
    samples: list[Sample] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    by_kind: dict = field(default_factory=dict)
    failure_examples: list[str] = field(default_factory=list)


def rss_mib(pid: Optional[int]) -> Optional[float]:
    if pid is None:
        return None
    status = Path(f"/proc/{pid}/status")
    try:
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
        return int(out.stdout.strip()) / 1024
    except (OSError, ValueError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Optional[str], extra: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "parallm", "serve", "--port", str(port), "--log-level", "warning", *extra]
    if model:
        cmd += ["--model", model]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"parallm serve exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("parallm serve did not come up in 300 s")


class Soak:
    def __init__(self, url: str, model: str, adapters: list[str], mix: dict[str, float], max_tokens: int,
                 seed: int):
        self.url, self.model, self.adapters, self.max_tokens = url, model, adapters, max_tokens
        self.kinds = [k for k in KINDS if mix.get(k, 0) > 0 and (k != "adapter" or adapters)]
        self.weights = [mix[k] for k in self.kinds]
        self.rng = random.Random(seed)
        self.events: list[Event] = []

    def _prompt(self) -> str:
        return f"Soak request {self.rng.randrange(10**6)}: write a short note about the weather."

    async def one(self, client: httpx.AsyncClient, kind: str) -> Event:
        messages = [{"role": "user", "content": self._prompt()}]
        try:
            if kind in ("chat", "n", "adapter"):
                model = self.rng.choice(self.adapters) if kind == "adapter" else self.model
                r = await client.post("/v1/chat/completions", json={
                    "model": model, "messages": messages, "max_tokens": self.max_tokens, "n": 3 if kind == "n" else 1})
                if r.status_code == 429:
                    return Event(kind, "rejected", 0, time.monotonic())
                if r.status_code != 200:
                    return Event(kind, "failed", 0, time.monotonic(), f"{r.status_code}: {r.text[:200]}")
                body = r.json()
                if len(body["choices"]) != (3 if kind == "n" else 1):
                    return Event(kind, "failed", 0, time.monotonic(), f"{len(body['choices'])} choices")
                return Event(kind, "ok", body["usage"]["completion_tokens"], time.monotonic())
            cut = kind == "abort"
            body = {"model": self.model, "prompt": self._prompt(), "max_tokens": self.max_tokens * (4 if cut else 1),
                    "stream": True, "stream_options": {"include_usage": True}}
            tokens, done = 0, False
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code == 429:
                    return Event(kind, "rejected", 0, time.monotonic())
                if r.status_code != 200:
                    return Event(kind, "failed", 0, time.monotonic(), f"{r.status_code}: {(await r.aread())[:200]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if cut:
                        return Event(kind, "ok", 0, time.monotonic())  # hang up after the first chunk
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        return Event(kind, "failed", tokens, time.monotonic(), f"error event: {data[:200]}")
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            if not done:
                return Event(kind, "failed", tokens, time.monotonic(), "stream ended without [DONE]")
            return Event(kind, "ok", tokens, time.monotonic())
        except httpx.HTTPError as e:
            return Event(kind, "failed", 0, time.monotonic(), f"{type(e).__name__}: {e}")

    async def worker(self, client: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            event = await self.one(client, kind)
            self.events.append(event)
            if event.outcome == "rejected":
                await asyncio.sleep(1.0)  # honour Retry-After

    async def run(self, concurrency: int, seconds: float) -> None:
        until = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits) as client:
            await asyncio.gather(*[self.worker(client, until) for _ in range(concurrency)])


def sampler(soak: Soak, pid: Optional[int], every: float, start: float, stop: threading.Event,
            samples: list[Sample]) -> None:
    seen = 0
    last = start
    with httpx.Client(base_url=soak.url, timeout=30) as client:
        while not stop.wait(every):
            now = time.monotonic()
            window = soak.events[seen:]
            seen += len(window)
            ok = [e for e in window if e.outcome == "ok"]
            try:
                in_flight = client.get("/health").json()["server"]["in_flight"]
            except (httpx.HTTPError, KeyError, ValueError):
                in_flight = None
            samples.append(Sample(t_s=round(now - start, 1), requests_per_s=round(len(ok) / (now - last), 3),
                                  tokens_per_s=round(sum(e.tokens for e in ok) / (now - last), 2),
                                  rss_mib=rss_mib(pid), in_flight=in_flight,
                                  failures_so_far=sum(e.outcome == "failed" for e in soak.events)))
            last = now


def plot(report: SoakReport, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t_s / 60 for s in report.samples]
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a.plot(t, [s.tokens_per_s for s in report.samples], label="generated tokens/s")
    a2 = a.twinx()
    a2.plot(t, [s.requests_per_s for s in report.samples], color="tab:orange", label="requests/s")
    a.set_ylabel("tokens/s")
    a2.set_ylabel("requests/s")
    a.set_title(f"soak: {report.totals.get('ok', 0)} ok, {report.totals.get('rejected', 0)} rejected (429), "
                f"{report.totals.get('failed', 0)} failed")
    b.plot(t, [s.rss_mib or 0 for s in report.samples], color="tab:green")
    b.set_ylabel("server RSS (MiB)")
    b.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in KINDS:
            raise SystemExit(f"--mix: unknown kind {name!r}; known: {', '.join(KINDS)}")
        mix[name] = float(weight or 1)
    return mix


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="soak length (at most 24 h)")
    p.add_argument("--url", help="a running server (default: start `parallm serve`)")
    p.add_argument("--pid", type=int, help="the running server's pid, for RSS (with --url)")
    p.add_argument("--model", help="model spec for the server this script starts (default: the built-in model)")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `parallm serve` argument (repeatable)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--mix", default=DEFAULT_MIX, help=f"kind=weight,... (default {DEFAULT_MIX})")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-remote", action="store_true")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60:
        raise SystemExit("--minutes must be in (0, 1440]")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    proc = None
    if args.url:
        host = urlparse(args.url).hostname or ""
        if not args.allow_remote and host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise SystemExit(f"{args.url} is not loopback; pass --allow-remote to soak it")
        url, pid = args.url.rstrip("/"), args.pid
    else:
        serve_args = [a for arg in args.serve_arg for a in arg.split("=", 1)]
        proc, url = start_server(args.model, serve_args, args.out / f"soak-{stamp}-server.log")
        pid = proc.pid
    try:
        models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
        base = next(m["id"] for m in models if not m.get("parent"))
        adapters = [m["id"] for m in models if m.get("parent")]
        soak = Soak(url, base, adapters, parse_mix(args.mix), args.max_tokens, args.seed)
        report = SoakReport(config={**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                    "model": base, "adapters": adapters, "kinds": soak.kinds,
                                    "server_pid": pid, "started_server": proc is not None})
        start = time.monotonic()
        stop = threading.Event()
        rss_start = rss_mib(pid)
        thread = threading.Thread(target=sampler, args=(soak, pid, args.sample_s, start, stop, report.samples),
                                  daemon=True)
        thread.start()
        asyncio.run(soak.run(args.concurrency, args.minutes * 60))
        stop.set()
        thread.join(30)
        elapsed = time.monotonic() - start
        ok = [e for e in soak.events if e.outcome == "ok"]
        report.totals = {"seconds": round(elapsed, 1), "requests": len(soak.events), "ok": len(ok),
                         "rejected": sum(e.outcome == "rejected" for e in soak.events),
                         "failed": sum(e.outcome == "failed" for e in soak.events),
                         "tokens": sum(e.tokens for e in ok), "tokens_per_s": round(sum(e.tokens for e in ok) / elapsed, 2),
                         "rss_start_mib": rss_start, "rss_end_mib": rss_mib(pid),
                         "rss_max_mib": max((s.rss_mib or 0 for s in report.samples), default=None)}
        for kind in soak.kinds:
            events = [e for e in soak.events if e.kind == kind]
            report.by_kind[kind] = {o: sum(e.outcome == o for e in events) for o in ("ok", "rejected", "failed")}
        report.failure_examples = [f"{e.kind}: {e.error}" for e in soak.events if e.outcome == "failed"][:20]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = "killed"
    if proc is not None:
        report.totals["server_exit"] = exit_code
    json_path, png_path = args.out / f"soak-{stamp}.json", args.out / f"soak-{stamp}.png"
    json_path.write_text(json.dumps(asdict(report), indent=1))
    plot(report, png_path)
    print(json.dumps({"totals": report.totals, "by_kind": report.by_kind}, indent=1))
    for s in report.samples:
        print(f"t={s.t_s:7.1f}s  {s.requests_per_s:6.2f} req/s  {s.tokens_per_s:8.1f} tok/s  "
              f"RSS {s.rss_mib or 0:7.1f} MiB  in flight {s.in_flight}  failures {s.failures_so_far}")
    print(f"wrote {json_path} and {png_path}")
    return 1 if report.totals["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
