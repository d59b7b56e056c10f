"""MultiModelEngine: several base models served at once, one AsyncEngine each.

An EngineClient that routes every request to the AsyncEngine of `request.model` (a base model
name; the serving layer has already turned `"model": "<adapter>"` into base + adapter through
`adapter_parent`). Each engine owns its model, its KV cache, its worker thread and its
AdapterManager; engines never share a batch.

The set of models lives in a ModelRegistry (parallm.models.registry), which this class owns: it
does the memory budget and LRU eviction. Requests `acquire` / `release` their model there, so a
model with requests in flight is never evicted.

Removing a model (admin unload, or eviction by the registry's budget) happens in two steps:
1. at once, under `_lock`: the engine leaves the routing table, so new requests for it get
   UnknownModel (404) — even when the removal is triggered from a loader thread;
2. on the event loop: `AsyncEngine.shutdown(drain_timeout=unload_drain_timeout)` lets the requests
   in flight finish (aborting what is left after the timeout), stops its worker, and the engine is
   dropped. `wait_removed(name)` awaits that.

Stats aggregate every engine still running (retiring ones included, they still hold rows):
counts and bytes are sums; `kv_cache_usage` is the bytes-weighted mean, i.e. the sum of KV bytes
used over the sum of KV budgets (a model near its own budget is visible in `model_stats()`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any, AsyncIterator, Callable, Optional

from parallm.engine.errors import InvalidRequest, ModelAdminError, UnknownModel
from parallm.engine.types import AdapterInfo, EngineRequest, EngineStats, RequestOutput
from parallm.models.load_errors import ModelLoadError
from parallm.models.registry import ModelRegistry, RegistryError

_SUMMED = ("num_running", "num_waiting", "kv_bytes_used", "kv_bytes_budget", "prefix_cache_queries",
           "prefix_cache_hits", "num_preemptions", "steps", "busy_seconds", "idle_seconds", "decode_rows",
           "batched_tokens", "prefill_steps")


class MultiModelEngine:
    """`engine_factory(loaded) -> AsyncEngine` builds the engine of a newly registered model (with
    its adapter manager as `engine.engine.adapters`). `registry_kwargs` go to ModelRegistry
    (loader, memory_budget_bytes, clock, ...)."""

    def __init__(self, engine_factory: Callable[[Any], Any], *, unload_drain_timeout: float = 30.0,
                 **registry_kwargs: Any):
        self._factory = engine_factory
        self.unload_drain_timeout = unload_drain_timeout
        self.registry = ModelRegistry(on_evict=self._on_evict, reserved_names=self._adapter_names,
                                      **registry_kwargs)
        self._lock = threading.Lock()  # guards the three dicts below; never held across awaits
        self._engines: dict[str, Any] = {}  # served: name -> AsyncEngine, in load order (first = default)
        self._retiring: dict[str, Any] = {}  # removed, still finishing their requests
        self.managers: dict[str, Any] = {}  # name -> AdapterManager; read live by the adapter routes
        self._owners: dict[str, Any] = {}  # request_id -> AsyncEngine, while the request runs
        self._removals: dict[str, asyncio.Future] = {}
        self._specs: dict[str, str] = {}  # name -> the spec it was loaded from ("" = default model)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._started = False

    # ---- models ------------------------------------------------------------------------------
    def add_model(self, loaded: Any, *, spec: Optional[str] = None) -> Any:
        """Register an already loaded model (budget rules apply) and build its engine. Returns the
        engine. Startup and tests; at run time prefer `load_model`."""
        self.registry.add(loaded, spec=spec)
        return self._attach(loaded, spec)

    async def _load_model(self, spec: Optional[str], *, name: Optional[str] = None) -> Any:
        """Load a model off the event loop, register it and start its engine. Raises RegistryError
        or the loader's ModelLoadError, leaving everything as it was."""
        loaded = await asyncio.to_thread(self.registry.load, spec, name=name)
        await self._start_engine_for(loaded, spec)
        return loaded

    async def _start_engine_for(self, loaded: Any, spec: Optional[str]) -> None:
        """The registry has `loaded`: build and start its engine (or drop it again on failure)."""
        try:
            engine = await asyncio.to_thread(self._attach, loaded, spec)
        except BaseException:
            self.registry.unload(loaded.name, force=True)  # do not keep a model nobody can reach
            raise
        if self._started:
            await engine.start()

    async def wait_removed(self, name: str) -> None:
        """Wait until a removed model's engine has stopped (returns at once if it has)."""
        future = self._removals.get(name)
        if future is not None:
            await asyncio.shield(future)

    def model_specs(self) -> dict[str, str]:
        """Served model name -> the spec it was loaded from ("" for the built-in default); the
        fine-tuning worker loads a job's base model from it."""
        with self._lock:
            return {name: self._specs.get(name, "") for name in self._engines}

    def _attach(self, loaded: Any, spec: Optional[str] = None) -> Any:
        engine = self._factory(loaded)
        with self._lock:
            self._engines[loaded.name] = engine
            self._specs[loaded.name] = spec or ""
            manager = getattr(getattr(engine, "engine", None), "adapters", None)
            if manager is not None:
                self.managers[loaded.name] = manager
        return engine

    def _on_evict(self, name: str, loaded: Any) -> None:
        """The registry dropped `name` (unload or budget eviction); may run on a loader thread."""
        with self._lock:
            engine = self._engines.pop(name, None)
            self.managers.pop(name, None)
            self._specs.pop(name, None)
            if engine is None:
                return
            self._retiring[name] = engine
        loop = self._loop
        if loop is None or loop.is_closed():
            with self._lock:
                self._retiring.pop(name, None)  # never started: nothing runs, nothing to stop
            return
        future = loop.create_future() if _on_loop(loop) else None
        if future is not None:
            self._removals[name] = future
            loop.create_task(self._stop(name, engine, future))
        else:
            loop.call_soon_threadsafe(self._schedule_stop, name, engine)

    def _schedule_stop(self, name: str, engine: Any) -> None:
        future = self._loop.create_future()
        self._removals[name] = future
        self._loop.create_task(self._stop(name, engine, future))

    async def _stop(self, name: str, engine: Any, future: asyncio.Future) -> None:
        try:
            await engine.shutdown(drain_timeout=self.unload_drain_timeout)
        finally:
            with self._lock:
                if self._retiring.get(name) is engine:
                    del self._retiring[name]
            if not future.done():
                future.set_result(None)

    def _adapter_names(self) -> list[str]:
        with self._lock:
            managers = list(self.managers.values())
        return [n for m in managers for n in m.names()]

    def _route(self, model: str) -> tuple[str, Any]:
        with self._lock:
            if not model and self._engines:
                model = next(iter(self._engines))
            engine = self._engines.get(model)
        if engine is None:
            raise UnknownModel(model, self.model_names() + self._adapter_names())
        return model, engine

    # ---- EngineClient ------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started = True
        with self._lock:
            engines = list(self._engines.values())
        for engine in engines:
            await engine.start()

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        with self._lock:
            engines = [*self._engines.values(), *self._retiring.values()]
        await asyncio.gather(*(e.shutdown(drain_timeout=drain_timeout) for e in engines))

    def validate(self, request: EngineRequest) -> None:
        _, engine = self._route(request.model)
        engine.validate(request)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if self._loop is None:  # engines start lazily on a first generate(); removals need the loop
            self._loop = asyncio.get_running_loop()
        name, engine = self._route(request.model)
        try:
            self.registry.acquire(name)  # busy: not evictable until release
        except RegistryError:  # removed between routing and here
            raise UnknownModel(name, self.model_names() + self._adapter_names()) from None
        self._owners[request.request_id] = engine
        try:
            async for output in engine.generate(request):
                yield output
        finally:
            self._owners.pop(request.request_id, None)
            self.registry.release(name)

    async def abort(self, request_id: str) -> None:
        engine = self._owners.get(request_id)
        if engine is not None:
            await engine.abort(request_id)

    def stats(self) -> EngineStats:
        with self._lock:
            engines = [*self._engines.values(), *self._retiring.values()]
        parts = [e.stats() for e in engines]
        total = EngineStats(**{k: sum(getattr(p, k) for p in parts) for k in _SUMMED})
        for p in parts:
            for phase, seconds in p.phase_seconds.items():
                total.phase_seconds[phase] = total.phase_seconds.get(phase, 0.0) + seconds
        if total.kv_bytes_budget:
            total.kv_cache_usage = total.kv_bytes_used / total.kv_bytes_budget
        elif parts:
            total.kv_cache_usage = max(p.kv_cache_usage for p in parts)
        return total

    def health_error(self) -> Optional[str]:
        """Why the server cannot serve: an engine's worker died. None when every engine is fine."""
        with self._lock:
            engines = list(self._engines.values())
        errors = [e for e in (engine.health_error() for engine in engines) if e]
        return "; ".join(errors) or None

    def model_stats(self) -> dict[str, dict]:
        """Per served model (not the retiring ones): its engine's stats as a dict."""
        with self._lock:
            engines = dict(self._engines)
        return {name: dataclasses.asdict(e.stats()) for name, e in engines.items()}

    def model_names(self) -> list[str]:
        with self._lock:
            return list(self._engines)

    def engine_for(self, name: str) -> Any:
        """The AsyncEngine serving base model `name` (UnknownModel if none)."""
        return self._route(name)[1]

    def adapter_parent(self, name: str) -> Optional[str]:
        with self._lock:
            engines = list(self._engines.values())
        for engine in engines:
            parent = engine.adapter_parent(name)
            if parent is not None:
                return parent
        return None

    def adapters(self) -> list[AdapterInfo]:
        with self._lock:
            managers = list(self.managers.values())
        return [a for m in managers for a in m.list()]

    def adapters_loaded(self) -> dict[str, int]:
        with self._lock:
            managers = dict(self.managers)
        return {base: len(m.names()) for base, m in managers.items()}

    def model_cards(self) -> list[dict]:
        """/v1/models entries: base models then adapters, with parent/root and metadata."""
        servable = [a for a in self.adapters() if not a.unloading]
        return [c.to_openai() for c in self.registry.cards(servable)]

    # ---- run-time admin ----------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str, base_model: Optional[str] = None) -> AdapterInfo:
        with self._lock:
            managers = dict(self.managers)
        if base_model:
            if base_model not in managers:
                raise UnknownModel(base_model, list(managers))
            manager = managers[base_model]
        elif len(managers) == 1:
            manager = next(iter(managers.values()))
        else:
            raise InvalidRequest(f"Several base models are served ({', '.join(sorted(managers)) or 'none'}); say "
                                 "which one the adapter is for with 'base_model_name'.", param="base_model_name")
        # reading and checking the tensors is file I/O plus a little math: off the event loop
        return await asyncio.to_thread(manager.load, name, path)

    async def unload_adapter(self, name: str) -> None:
        with self._lock:
            managers = list(self.managers.values())
        owner = next((m for m in managers if m.has_adapter(name)), None)
        if owner is None:
            raise UnknownModel(name, sorted(n for m in managers for n in m.names()))
        owner.unload(name)

    async def load_model(self, spec: str, name: Optional[str] = None) -> dict:
        try:
            loaded = await self._load_model(spec, name=name)
        except RegistryError as e:
            raise ModelAdminError(e.message, e.code, e.status) from None
        except ModelLoadError as e:
            raise ModelAdminError(str(e), "model_load_failed") from None
        return next(c.to_openai() for c in self.registry.cards() if c.id == loaded.name)

    async def unload_model(self, name: str, force: bool = False) -> None:
        try:
            self.registry.unload(name, force=force)  # calls _on_evict: the engine stops after its requests
        except RegistryError as e:
            raise ModelAdminError(e.message, e.code, e.status) from None

    def tokenizer(self, model: str) -> Any:
        return self._route(model)[1].tokenizer(model)

    def context_length(self, model: str) -> int:
        return self._route(model)[1].context_length(model)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
