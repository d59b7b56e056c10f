"""Client-side load for the reliability tests: many streams at once, a /health poller, outcomes
recorded per client (never raised), so a test can assert over all of them."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx

from .live import MODEL, finish_reasons


@dataclass
class StreamOutcome:
    status: Optional[int] = None  # None: no response (connection refused/reset)
    events: list[str] = field(default_factory=list)  # the data: payloads, [DONE] included
    headers: dict = field(default_factory=dict)
    body: bytes = b""  # for a non-200
    transport_error: Optional[str] = None  # a reset, a protocol error, a timeout
    finished_at: float = 0.0

    @property
    def complete(self) -> bool:
        return (self.status == 200 and self.transport_error is None and bool(self.events)
                and self.events[-1] == "[DONE]" and bool(finish_reasons(self.events)))


def stream_body(max_tokens: int, prompt: str = "Tell me a story", **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            **extra}


async def one_stream(client: httpx.AsyncClient, body: dict, *, cut_after_events: Optional[int] = None,
                     start: Optional[asyncio.Event] = None) -> StreamOutcome:
    """POST a streaming completion; read it all, or hang up after `cut_after_events` data events."""
    out = StreamOutcome()
    if start is not None:
        await start.wait()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            out.status, out.headers = r.status_code, dict(r.headers)
            if r.status_code != 200:
                out.body = await r.aread()
                return out
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    out.events.append(line[len("data: "):])
                    if cut_after_events is not None and len(out.events) >= cut_after_events:
                        return out  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as e:
        out.transport_error = f"{type(e).__name__}: {e}"
    finally:
        out.finished_at = time.monotonic()
    return out


async def many_streams(url: str, bodies: list[dict], *, cut_after_events: Optional[int] = None,
                       timeout: float = 120.0) -> list[StreamOutcome]:
    """All streams released at once (one event), each on its own connection."""
    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = asyncio.Event()
        tasks = [asyncio.ensure_future(one_stream(client, b, cut_after_events=cut_after_events, start=start))
                 for b in bodies]
        await asyncio.sleep(0.05)
        start.set()
        return list(await asyncio.gather(*tasks))


class HealthPoller:
    """Polls /health from its own thread and connection; records every answer's status and latency."""

    def __init__(self, url: str, interval: float = 0.05, timeout: float = 10.0):
        self.url, self.interval, self.timeout = url, interval, timeout
        self.statuses: list[Optional[int]] = []
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.max_running = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "HealthPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = client.get("/health")
                    self.statuses.append(r.status_code)
                    self.max_running = max(self.max_running, r.json()["engine"]["num_running"])
                except httpx.HTTPError as e:
                    self.statuses.append(None)
                    self.errors.append(f"{type(e).__name__}: {e}")
                self.latencies.append(time.monotonic() - t0)
                self._stop.wait(self.interval)
