"""A client that reads its stream very slowly does not slow the others down.

The big client asks for a chat stream with n=16 and 20 top logprobs per token (megabytes of SSE).
Read slowly (tiny receive buffer, a few hundred bytes at a time), the socket buffers fill within
a few seconds (measured: ~2.8 MB queued on loopback, then the server's writes to it block). The
others' time beside the slow reader is compared with their time beside the same big request read
at full speed, so the engine work is the same in both and only the reading differs. The slow one
must still be far from done when the others finish. The ratio is generous: this checks a
behaviour (no head-of-line blocking across requests), it is not a timing benchmark.
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
GENEROUS_RATIO = 3.0
GRACE_S = 3.0
FILL_S = 4.0  # time for the big stream to fill the socket buffers (measured ~3 s to the cap)
BIG = {"model": MODEL, "messages": [{"role": "user", "content": "slow"}], "max_tokens": 1500, "ignore_eos": True,
       "stream": True, "logprobs": True, "top_logprobs": 20, "n": 16}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    s = serve(tiny_model_dir, tmp_path_factory.mktemp("slow"), "--max-num-seqs", "24")
    yield s
    assert s.stop() == 0, s.log()


class RawReader:
    """A raw-socket streaming chat client that reads `chunk` bytes every `pause` seconds."""

    def __init__(self, url: str, body: dict, chunk: int = 256, pause: float = 0.1):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
        self.sock.connect((host, int(port)))
        payload = json.dumps(body).encode()
        self.sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
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
            if self.pause:
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
    # a read timeout well under the test's patience: others stalled behind the slow reader fail
    outcomes = asyncio.run(many_streams(url, [stream_body(OTHER_TOKENS, prompt=f"other {i}") for i in range(OTHERS)],
                                        timeout=30))
    assert all(o.complete for o in outcomes), [(o.status, o.transport_error, o.events[-2:]) for o in outcomes]
    return time.monotonic() - t0


def others_beside(url: str, reader: RawReader) -> tuple[float, int, bool]:
    """(others' time, bytes the big reader had when they finished, whether it had finished)."""
    try:
        deadline = time.monotonic() + 30
        while b"data: " not in reader.received:  # the big stream is running
            assert time.monotonic() < deadline, bytes(reader.received[:300])
            time.sleep(0.05)
        time.sleep(FILL_S)
        elapsed = timed_others(url)
        return elapsed, len(reader.received), reader.done
    finally:
        reader.close()


def wait_idle(server) -> None:
    deadline = time.monotonic() + 60
    while (h := server.health())["engine"]["num_running"] or h["server"]["in_flight"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.1)


def test_slow_reader_does_not_slow_the_others(server):
    baseline, fast_bytes, _ = others_beside(server.url, RawReader(server.url, BIG, chunk=1 << 16, pause=0))
    wait_idle(server)
    with_slow, slow_bytes, slow_done = others_beside(server.url, RawReader(server.url, BIG))
    print(f"\nothers beside a fast reader {baseline:.2f}s, beside the slow reader {with_slow:.2f}s; "
          f"bytes read: fast {fast_bytes}, slow {slow_bytes}")
    assert with_slow <= GENEROUS_RATIO * baseline + GRACE_S, (baseline, with_slow)
    assert not slow_done and slow_bytes * 20 < fast_bytes, "the slow reader was not slow: the test proves nothing"
    wait_idle(server)  # the abandoned big stream is aborted when its socket closes


STALLED = {"model": MODEL, "messages": [{"role": "user", "content": "stall"}], "max_tokens": 400, "ignore_eos": True,
           "stream": True, "logprobs": True, "top_logprobs": 20, "n": 4, "temperature": 0}


def _dechunk(body: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body."""
    out, i = bytearray(), 0
    while True:
        j = body.index(b"\r\n", i)
        size = int(body[i:j].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[j + 2:j + 2 + size]
        i = j + 2 + size + 2


def _choices(sse: bytes) -> dict:
    """Per choice index: (content, the logprob tokens), from a chat stream's data events."""
    got: dict = {}
    for line in sse.decode().splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[6:]).get("choices", []):
            text, tokens = got.get(choice["index"], ("", []))
            text += choice["delta"].get("content") or ""
            tokens += [lp["token"] for lp in ((choice.get("logprobs") or {}).get("content") or [])]
            got[choice["index"]] = (text, tokens)
    return got


def test_a_reader_that_stalls_while_the_engine_finishes_loses_nothing(server):
    """The client reads nothing until the engine has generated every token (its socket buffers full,
    the outputs held and merged in the request's OutputCollector), then reads it all: the same
    text and logprobs as a client that read along."""
    import httpx

    with httpx.stream("POST", server.url + "/v1/chat/completions", json=STALLED, timeout=60) as r:
        along = _choices(b"".join(line.encode() + b"\n" for line in r.iter_lines()))
    wait_idle(server)
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    try:
        payload = json.dumps(STALLED).encode()
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        deadline = time.monotonic() + 60
        steps = server.health()["engine"]["steps"]
        while (h := server.health()["engine"])["num_running"] or h["steps"] == steps:  # generating, unread
            assert time.monotonic() < deadline, h
            time.sleep(0.1)
        received = bytearray()
        while chunk := sock.recv(1 << 16):
            received += chunk
    finally:
        sock.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    stalled = _choices(_dechunk(body))
    events = _dechunk(body).count(b"data: ")
    print(f"\nstalled read: {len(body)} bytes, {events} data events (1,600 tokens)")
    assert b"data: [DONE]" in body
    assert sorted(stalled) == [0, 1, 2, 3]
    assert stalled == along
    assert all(len(tokens) == 400 for _, tokens in stalled.values())
