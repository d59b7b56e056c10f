"""Pure ASGI middleware that guards the API before any route parses a body.

Pure ASGI (not BaseHTTPMiddleware) so that `receive` keeps delivering `http.disconnect` to the
routes: the serving layer watches it to abort requests whose client went away.
"""
from __future__ import annotations

import hmac
import json
from typing import Callable, Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parallm.engine.errors import EngineDraining

# Paths that need the API key and that a draining server refuses. /health stays open.
PROTECTED_PREFIX = "/v1/"


async def send_error(send: Send, status: int, message: str, *, type: str, code: str,
                     headers: Optional[dict[str, str]] = None) -> None:
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """Refuse bodies over `max_bytes` with 413, whether declared (Content-Length) or chunked.

    The body is read here, up to the limit, and replayed to the app; so a chunked upload that
    grows past the limit is cut off before anything parses it. After the replay, `receive` goes
    back to the server's, so disconnects still arrive.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, streamed_paths: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        # path prefix -> its own limit, for uploads: streamed through (never held in memory here)
        # and cut off once past that limit.
        self.streamed_paths = streamed_paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for prefix, limit in self.streamed_paths.items():
            if scope["path"].startswith(prefix):
                return await self._streamed(scope, receive, send, limit)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send, int(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected before the body was in
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(send, size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _streamed(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Pass the body through while counting; past `limit` the app sees a disconnect (so it stops
        reading and cleans up) and the client gets a 413, unless the app already answered."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(send, int(declared), limit)
        size, over, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal size, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the 413 below answers instead of whatever the app made of the cut-off
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._too_large(send, size, limit)

    async def _too_large(self, send: Send, size: int, limit: int | None = None) -> None:
        limit = self.max_bytes if limit is None else limit
        await send_error(send, 413, f"The request body ({size} bytes or more) exceeds the limit of "
                         f"{limit} bytes.", type="invalid_request_error", code="request_too_large")


class ApiKeyAuth:
    """Require `Authorization: Bearer <key>` on /v1/*; constant-time comparison."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = ("Missing API key: send 'Authorization: Bearer <key>'." if not given
                           else "Incorrect API key provided.")
                return await send_error(send, 401, message, type="authentication_error", code="invalid_api_key",
                                        headers={"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class DrainingGate:
    """While the server drains, new /v1/* requests get 503; requests already inside go on."""

    def __init__(self, app: ASGIApp, is_draining: Callable[[], bool]):
        self.app = app
        self.is_draining = is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX) and self.is_draining():
            err = EngineDraining()
            return await send_error(send, err.status, err.message, type=err.type, code=err.code,
                                    headers={"Retry-After": "5", "Connection": "close"})
        await self.app(scope, receive, send)
