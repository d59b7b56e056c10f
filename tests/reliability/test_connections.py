"""Connections and streams: no client can hold the server by being slow, by opening many
connections, by sending huge headers, or by not reading its stream.

One `parallm serve` with small limits: headers within 1 s, at most 20 connections, a stream whose
client reads nothing for 3 s is aborted, 4 engine rows and no queue (so 4 held streams fill it).
The keep-alive timeout is 10 s, longer than uvicorn's default of 5 s, so the test can tell that
the setting reached uvicorn. Raw sockets play the clients that no HTTP library would be.
"""
from __future__ import annotations

import json
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from .live import MODEL, serve

HEADER_TIMEOUT_S = 1
MAX_CONNECTIONS = 20
HEALTH_RESERVE = 16  # parallm.server.connections.HEALTH_RESERVE
KEEP_ALIVE_S = 10
STALL_S = 3
ROWS = 4
PATIENCE_S = 30.0  # on top of the product's own timeouts: a loaded 2-core box can be slow to react


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    s = serve(tiny_model_dir, tmp_path_factory.mktemp("connections"), "--header-timeout", str(HEADER_TIMEOUT_S),
              "--max-connections", str(MAX_CONNECTIONS), "--keep-alive-timeout", str(KEEP_ALIVE_S),
              "--stream-stall-timeout", str(STALL_S), "--max-num-seqs", str(ROWS), "--max-queue", "0")
    yield s
    assert s.stop() == 0, s.log()


def connect(server, data: bytes = b"", rcvbuf: int = 0, mss: int = 0) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:  # before connect: the window the server sees
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if mss:  # small segments keep the server's kernel send buffer small, so its writes block early
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    sock.connect(("127.0.0.1", server.port))
    if data:
        sock.sendall(data)
    return sock


