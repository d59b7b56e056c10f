"""Per-request context: the request id, the access-log record, and the ASGI middleware that owns both.

The request id comes from the client's `X-Request-Id` when it is safe (1-128 characters of
[A-Za-z0-9._:-]); otherwise a fresh one is generated. It is echoed in the response's `X-Request-Id`
header and lives in a ContextVar, so every log record written while serving the request carries it
(logging_setup.RequestIdFilter reads it). Deeper layers add facts to the access-log record with
`note_usage()` / `note_prompt()` / `note_model()` without knowing about HTTP.

The ContextVar holds a mutable `RequestRecord` object rather than plain values: tasks spawned while
serving (streaming responses run in an anyio task group) get a *copy* of the context, but the copy
points at the same record, so what they note is visible to the middleware's access-log line.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Optional

REQUEST_ID_HEADER = "x-request-id"
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
UNMATCHED_ROUTE = "<unmatched>"

access_logger = logging.getLogger("parallm.access")


@dataclass
class RequestRecord:
    """What the access log says about one HTTP request. Filled in as the request is served."""

    request_id: str
    method: str = ""
    route: str = UNMATCHED_ROUTE
    status: int = 0
    model: Optional[str] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    cached_tokens: Optional[int] = None
    prompt: Optional[str] = None  # only kept when the middleware was built with log_prompts=True
    keep_prompt: bool = False


# A ContextVar is per-task state by design (each request sees its own); it is the one sanctioned
# exception to "no module-level mutable state".
_current: ContextVar[Optional[RequestRecord]] = ContextVar("parallm_request", default=None)


def current_request_id() -> Optional[str]:
    record = _current.get()
    return record.request_id if record is not None else None


def current_record() -> Optional[RequestRecord]:
    return _current.get()


def note_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> None:
    """Add token counts to the current request's access-log line (a no-op outside a request)."""
    record = _current.get()
    if record is not None:
        record.prompt_tokens = (record.prompt_tokens or 0) + prompt_tokens
        record.completion_tokens = (record.completion_tokens or 0) + completion_tokens
        record.cached_tokens = (record.cached_tokens or 0) + cached_tokens


def note_model(model: str) -> None:
    record = _current.get()
    if record is not None:
        record.model = model


def note_prompt(prompt: str) -> None:
    """Offer the prompt text to the access log; it is dropped unless --log-prompts is on."""
    record = _current.get()
    if record is not None and record.keep_prompt:
        record.prompt = prompt


def sanitize_request_id(raw: Optional[str]) -> Optional[str]:
    """The client's id if it is short and made of safe characters, else None (log injection and
    header splitting are why: the id is written verbatim into logs and a response header)."""
    if raw is None:
        return None
    raw = raw.strip()
    return raw if _SAFE_REQUEST_ID.fullmatch(raw) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


def route_template(scope: dict) -> str:
    """The matched route's path template (`/v1/models/{model}`), never the raw path: raw paths
    would give one metric series per distinct URL. Starlette's router stores the matched route in
    the scope it was given, which is the dict the middleware holds. Requests answered before
    routing (401 bad key, 413 body too large, 503 draining) and unknown paths have no route:
    they share UNMATCHED_ROUTE, told apart by their status. (Matching the path against the app's
    routes here would need FastAPI's private included-router internals, which change by version.)"""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str) and path:
        return path
    return UNMATCHED_ROUTE


class RequestContextMiddleware:
    """ASGI middleware: request id in, request id out, one access-log line per request.

    Latency is measured until the last body chunk is sent, so a streamed completion's line says
    how long the stream lasted. The line is written even when the app raises (status 500).
    """

    def __init__(self, app: Any, *, log_prompts: bool = False):
        self.app = app
        self.log_prompts = log_prompts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope.get("headers", ()):
            if name.lower() == REQUEST_ID_HEADER.encode():
                given = sanitize_request_id(value.decode("latin-1"))
                break
        record = RequestRecord(request_id=given or new_request_id(), method=scope.get("method", ""),
                               keep_prompt=self.log_prompts)
        token = _current.set(record)
        started = time.perf_counter()

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != REQUEST_ID_HEADER.encode()]
                headers.append((REQUEST_ID_HEADER.encode(), record.request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            record.route = route_template(scope)
            _log_access(record, time.perf_counter() - started)
            _current.reset(token)


def _log_access(record: RequestRecord, seconds: float) -> None:
    fields: dict[str, Any] = {"method": record.method, "route": record.route,
                              "status": record.status, "latency_ms": round(seconds * 1000, 2)}
    if record.model is not None:
        fields["model"] = record.model
    if record.prompt_tokens is not None:
        fields["prompt_tokens"] = record.prompt_tokens
        fields["completion_tokens"] = record.completion_tokens
        fields["cached_tokens"] = record.cached_tokens
    if record.prompt is not None:
        fields["prompt"] = record.prompt
    text = " ".join(f"{k}={v}" for k, v in fields.items() if k != "prompt")
    if "prompt" in fields:
        text += f" prompt={record.prompt!r}"
    # `request_id` is passed explicitly: the ContextVar is about to be reset, and a queued
    # handler may format the record later.
    access_logger.info("%s", text, extra={"request_id": record.request_id, "access": fields})
