"""Adapter and model admin routes (vLLM's shapes for adapters):

    POST /v1/load_lora_adapter     {"lora_name": str, "lora_path": str, "base_model_name"?: str}
    POST /v1/unload_lora_adapter   {"lora_name": str}
    POST /v1/admin/models/load     {"model": spec, "name"?: str}
    POST /v1/admin/models/unload   {"model": name, "force"?: bool}
    GET  /v1/admin/adapters        every adapter, unloading ones included, with its metadata

`lora_path` is resolved under the adapters directory the AdapterManager was given (anything else
is a 400). Every error is an OpenAI error body {"error": {message, type, param, code}} with one
status, produced here so the router behaves the same whatever app includes it. Answers never
hold a full server path: error messages and adapter paths are cut down to what a client sends
(`client_safe`). Who may call these routes is the app's KeyAuth middleware's business (admin key).

`create_adapter_router(engine)` works through the EngineClient's admin methods only.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path, PurePath
from typing import Any, Optional, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from parallm.engine.client import EngineClient
from parallm.engine.errors import EngineError

_TYPES = {400: "invalid_request_error", 404: "not_found_error", 409: "invalid_request_error"}


def _error(status: int, message: str, *, code: Optional[str] = None, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                                   "param": param, "code": code}}, status_code=status)


_QUOTED_PATH = re.compile(r"(['\"])(/[^'\"]*)\1")
_BARE_PATH = re.compile(r"(?<![\w:/.~'\"-])/[^\s'\"]+")


def client_safe(message: str, bases: Sequence[PurePath] = ()) -> str:
    """`message` with every absolute path cut down to what a client may see: its part under one of
    `bases` (the adapters and models directories, which clients name paths relative to), else
    its base name. Loader and adapter errors name the files they read; the server's console
    keeps the full paths, clients do not need them."""
    def shorten(text: str) -> str:
        path = PurePath(text)
        for base in bases:
            if path != base and path.is_relative_to(base):
                return str(path.relative_to(base))
        return path.name or "/"

    def bare(m: re.Match) -> str:
        text = m.group(0)
        core = text.rstrip(".,:;)!?")
        return shorten(core) + text[len(core):]

    message = _QUOTED_PATH.sub(lambda m: m.group(1) + shorten(m.group(2)) + m.group(1), message)
    return _BARE_PATH.sub(bare, message)


def _bases(request: Request) -> list[PurePath]:
    settings = getattr(request.app.state, "settings", None)
    out: list[PurePath] = []
    for folder in (getattr(settings, "adapters_dir", None), getattr(settings, "models_dir", None)):
        if folder:
            path = Path(folder).expanduser()
            out += [path.resolve(), path]
    return out


def _from_exception(e: Exception, request: Request) -> JSONResponse:
    if isinstance(e, EngineError):
        return _error(e.status, client_safe(e.message, _bases(request)), code=e.code, param=e.param)
    raise e


def _adapter_view(info: Any) -> dict:
    """An adapter for a client: its directory's name, not the server's path to it."""
    return {**dataclasses.asdict(info), "path": PurePath(str(info.path)).name}


class _BadBody(Exception):
    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.message, self.param = message, param


async def _json_body(request: Request, required: dict[str, type], optional: dict[str, type]) -> dict:
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, a 5,000-digit number, deep nesting
        raise _BadBody(f"The request body is not valid JSON: {e}.") from None
    if not isinstance(body, dict):
        raise _BadBody("The request body must be a JSON object.")
    fields = {**required, **optional}
    for key, kind in fields.items():
        if key in body and body[key] is not None and not isinstance(body[key], kind):
            raise _BadBody(f"'{key}' must be a {kind.__name__}.", key)
    for key in required:
        if not body.get(key):
            raise _BadBody(f"'{key}' is required.", key)
    return body


def create_adapter_router(engine: EngineClient) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        try:
            body = await _json_body(request, {"lora_name": str, "lora_path": str}, {"base_model_name": str})
            info = await engine.load_adapter(body["lora_name"], body["lora_path"], body.get("base_model_name"))
        except _BadBody as e:
            return _error(400, e.message, code="invalid_request", param=e.param)
        except Exception as e:  # typed errors become their status; anything else propagates
            return _from_exception(e, request)
        return JSONResponse({"message": f"Success: LoRA adapter '{info.name}' added successfully.",
                             "adapter": _adapter_view(info)})

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        try:
            body = await _json_body(request, {"lora_name": str}, {"lora_int_id": int})
            name = body["lora_name"]
            await engine.unload_adapter(name)
        except _BadBody as e:
            return _error(400, e.message, code="invalid_request", param=e.param)
        except Exception as e:
            return _from_exception(e, request)
        return JSONResponse({"message": f"Success: LoRA adapter '{name}' removed successfully."})

    @router.get("/v1/admin/adapters")
    async def list_adapters():
        return JSONResponse({"object": "list", "data": [_adapter_view(a) for a in engine.adapters()]})

    @router.post("/v1/admin/models/load")
    async def load_model(request: Request):
        try:
            body = await _json_body(request, {"model": str}, {"name": str})
            card = await engine.load_model(body["model"], body.get("name"))
        except _BadBody as e:
            return _error(400, e.message, code="invalid_request", param=e.param)
        except Exception as e:
            return _from_exception(e, request)
        return JSONResponse(card)

    @router.post("/v1/admin/models/unload")
    async def unload_model(request: Request):
        try:
            body = await _json_body(request, {"model": str}, {"force": bool})
            await engine.unload_model(body["model"], force=bool(body.get("force")))
        except _BadBody as e:
            return _error(400, e.message, code="invalid_request", param=e.param)
        except Exception as e:
            return _from_exception(e, request)
        return JSONResponse({"message": f"Success: model '{body['model']}' unloaded.", "id": body["model"]})

    return router
