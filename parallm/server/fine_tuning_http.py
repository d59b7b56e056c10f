"""HTTP helpers shared by the files and fine-tuning routers: OpenAI-shaped error bodies and
list pages. The routers stand alone (they catch their own errors), so they behave the same
whether or not the app registers a global EngineError handler."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from parallm.engine.errors import EngineError
from parallm.server.error_responses import printable


def error_body(message: str, type: str, param: str | None, code: str | None) -> dict:
    # printable: a message may quote a client's string, lone surrogates and all
    return {"error": {"message": printable(message), "type": type, "param": printable(param), "code": code}}


def error_response(e: EngineError) -> JSONResponse:
    headers = {}
    if getattr(e, "retry_after", None):
        headers["Retry-After"] = str(int(e.retry_after))
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=headers)


def validation_error_response(e: ValidationError) -> JSONResponse:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return JSONResponse(error_body(f"Invalid request: {param}: {message}" if param else f"Invalid request: {message}",
                                   "invalid_request_error", param, "invalid_request"), status_code=400)


def openai_errors(endpoint: Callable) -> Callable:
    """Turn the typed errors an endpoint raises into OpenAI error responses."""
    if inspect.iscoroutinefunction(endpoint):
        @functools.wraps(endpoint)
        async def wrapper(*args: Any, **kwargs: Any):
            try:
                return await endpoint(*args, **kwargs)
            except EngineError as e:
                return error_response(e)
            except ValidationError as e:
                return validation_error_response(e)
    else:
        @functools.wraps(endpoint)
        def wrapper(*args: Any, **kwargs: Any):
            try:
                return endpoint(*args, **kwargs)
            except EngineError as e:
                return error_response(e)
            except ValidationError as e:
                return validation_error_response(e)
    return wrapper


def list_page(items: list, has_more: bool) -> dict:
    data = [item.as_openai() for item in items]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
