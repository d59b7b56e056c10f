"""Connections: what one client connection may cost the server, enforced in uvicorn's protocol.

A client must send a request's headers within `header_timeout` (on every request of a keep-alive
connection, too) and in at most `max_header_bytes`; an idle keep-alive connection is closed after
`keep_alive_timeout` (uvicorn's own timer). Open connections are capped below the open-files
limit: at the cap, a new connection first evicts the oldest one that is not serving a request
(waiting for headers, or idle between requests); when every connection is busy, a few more are let
in for /health only, and past those a new one is reset at once. A response whose client has taken
no bytes for `stream_stall_timeout` seconds while the server waits to write is aborted, which ends
its request (an SSE stream's on_close frees its engine rows and admission ticket).

Everything is done in the protocol's callbacks, per connection or per request, never per chunk
written: the response path stays as cheap as uvicorn's. Stalls are found by one sweeper task that
runs only while some connection's writes are paused by flow control.
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
import sys
from dataclasses import dataclass
from typing import Optional

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is a dependency; without it uvicorn (and we) fall back to h11
    HttpToolsProtocol = None

log = logging.getLogger("parallm.server")

HEALTH_RESERVE = 16  # connections past the cap that may only ask for /health
FILE_RESERVE = 256  # open files kept for models, logs, the fine-tuning worker, outgoing sockets
MIN_CONNECTIONS = 64
OPEN_MAX = 10240  # macOS: the most a soft limit may be set to when the hard limit is unlimited


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float  # seconds to send a request's headers
    max_header_bytes: int  # the request line and headers, all together
    keep_alive_timeout: float  # seconds an idle keep-alive connection stays open
    max_connections: Optional[int]  # None: by the open-files limit
    stream_stall_timeout: float  # seconds a response may wait on a client that reads nothing; 0: forever

    @classmethod
    def from_settings(cls, settings) -> "ConnectionLimits":
        return cls(settings.header_timeout, settings.max_header_bytes, settings.keep_alive_timeout,
                   settings.max_connections, settings.stream_stall_timeout)


# ---- the open-files limit -----------------------------------------------------------------------

def import_mlx_lm_keeping_file_limit() -> None:
    """Import mlx_lm.utils without letting it set the open-files limit: it sets (2048, 4096) at
    import, which lowers the hard limit too (a server with a higher LimitNOFILE could then never
    raise its soft limit past 4096). Call before anything imports it; later imports are no-ops."""
    try:
        import resource
    except ImportError:  # Windows
        import mlx_lm.utils  # noqa: F401
        return
    real = resource.setrlimit

    def keep_open_files_limit(which, limits):
        if which != resource.RLIMIT_NOFILE:
            real(which, limits)

    resource.setrlimit = keep_open_files_limit
    try:
        import mlx_lm.utils  # noqa: F401
    finally:
        resource.setrlimit = real


def raise_file_limit() -> Optional[int]:
    """Raise the soft open-files limit to the hard one; the soft limit now in force (None: unknown).

    Runs after loading; `import_mlx_lm_keeping_file_limit` keeps mlx-lm from lowering the limits first.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_MAX if hard == resource.RLIM_INFINITY else hard
    for candidate in (target, min(target, OPEN_MAX)):
        if candidate <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (candidate, hard))
            break
        except (ValueError, OSError):  # macOS refuses more than kern.maxfilesperproc
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(requested: Optional[int], file_limit: Optional[int]) -> int:
    """Open connections allowed: `requested`, or the file limit less a reserve; never so many that
    the reserve for /health and the process's own files would run out of descriptors."""
    if file_limit is None:
        return requested or 1024
    most = max(MIN_CONNECTIONS, file_limit - FILE_RESERVE)
    if requested is None:
        return most
    if requested > most:
        log.warning("max_connections %d is more than the open-files limit (%d) leaves room for; using %d",
                    requested, file_limit, most)
        return most
    return requested


# ---- kernel send queue --------------------------------------------------------------------------

