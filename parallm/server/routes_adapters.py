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

`create_adapter_router` takes the live objects it works on: `managers` (base model name ->
AdapterManager; read at request time, so models added later are seen) and, for the model admin
routes, a ModelRegistry plus optional async hooks the app uses to start/stop a model's engine.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from pathlib import Path, PurePath
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from parallm.engine.adapter_manager import AdapterManager
from parallm.engine.errors import EngineError, UnknownModel
from parallm.models.registry import ModelRegistry, RegistryError

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
    if isinstance(e, RegistryError):
        return _error(e.status, client_safe(e.message, _bases(request)), code=e.code, param="model")
    if type(e).__name__ == "ModelLoadError":  # parallm.models' loader error: bad spec or files
        return _error(400, client_safe(str(e), _bases(request)), code="model_load_failed", param="model")
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


def create_adapter_router(managers: Mapping[str, AdapterManager], registry: Optional[ModelRegistry] = None, *,
                          on_model_loaded: Optional[Callable[[Any], Awaitable[None]]] = None,
                          on_model_unloaded: Optional[Callable[[str], Awaitable[None]]] = None) -> APIRouter:
    router = APIRouter()

    def pick_manager(base_model_name: Optional[str]) -> AdapterManager:
        if base_model_name:
            manager = managers.get(base_model_name)
            if manager is None:
                raise UnknownModel(base_model_name, list(managers))
            return manager
        if len(managers) == 1:
            return next(iter(managers.values()))
        raise _BadBody(f"Several base models are served ({', '.join(sorted(managers)) or 'none'}); say which one "
                       "the adapter is for with 'base_model_name'.", "base_model_name")

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        try:
            body = await _json_body(request, {"lora_name": str, "lora_path": str}, {"base_model_name": str})
            manager = pick_manager(body.get("base_model_name"))
            # Reading and checking the tensors is file I/O plus a little math: off the event loop.
            info = await asyncio.to_thread(manager.load, body["lora_name"], body["lora_path"])
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
            owner = next((m for m in managers.values() if m.has_adapter(name)), None)
            if owner is None:
                known = sorted(n for m in managers.values() for n in m.names())
                raise UnknownModel(name, known)
            owner.unload(name)
        except _BadBody as e:
            return _error(400, e.message, code="invalid_request", param=e.param)
        except Exception as e:
            return _from_exception(e, request)
        return JSONResponse({"message": f"Success: LoRA adapter '{name}' removed successfully."})

    @router.get("/v1/admin/adapters")
    async def list_adapters():
        return JSONResponse({"object": "list",
                             "data": [_adapter_view(a) for m in managers.values() for a in m.list()]})

    @router.post("/v1/admin/models/load")
    async def load_model(request: Request):
        if registry is None:
            return _error(400, "This server does not load models at run time.", code="not_supported")
        try:
            body = await _json_body(request, {"model": str}, {"name": str})
            loaded = await asyncio.to_thread(registry.load, body["model"], name=body.get("name"))
            if on_model_loaded is not None:
                await on_model_loaded(loaded)
        except _BadBody as e:
            return _error(400, e.message, code="invalid_request", param=e.param)
        except Exception as e:
            return _from_exception(e, request)
        card = next(c for c in registry.cards() if c.id == loaded.name)
        return JSONResponse(card.to_openai())

    @router.post("/v1/admin/models/unload")
    async def unload_model(request: Request):
        if registry is None:
            return _error(400, "This server does not unload models at run time.", code="not_supported")
        try:
            body = await _json_body(request, {"model": str}, {"force": bool})
            registry.unload(body["model"], force=bool(body.get("force")))
            if on_model_unloaded is not None:
                await on_model_unloaded(body["model"])
        except _BadBody as e:
            return _error(400, e.message, code="invalid_request", param=e.param)
        except Exception as e:
            return _from_exception(e, request)
        return JSONResponse({"message": f"Success: model '{body['model']}' unloaded.", "id": body["model"]})

    return router


def model_list(registry: ModelRegistry, managers: Mapping[str, AdapterManager]) -> dict:
    """The /v1/models body: base models then adapters (parent = base, root = the adapter dir's name)."""
    adapters = [a for m in managers.values() for a in m.list() if not a.unloading]
    return {"object": "list", "data": [c.to_openai() for c in registry.cards(adapters)]}
