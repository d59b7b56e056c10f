"""Every error a client can meet, as one OpenAI error object with one HTTP status.

{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Client-caused errors are 4xx, always: a validation failure is 400 (never FastAPI's 422), an
unknown route 404, a wrong method 405. Only a fault of ours is a 5xx. Messages may quote what the
client sent, so they are made encodable (a lone surrogate is written as its escape).
"""
from __future__ import annotations

import errno
import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from parallm.engine.errors import EngineError, QueueFull

log = logging.getLogger("parallm.server")

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def printable(text: Optional[str]) -> Optional[str]:
    """`text` with any lone surrogate (from a client's JSON) written as its escape, so it can be sent."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, *, type: Optional[str] = None, param: Optional[str] = None,
                   code: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    body = {"error": {"message": printable(message), "type": type or _STATUS_TYPES.get(status, "server_error"),
                      "param": printable(param), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def engine_error_response(err: EngineError) -> JSONResponse:
    headers = None
    if isinstance(err, QueueFull):
        # Retry-After is whole seconds (RFC 9110); never 0, so clients back off at least a little.
        headers = {"Retry-After": str(max(1, round(err.retry_after)))}
    return error_response(err.status, err.message, type=err.type, param=err.param, code=err.code, headers=headers)


def engine_error_payload(err: EngineError) -> dict:
    """The same error as a dict, for an error that happens inside an SSE stream."""
    return {"error": {"message": printable(err.message), "type": err.type, "param": printable(err.param),
                      "code": err.code}}


def stream_error_payload(err: Exception) -> dict:
    """Any error inside an SSE stream, as an error object: a fault of ours is logged and named only."""
    if isinstance(err, EngineError):
        return engine_error_payload(err)
    log.error("error in a response stream", exc_info=err)
    return {"error": {"message": f"Internal server error: {type(err).__name__}", "type": "server_error",
                      "param": None, "code": "internal_error"}}


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    """One readable sentence per problem, and the first offending field as `param`."""
    parts, param = [], None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            parts.append("The request body is not valid JSON: " + str(e.get("ctx", {}).get("error", e.get("msg"))))
            continue
        # pydantic tags union branches onto loc (e.g. "str", "list[int]"); keep only field names.
        field_path = ".".join(x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float"))
        param = param or field_path or None
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{field_path or 'body'}: {msg}")
    # A union failure repeats per branch; keep the messages distinct and in order.
    unique = list(dict.fromkeys(parts))
    if len(unique) > 4:
        unique = unique[:4] + [f"(and {len(unique) - 4} more)"]
    return "Invalid request: " + "; ".join(unique), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        admission = getattr(request.app.state, "admission", None)
        if isinstance(exc, QueueFull) and admission is not None:
            # /health's count of 429s, whichever bound refused: the server's admission or the
            # engine's own (rows + queue, checked first in validate(); with prompts tokenized
            # off the loop, a burst's admitted streams start while the rest is still being
            # tokenized, so the engine's bound is often the one reached)
            admission.rejected += 1
        return engine_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"No route {request.method} {request.url.path}. See /v1/models, /v1/chat/completions, /v1/completions, /health."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    # Last resorts for what only a client's input causes, on routes that do not check for it first
    # (each route should: these name no field). As handlers of their own (not the catch-all below)
    # they answer without uvicorn closing the keep-alive connection.
    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError):
        return error_response(400, "The request body is nested too deeply.", code="invalid_request")

    @app.exception_handler(UnicodeError)
    async def _bad_text(request: Request, exc: UnicodeError):
        return error_response(400, "The request holds text that is not valid Unicode (such as a lone UTF-16 "
                              "surrogate, \\ud800).", code="invalid_request")

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError):
        if exc.errno == errno.ENAMETOOLONG:
            return error_response(400, "A name or path in the request is too long.", code="invalid_request")
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"Internal server error: {type(exc).__name__}", type="server_error",
                              code="internal_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"Internal server error: {type(exc).__name__}", type="server_error",
                              code="internal_error")