def _kernel_unsent(sock) -> int:
    """Bytes in the socket's kernel send queue (not yet acknowledged by the client); 0 if unknown."""
    try:
        if sys.platform.startswith("linux"):
            import fcntl
            import termios

            return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        if sys.platform == "darwin":
            return sock.getsockopt(0xFFFF, 0x1024)  # SOL_SOCKET, SO_NWRITE
    except (OSError, ValueError, AttributeError):
        pass
    return 0


def unsent_bytes(transport) -> int:
    """What the client has not taken yet: the transport's buffer plus the kernel's send queue. It
    only shrinks when the client reads (while writes are paused nothing is added to it)."""
    sock = transport.get_extra_info("socket")
    return transport.get_write_buffer_size() + (_kernel_unsent(sock) if sock is not None else 0)


# ---- raw answers, written by the protocol before any app runs -----------------------------------

def _raw_response(status: int, reason: str, code: str, message: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                 else "server_error", "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n").encode() + extra + b"\r\n" + body


HEADERS_TOO_LARGE = _raw_response(431, "Request Header Fields Too Large", "headers_too_large",
                                  "The request's headers are too large.")
HEADER_TIMEOUT = _raw_response(408, "Request Timeout", "header_timeout", "The request's headers took too long.")


class Refusal:
    """An ASGI app that answers every request with one error and closes the connection."""

    def __init__(self, status: int, code: str, message: str, retry_after: Optional[int] = None):
        self.status = status
        self.body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                          else "server_error", "param": None, "code": code}}).encode()
        self.headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode()),
                        (b"connection", b"close")]
        if retry_after is not None:
            self.headers.append((b"retry-after", str(retry_after).encode()))

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


AT_CAPACITY = Refusal(503, "too_many_connections", "The server has as many connections open as it allows; "
                      "retry shortly.", retry_after=1)
TOO_LARGE = Refusal(431, "headers_too_large", "The request's headers are too large.")


