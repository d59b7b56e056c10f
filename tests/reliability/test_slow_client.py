"""A client that reads its stream very slowly does not slow the others down.

The slow client asks for a long stream with 20 logprobs per token (megabytes of SSE), with a tiny
receive buffer, and reads a few hundred bytes at a time: the socket buffers fill and the server's
writes to it block. The other clients must finish about as fast as without it, while the slow one
is still far from done. The ratio is generous: this checks a behaviour (no head-of-line blocking
across requests), it is not a timing benchmark.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from .live import MODEL, serve
from .load import many_streams, stream_body

OTHERS = 4
OTHER_TOKENS = 150
GENEROUS_RATIO = 4.0
GRACE_S = 3.0


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    s = serve(tiny_model_dir, tmp_path_factory.mktemp("slow"), "--max-num-seqs", "8")
    yield s
    assert s.stop() == 0, s.log()


class SlowReader:
    """A raw-socket streaming client that reads `chunk` bytes every `pause` seconds."""

    def __init__(self, url: str, body: dict, chunk: int = 256, pause: float = 0.1):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
        self.sock.connect((host, int(port)))
        payload = json.dumps(body).encode()
        self.sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        self.chunk, self.pause = chunk, pause
        self.received = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            data = self.sock.recv(self.chunk)
            if not data:
                return
            self.received += data
            self._stop.wait(self.pause)

    @property
    def done(self) -> bool:
        return b"data: [DONE]" in self.received

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)


def timed_others(url: str) -> float:
    t0 = time.monotonic()
    outcomes = asyncio.run(many_streams(url, [stream_body(OTHER_TOKENS, prompt=f"other {i}") for i in range(OTHERS)]))
    assert all(o.complete for o in outcomes), [(o.status, o.transport_error, o.events[-2:]) for o in outcomes]
    return time.monotonic() - t0


def test_slow_reader_does_not_slow_the_others(server):
    baseline = timed_others(server.url)
    slow = SlowReader(server.url, {"model": MODEL, "prompt": "slow", "max_tokens": 1200, "ignore_eos": True,
                                   "stream": True, "logprobs": 20})
    try:
        deadline = time.monotonic() + 30
        while b"data: " not in slow.received:  # the slow stream is running
            assert time.monotonic() < deadline, bytes(slow.received[:300])
            time.sleep(0.05)
        time.sleep(1.0)  # let its socket buffers fill: from here on the server's writes to it block
        with_slow = timed_others(server.url)
        slow_progress = len(slow.received)
        assert not slow.done, "the slow client finished: the test did not make it slow"
    finally:
        slow.close()
    print(f"\nothers alone {baseline:.2f}s, beside the slow reader {with_slow:.2f}s; "
          f"slow reader had {slow_progress} bytes")
    assert with_slow <= GENEROUS_RATIO * baseline + GRACE_S, (baseline, with_slow)
    # the abandoned slow stream is aborted when its socket closes; the server ends idle
    deadline = time.monotonic() + 30
    while (h := server.health())["engine"]["num_running"] or h["server"]["in_flight"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.1)