def ending(sock: socket.socket, wait: float) -> str:
    """How the server ended the connection within `wait` seconds: the status code it answered
    ("408", "431", ...), "closed" (no answer), "reset", or "open" (still open, nothing more)."""
    data = b""
    sock.settimeout(max(wait, 0.01))
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
        end = "closed"
    except socket.timeout:
        end = "open"
    except ConnectionResetError:
        end = "reset"
    finally:
        sock.close()
    if data and end != "open":
        return data.split(b" ", 2)[1].decode()
    return "open" if end == "open" else end


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length, read off a keep-alive connection."""
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(1 << 16)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(1 << 16)
    return data


def completion(server, **extra) -> httpx.Response:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **extra}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60)


def wait_until(predicate, what: str, patience: float = PATIENCE_S):
    deadline = time.monotonic() + patience
    while not (result := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return result


def wait_idle(server) -> dict:
    return wait_until(lambda: (h := server.health())["server"]["in_flight"] == 0
                      and h["engine"]["num_running"] == 0 and h, "requests still in flight")


# ---- headers ------------------------------------------------------------------------------------

def test_slowloris_connections_are_closed_after_the_header_timeout(server):
    """10 clients send their headers a byte every 0.2 s: each is answered 408 and closed once the
    header timeout has passed, and other clients are served meanwhile."""
    slow = [connect(server, b"GET /health HTTP/1.1\r\n") for _ in range(10)]
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert completion(server).status_code == 200
    drip = time.monotonic() + HEADER_TIMEOUT_S + 1
    while time.monotonic() < drip:  # keep dripping past the timeout: the drip must not reset it
        for sock in slow:
            try:
                sock.send(b"X")
            except OSError:
                pass  # already closed by the server
        time.sleep(0.2)
    deadline = time.monotonic() + PATIENCE_S
    endings = Counter(ending(sock, deadline - time.monotonic()) for sock in slow)
    print(f"\nslowloris: {dict(endings)}")
    assert set(endings) <= {"408", "closed", "reset"}, endings


def test_every_request_on_a_keep_alive_connection_gets_the_header_timeout(server):
    sock = connect(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # the second request never finishes its headers
    assert ending(sock, HEADER_TIMEOUT_S + PATIENCE_S) == "408"


def test_a_flood_of_unfinished_requests_past_the_cap(server):
    """200 connections each send `GET /he` and nothing more (the attack that locked everyone out
    once the process ran out of file descriptors). At the cap each new connection closes the
    oldest idle one, so at most MAX_CONNECTIONS of them stay open, /health and requests are served
    during the flood, and the survivors get 408 at the header timeout."""
    flood = [connect(server, b"GET /he") for _ in range(200)]
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert completion(server).status_code == 200
    deadline = time.monotonic() + HEADER_TIMEOUT_S + PATIENCE_S
    endings = Counter(ending(sock, deadline - time.monotonic()) for sock in flood)
    print(f"\nflood of 200: {dict(endings)}")
    assert set(endings) <= {"408", "closed"}, endings
    # most were closed unanswered to let newer ones in (all but the last MAX_CONNECTIONS, unless
    # the flood took longer than the header timeout to arrive)
    assert endings["closed"] >= 100, endings
    statuses = Counter(completion(server).status_code for _ in range(20))
    print(f"after the flood: {dict(statuses)}")
    assert statuses == {200: 20}


def test_at_the_cap_with_every_connection_busy_health_still_answers(server):
    """MAX_CONNECTIONS requests wait for their bodies (busy: none can be closed to make room).
    /health still answers (from a reserve of connections for it alone); other requests get a 503
    with Retry-After; once the busy ones go, requests are served again."""
    busy = []
    for _ in range(MAX_CONNECTIONS):
        sock = connect(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
        sock.settimeout(30)
        assert sock.recv(1 << 10).startswith(b"HTTP/1.1 100")  # headers read, the app waits for the body
        busy.append(sock)
    try:
        health = httpx.get(server.url + "/health", timeout=30)
        assert health.status_code == 200 and health.headers["connection"] == "close"
        refused = completion(server)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "too_many_connections" and refused.headers["retry-after"]
    finally:
        for sock in busy:
            sock.close()
    wait_until(lambda: completion(server).status_code == 200, "not served after the busy connections left")


@pytest.mark.parametrize("kind", ["40 KB whole", "1 MB", "20 MB unfinished"])
def test_oversized_headers_are_refused_cheaply(server, kind):
    """Headers past 32 KiB get a 431 (or, when the client is still sending, a reset) and are not
    buffered: 10 such connections at once do not grow the server's memory."""
    size = {"40 KB whole": 40_000, "1 MB": 1 << 20, "20 MB unfinished": 20 << 20}[kind]
    end = b"" if "unfinished" in kind else b"\r\n\r\n"
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + end
    before = server.rss_bytes()
    endings, still_open = Counter(), []
    for _ in range(10):  # all at once: what the server holds for them is measured before they go
        sock = connect(server)
        try:
            sock.sendall(request)
            still_open.append(sock)
        except (BrokenPipeError, ConnectionResetError):
            endings["reset"] += 1
            sock.close()
    grown = server.rss_bytes() - before
    deadline = time.monotonic() + HEADER_TIMEOUT_S + 10
    endings.update(ending(sock, deadline - time.monotonic()) for sock in still_open)
    print(f"\n{kind}: {dict(endings)}, RSS grew {grown / 2**20:.1f} MiB")
    assert set(endings) <= {"431", "reset"}, endings
    assert grown < 50 * 2**20
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(server):
    sock = connect(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    # still open past uvicorn's default (5 s): the setting is in force, not the default
    assert ending_after(sock, 6.0) == "open"
    assert ending(sock, KEEP_ALIVE_S + PATIENCE_S) == "closed"


def ending_after(sock: socket.socket, seconds: float) -> str:
    """'open' if the connection is still open, with nothing received, after `seconds`."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(1)
    except socket.timeout:
        return "open"
    return "data" if data else "closed"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/limits")
def test_the_open_files_limit_is_raised_to_the_hard_limit(server):
    line = next(line for line in Path(f"/proc/{server.proc.pid}/limits").read_text().splitlines()
                if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    print(f"\nserver's open files limit: soft {soft}, hard {hard}")
    assert soft == hard


# ---- streams ------------------------------------------------------------------------------------

# ~2.2 KB of SSE per token (20 top logprobs): 200 tokens are ~440 KB, far more than the socket
# buffers of a client with a 4 KiB window and 536-byte segments hold (~120 KB), so the server's
# writes block well before the end.
BIG_STREAM = {"model": MODEL, "messages": [{"role": "user", "content": "stall"}], "max_tokens": 200,
              "ignore_eos": True, "stream": True, "logprobs": True, "top_logprobs": 20}


def start_stream(server, rcvbuf: int) -> socket.socket:
    payload = json.dumps(BIG_STREAM).encode()
    return connect(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(payload) + payload, rcvbuf=rcvbuf, mss=536)


def test_readers_that_stop_reading_lose_their_rows_and_a_slow_reader_does_not(server):
    """4 clients fill every row and then read nothing: while they hold the rows others get 429;
    after the stall timeout their streams are aborted (no [DONE]), the rows and tickets are free
    and a new request is served. A client reading 8 KiB every 0.2 s is slower than the engine
    (the server waits on it for seconds) but moves, so it gets its whole stream."""
    wait_idle(server)
    stalled = [start_stream(server, rcvbuf=4096) for _ in range(ROWS)]
    try:
        wait_until(lambda: server.health()["server"]["in_flight"] == ROWS, "the streams were not admitted")
        assert completion(server).status_code == 429  # every row is held
        wait_until(lambda: completion(server).status_code == 200, "the stalled streams still hold their rows")
        idle = wait_idle(server)
        deadline = time.monotonic() + PATIENCE_S
        endings, done = Counter(), 0
        for sock in stalled:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            data, end = b"", "closed"
            try:
                while chunk := sock.recv(1 << 16):
                    data += chunk
            except socket.timeout:
                end = "open"
            except ConnectionResetError:
                end = "reset"
            endings[end] += 1
            done += b"data: [DONE]" in data
    finally:
        for sock in stalled:
            sock.close()
    print(f"\nstalled readers: {dict(endings)}, with [DONE]: {done}; /health after: {idle['engine']}")
    assert set(endings) <= {"closed", "reset"} and done == 0, (endings, done)

    slow = start_stream(server, rcvbuf=8192)
    slow.settimeout(PATIENCE_S)
    data, t0 = b"", time.monotonic()
    try:
        while chunk := slow.recv(8192):
            data += chunk
            if data.endswith(b"0\r\n\r\n"):  # the last chunk of the chunked body
                break
            time.sleep(0.2)
    finally:
        slow.close()
    print(f"slow reader: {len(data)} bytes in {time.monotonic() - t0:.1f} s")
    assert data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in data


# ---- both HTTP parsers, in this process -----------------------------------------------------------

async def hello_app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_both_parsers_keep_the_header_limits_and_the_cap(http):
    """The protocol classes alone, under uvicorn with a trivial app: httptools (what the server
    uses) and h11 (uvicorn's fallback when httptools is missing)."""
    import threading

    import uvicorn

    from parallm.server.connections import ConnectionLimits, Connections, protocol_class
    from tests.server.conftest import free_port

    limits = ConnectionLimits(header_timeout=HEADER_TIMEOUT_S, max_header_bytes=32 * 1024, keep_alive_timeout=5,
                              max_connections=4, stream_stall_timeout=STALL_S)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(hello_app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                       http=protocol_class(Connections(limits, cap=4), http),
                                       h11_max_incomplete_event_size=32 * 1024))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_until(lambda: uv.started, "uvicorn did not start")
    target = type("Target", (), {"port": port})()
    try:
        slow_end = ending(connect(target, b"GET / HTTP/1.1\r\nHost: x\r\n"), HEADER_TIMEOUT_S + PATIENCE_S)
        big = connect(target)
        try:
            big.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (4 << 20))
            big_end = ending(big, HEADER_TIMEOUT_S + 10)
        except (BrokenPipeError, ConnectionResetError):
            big_end = "reset"
        flood = [connect(target, b"GET /") for _ in range(8)]  # past the cap of 4
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.get("/").text == "ok"
        deadline = time.monotonic() + HEADER_TIMEOUT_S + PATIENCE_S
        flood_ends = Counter(ending(sock, deadline - time.monotonic()) for sock in flood)
    finally:
        uv.should_exit = True
        thread.join(30)
    print(f"\n{http}: partial headers {slow_end}, 4 MB header {big_end}, 8 past a cap of 4 {dict(flood_ends)}")
    assert slow_end == "408"
    assert big_end in ("431", "400", "reset")
    # the oldest idle ones were closed unanswered to let newer ones in; the rest got 408
    assert set(flood_ends) <= {"closed", "408"} and flood_ends["closed"] >= 4, flood_ends


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resource limits as on Linux")
def test_importing_mlx_lm_does_not_lower_the_open_files_limit():
    """mlx_lm.utils sets (2048, 4096) at import; the server imports it without that."""
    import subprocess

    code = ("import resource; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (3000, hard)); "
            "from parallm.server.connections import import_mlx_lm_keeping_file_limit; "
            "import_mlx_lm_keeping_file_limit(); import mlx_lm.utils; "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE) == (3000, hard))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