class HealthOnly:
    """The app as seen from a connection let in past the cap: GET/HEAD /health is answered (and the
    connection closed after it, to free the reserve); anything else gets a 503 with Retry-After."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/health" or scope["method"] not in ("GET", "HEAD"):
            await AT_CAPACITY(scope, receive, send)
            return

        async def send_closing(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


# ---- the server's book of connections -----------------------------------------------------------

class Connections:
    """Counts the open connections against the cap, keeps the idle ones in age order (the first to
    evict), and sweeps the connections whose writes are paused for clients that stopped reading."""

    def __init__(self, limits: ConnectionLimits, cap: int, health_reserve: int = HEALTH_RESERVE):
        self.limits = limits
        self.cap = cap
        self.health_reserve = health_reserve
        self.open = 0
        self.idle: dict = {}  # protocol -> None, oldest first (dicts keep insertion order)
        self.paused: dict = {}  # protocol -> [since, unsent bytes then]
        self._sweeper: Optional[asyncio.Task] = None

    def admit(self, protocol) -> Optional[str]:
        """Count a new connection in: "ok", "health" (past the cap: /health only) or None (refuse)."""
        if self.open >= self.cap and self.idle:
            oldest = next(iter(self.idle))
            log.debug("at %d connections: closing the oldest idle one", self.open)
            oldest.drop(None)
        if self.open >= self.cap + self.health_reserve:
            return None
        self.open += 1
        return "ok" if self.open <= self.cap else "health"

    def forget(self, protocol) -> None:
        self.open -= 1
        self.idle.pop(protocol, None)
        self.paused.pop(protocol, None)

    def write_paused(self, protocol) -> None:
        if self.limits.stream_stall_timeout <= 0:
            return
        self.paused[protocol] = [protocol.loop.time(), unsent_bytes(protocol.transport)]
        if self._sweeper is None:
            self._sweeper = protocol.loop.create_task(self._sweep(protocol.loop))

    async def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        timeout = self.limits.stream_stall_timeout
        interval = min(1.0, max(0.05, timeout / 4))
        try:
            while self.paused:
                await asyncio.sleep(interval)
                now = loop.time()
                for protocol, mark in list(self.paused.items()):
                    unsent = unsent_bytes(protocol.transport)
                    if unsent < mark[1]:  # the client took some bytes: not stalled
                        mark[0], mark[1] = now, unsent
                    elif now - mark[0] >= timeout:
                        log.warning("client %s read nothing for %.0f s: closing its connection",
                                    _peer(protocol), now - mark[0])
                        protocol.drop(None)
        finally:
            self._sweeper = None


def _peer(protocol) -> str:
    return "%s:%d" % protocol.client if protocol.client else "?"


# ---- the protocol -------------------------------------------------------------------------------

class _Guarded:
    """Mixed into uvicorn's HTTP protocol classes (first in the MRO). `book` is set on the class
    made for one server by protocol_class(). A request's headers are pending while _header_timer is
    set: from the connection's start, and from the first byte of each later request."""

    book: Connections

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._header_bytes = 0
        self._counted = False
        admitted = self.book.admit(self)
        if admitted is None:
            log.debug("refusing connection from %s: %d open", _peer(self), self.book.open)
            transport.abort()
            return
        self._counted = True
        if admitted == "health":
            self.app = HealthOnly(self.app)
        self._await_headers()

    def connection_lost(self, exc) -> None:
        self._release()
        super().connection_lost(exc)

    def _release(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._counted:
            self._counted = False
            self.book.forget(self)

    def drop(self, response: Optional[bytes]) -> None:
        """Close now: write `response` first if given; what the client has not read is discarded."""
        self._release()
        if response is not None and not self.transport.is_closing():
            self.transport.write(response)
        if self.transport.get_write_buffer_size():
            # close() (ours, or uvicorn's after a last response) would wait for a client that does not read
            self.transport.abort()
        elif not self.transport.is_closing():
            self.transport.close()

    def _await_headers(self) -> None:
        if self._header_timer is None and self._counted:
            self._header_timer = self.loop.call_later(self.book.limits.header_timeout, self._headers_too_slow)
            self._header_bytes = 0
            self.book.idle.pop(self, None)
            self.book.idle[self] = None  # the newest

    def _headers_done(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
            self.book.idle.pop(self, None)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        log.debug("client %s sent no complete headers in %.1f s", _peer(self), self.book.limits.header_timeout)
        self.drop(HEADER_TIMEOUT if self._header_bytes else None)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None:
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:  # a request body, or pipelined bytes
                super().data_received(data)
                return
            self._await_headers()  # the first bytes of the next request on a keep-alive connection
        self._header_bytes += len(data)
        super().data_received(data)
        if self._header_timer is not None and self._header_bytes > self.book.limits.max_header_bytes:
            log.debug("client %s sent more than %d bytes of headers", _peer(self), self.book.limits.max_header_bytes)
            self.drop(HEADERS_TOO_LARGE)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None and self._counted:  # idle until the next request
            self.book.idle[self] = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._counted:
            self.book.write_paused(self)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.book.paused.pop(self, None)


if HttpToolsProtocol is not None:
    class GuardedHttpTools(_Guarded, HttpToolsProtocol):
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._await_headers()  # also a pipelined request that begins while one is answered

        def on_headers_complete(self) -> None:
            self._headers_done()
            # Headers that arrived whole in one read were not counted against the cap as they came.
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size <= self.book.limits.max_header_bytes:
                super().on_headers_complete()
                return
            app, self.app = self.app, TOO_LARGE  # uvicorn runs self.app for this request
            try:
                super().on_headers_complete()
            finally:
                self.app = app


class GuardedH11(_Guarded, H11Protocol):
    """The h11 fallback: headers are complete when h11 hands over a request (a new cycle). h11
    itself refuses headers past h11_max_incomplete_event_size, which the runner sets too."""

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:
            self._headers_done()


def protocol_class(book: Connections, http: str = "auto") -> type:
    """uvicorn's `http=` for one server: its protocol class bound to `book`."""
    base = GuardedHttpTools if HttpToolsProtocol is not None and http != "h11" else GuardedH11
    return type(base.__name__, (base,), {"book": book})
