"""Pure ASGI middleware that guards the API before any route parses a body.

Pure ASGI (not BaseHTTPMiddleware) so that `receive` keeps delivering `http.disconnect` to the
routes: the serving layer watches it to abort requests whose client went away.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from typing import Callable, Optional

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parallm.engine.errors import EngineDraining

# Paths that need the API key and that a draining server refuses. /health stays open.
PROTECTED_PREFIX = "/v1/"
ADMIN_PREFIX = "/v1/admin/"
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
ADMIN_OFF = ("Admin routes (model and adapter load/unload) are off: this server binds a non-loopback address "
             "and was started without an admin key. Start it with --admin-key KEY (or PARALLM_ADMIN_KEY) and "
             "send 'Authorization: Bearer KEY'.")


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


def binds_loopback(host: str) -> bool:
    """Whether `host` (the bind address) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_admin_route(method: str, path: str) -> bool:
    """Routes that change what the server serves: model and adapter load/unload, the admin listing,
    and DELETE /v1/models/{id} (deletes a fine-tuned model's files). Matched on the same decoded
    path the router matches, so no spelling reaches one of them without being classed admin."""
    return (path.startswith(ADMIN_PREFIX) or path in ADMIN_PATHS
            or (method == "DELETE" and path.startswith("/v1/models/")))


def presented_keys(headers: list[tuple[bytes, bytes]]) -> Optional[list[bytes]]:
    """The keys a request presents: `Authorization: Bearer K` (the scheme in any case) and/or
    `x-api-key: K` (Anthropic's clients). None when either header is repeated: which copy a proxy
    or a framework would honour differs, so the request is refused rather than guessed at."""
    auth = [v for k, v in headers if k == b"authorization"]
    api_key = [v for k, v in headers if k == b"x-api-key"]
    if len(auth) > 1 or len(api_key) > 1:
        return None
    keys = []
    for value in auth:
        scheme, _, token = value.strip().partition(b" ")
        keys.append(token.strip() if scheme.lower() == b"bearer" else b"")
    return keys + [v.strip() for v in api_key]


def _matches(given: list[bytes], accepted: list[bytes]) -> bool:
    ok = False
    for g in given:  # every pair compared, in constant time each: no early exit on a match
        for a in accepted:
            ok |= hmac.compare_digest(g, a)
    return ok


class KeyAuth:
    """Keys on /v1/*. Inference routes need the API key when one is set (the admin key also
    works there). Admin routes (`is_admin_route`) need the admin key; without one they are as
    before on a loopback bind (the API key if set, else open) and off (403) on any other bind,
    where anyone on the network could otherwise load models or unload the served one."""

    def __init__(self, app: ASGIApp, api_key: Optional[str] = None, admin_key: Optional[str] = None,
                 loopback: bool = True):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.admin_key = admin_key.encode() if admin_key else None
        self.loopback = loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            return await self.app(scope, receive, send)
        admin = is_admin_route(scope["method"], scope["path"])
        if admin and self.admin_key is None and not self.loopback:
            return await send_error(send, 403, ADMIN_OFF, type="permission_error", code="admin_disabled")
        if admin and self.admin_key is not None:
            accepted, what, code = [self.admin_key], "admin key (--admin-key)", "invalid_admin_key"
        elif self.api_key is not None:
            accepted, what, code = [self.api_key, *([self.admin_key] if self.admin_key else [])], "API key", \
                "invalid_api_key"
        else:
            return await self.app(scope, receive, send)
        given = presented_keys(scope["headers"])
        if given is None:
            return await send_error(send, 400, "Send the key once: this request repeats the Authorization or "
                                    "x-api-key header.", type="invalid_request_error", code="duplicate_credentials")
        if not _matches(given, accepted):
            message = (f"Missing {what}: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'." if not given
                       else f"Incorrect {what} provided.")
            return await send_error(send, 401, message, type="authentication_error", code=code,
                                    headers={"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for k, v in headers:
        if k == b"transfer-encoding" or (k == b"content-length" and v.strip() != b"0"):
            return True
    return False


class RequireJson:
    """A POST, PUT or PATCH to /v1/* must say `Content-Type: application/json` (parameters such as
    charset allowed), else 415, before anything reads the body. A browser sends text/plain and
    form bodies cross-origin without a CORS preflight, so without this any web page could drive
    the API of a server on localhost. Not checked: `exempt` path prefixes (the multipart upload),
    and a request with no body and no Content-Type that no browser sent (no Origin header: browsers
    send one with every POST), such as `curl -X POST .../cancel`."""

    def __init__(self, app: ASGIApp, exempt: tuple[str, ...] = ()):
        self.app = app
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH")
                and scope["path"].startswith(PROTECTED_PREFIX)
                and not any(scope["path"] == p or scope["path"].startswith(p + "/") for p in self.exempt)):
            headers = scope["headers"]
            types = [v for k, v in headers if k == b"content-type"]
            media = types[0].split(b";")[0].strip().lower() if len(types) == 1 else None
            bare = not types and not _has_body(headers) and not any(k == b"origin" for k, _ in headers)
            if media != b"application/json" and not bare:
                shown = b", ".join(types).decode("latin-1")[:100] or "none"
                return await send_error(send, 415, f"Send the request body as JSON, with 'Content-Type: "
                                        f"application/json' (this request's Content-Type: {shown}).",
                                        type="invalid_request_error", code="unsupported_media_type")
        await self.app(scope, receive, send)


class HeadAsGet:
    """HEAD on every GET route: the route runs as GET, the client gets its status and headers (the
    server itself never sends a HEAD response's body). The response ends with its headers, and the
    route then sees a disconnect, so a streaming GET stops instead of running on unseen."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)
        ended = asyncio.Event()

        async def head_send(message: Message) -> None:
            if ended.is_set() or message["type"] != "http.response.start":
                return
            await send(message)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            ended.set()

        async def head_receive() -> Message:
            if ended.is_set():
                return {"type": "http.disconnect"}
            message = asyncio.ensure_future(receive())
            end = asyncio.ensure_future(ended.wait())
            await asyncio.wait({message, end}, return_when=asyncio.FIRST_COMPLETED)
            end.cancel()
            if message.done():
                return message.result()
            message.cancel()
            return {"type": "http.disconnect"}

        inner = {**scope, "method": "GET"}  # a copy: the server must still know it answers a HEAD
        try:
            await self.app(inner, head_receive, head_send)
        finally:
            if "route" in inner:  # the matched route, for the HTTP metrics' label (request_context)
                scope["route"] = inner["route"]


class Cors(CORSMiddleware):
    """starlette's CORS for the origins given with --cors-origin only. A refused preflight (another
    origin, method or header) is an OpenAI error without any Access-Control-* header, so the
    browser does not send the request that would have followed."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        reason = bytes(response.body).decode(errors="replace")
        return JSONResponse({"error": {"message": f"CORS preflight refused ({reason}); allowed origins are set "
                                       "with --cors-origin.", "type": "permission_error", "param": None,
                                       "code": "cors_not_allowed"}}, status_code=403, headers={"Vary": "Origin"})


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
