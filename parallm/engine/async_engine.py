"""AsyncEngine: the EngineClient the server talks to.

One worker thread owns the Engine (and so the model); the asyncio loop never runs MLX. Requests
and aborts go to the worker through a thread-safe inbox and are applied between steps; outputs
come back per request in an OutputCollector (which merges what a late consumer has not taken yet),
fed with loop.call_soon_threadsafe.

Invariants
- Every queued request ends with exactly one item that closes its stream: a RequestOutput with
  finished=True, or an exception (EngineDead when the worker crashed, none is left hanging).
- validate() raises typed errors before anything is queued.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from parallm.engine.engine import Engine, EngineConfig
from parallm.engine.errors import EngineDead, EngineDraining, ModelAdminError, QueueFull, UnknownModel
from parallm.engine.output_collector import OutputCollector
from parallm.engine.types import AdapterInfo, EngineRequest, EngineStats, RequestOutput
from parallm.engine.warm_up import warm_up
from parallm.models.registry import ModelCard, adapter_card

log = logging.getLogger(__name__)


@dataclass
class _Add:
    request: EngineRequest
    out: OutputCollector


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, loaded: Any, config: EngineConfig = EngineConfig(), *, sampler: Any = None,
                 adapters: Any = None, engine: Optional[Engine] = None):
        self.engine = engine or Engine(loaded, config, sampler=sampler, adapters=adapters)
        self.config = self.engine.config
        self._name = getattr(loaded, "name", "") or "default"
        self._created = int(time.time())  # a base model's card: when this server started serving it
        self._inbox: "queue.Queue[object]" = queue.Queue()
        self._streams: dict[str, OutputCollector] = {}  # owned by the worker once queued
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._draining = False
        self._dead: Optional[BaseException] = None
        self._stats = EngineStats()
        # (idle seconds so far, perf_counter when the current wait began or None): the worker waiting
        # with nothing to run, after warm-up. One tuple, assigned whole, so stats() on the loop
        # never reads a half-updated pair; a wait in progress counts up to now (else a long idle
        # spell would show up only when it ended, inside whatever came next).
        self._idle: tuple[float, Optional[float]] = (0.0, None)
        self._emit_s = 0.0  # the worker handing outputs to the loop (call_soon_threadsafe)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        ready = self._loop.create_future()
        self._thread = threading.Thread(target=self._worker, args=(ready,), name="parallm-engine", daemon=True)
        self._thread.start()
        await ready  # the engine is warm (or dead: then every request gets EngineDead)

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        self._draining = True
        if self._thread is None:
            return
        deadline = self._loop.time() + drain_timeout
        while self._streams and self._loop.time() < deadline and self._dead is None:
            await asyncio.sleep(0.01)
        for request_id in list(self._streams):
            self._inbox.put(_Abort(request_id))
        while self._streams and self._dead is None and self._thread.is_alive():
            await asyncio.sleep(0.005)
        self._stop.set()
        self._inbox.put(None)  # wake the worker
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)

    # ---- EngineClient ------------------------------------------------------------------------
    def validate(self, request: EngineRequest) -> None:
        if self._dead is not None:
            raise EngineDead(f"The engine worker died: {self._dead!r}")
        if self._draining:
            raise EngineDraining()
        if request.model and request.model not in self.model_names():
            raise UnknownModel(request.model, self.model_names())
        self.engine.validate(request)
        if request.request_id in self._streams:
            from parallm.engine.errors import InvalidRequest
            raise InvalidRequest(f"request_id {request.request_id!r} is already running.", param="request_id")
        # The bound is on everything the engine holds (running, waiting, still in the inbox):
        # rows + queue, the server's admission bound. Counting only "inbox + waiting" refused a
        # burst that free rows were about to take, after the server had admitted it (a 200 stream
        # carrying a queue_full error). _streams is current on the caller's side; the worker's
        # counts lag by a step.
        if len(self._streams) >= self.config.max_num_seqs + self.config.max_queue:
            raise QueueFull(self.config.max_queue)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.validate(request)
        if self._thread is None:
            await self.start()
        out = OutputCollector()
        self._streams[request.request_id] = out
        self._inbox.put(_Add(request, out))
        if self._dead is not None and self._streams.pop(request.request_id, None) is not None:
            raise EngineDead(f"The engine worker died: {self._dead!r}")
        try:
            while not out.closed:
                for item in await out.get():
                    yield item
        finally:
            if not out.closed:  # the consumer went away (disconnect, cancel, aclose)
                self._inbox.put(_Abort(request.request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def health_error(self) -> Optional[str]:
        """Why this engine cannot serve (its worker died), or None."""
        if self._dead is None:
            return None
        return f"the engine worker for {self._name} died: {type(self._dead).__name__}: {self._dead}"

    def stats(self) -> EngineStats:
        idle, since = self._idle
        if since is not None:
            idle += time.perf_counter() - since
        return dataclasses.replace(self._stats, idle_seconds=idle,
                                   phase_seconds={**self._stats.phase_seconds, "emit": self._emit_s})

    def model_names(self) -> list[str]:
        return [self._name]

    def adapter_parent(self, name: str) -> Optional[str]:
        """The base model a servable LoRA adapter runs on, or None (not an adapter here)."""
        adapters = self.engine.adapters
        if adapters is not None and hasattr(adapters, "has_adapter") and adapters.has_adapter(name):
            return self._name
        return None

    def adapters(self) -> list[AdapterInfo]:
        manager = self.engine.adapters
        return list(manager.list()) if manager is not None and hasattr(manager, "list") else []

    def adapters_loaded(self) -> dict[str, int]:
        manager = self.engine.adapters
        return {self._name: len(manager.names()) if manager is not None and hasattr(manager, "names") else 0}

    def model_cards(self) -> list[dict]:
        loaded = self.engine.loaded
        memory = getattr(loaded, "memory", None)
        base = ModelCard(id=self._name, created=self._created, owned_by="parallm", root=self._name, parent=None,
                         kind="model", context_length=loaded.context_length,
                         memory_bytes=getattr(memory, "weight_bytes", None),
                         kv_bytes_per_token=self.engine.cache_layout.bytes_per_token,
                         notes=tuple(getattr(loaded, "notes", None) or ()))
        cards = [base] + [adapter_card(a, "parallm", loaded.context_length)
                          for a in self.adapters() if not a.unloading]
        return [c.to_openai() for c in cards]

    async def load_adapter(self, name: str, path: str, base_model: Optional[str] = None) -> AdapterInfo:
        manager = self._manager()
        if base_model and base_model != self._name:
            raise UnknownModel(base_model, [self._name])
        # reading and checking the tensors is file I/O plus a little math: off the event loop
        return await asyncio.to_thread(manager.load, name, path)

    async def unload_adapter(self, name: str) -> None:
        manager = self._manager()
        if not manager.has_adapter(name):
            raise UnknownModel(name, list(manager.names()))
        manager.unload(name)

    async def load_model(self, spec: str, name: Optional[str] = None) -> dict:
        raise ModelAdminError("This server does not load models at run time.", "not_supported")

    async def unload_model(self, name: str, force: bool = False) -> None:
        raise ModelAdminError("This server does not unload models at run time.", "not_supported")

    def _manager(self):
        if self.engine.adapters is None:
            raise ModelAdminError("This server serves no adapters.", "not_supported")
        return self.engine.adapters

    def tokenizer(self, model: str) -> Any:
        return self.engine.tokenizer

    def context_length(self, model: str) -> int:
        return self.engine.loaded.context_length

    # ---- the worker thread -------------------------------------------------------------------
    def _worker(self, ready: asyncio.Future) -> None:
        try:
            try:
                if self.engine.wants_warm_up():
                    warm_up(self.engine)
            finally:
                self._loop.call_soon_threadsafe(_set_done, ready)
            while not self._stop.is_set():
                if self.engine.has_unfinished():
                    self._drain_inbox(block=False)
                else:
                    self._idle = (self._idle[0], time.perf_counter())
                    self._drain_inbox(block=True)
                    self._idle = (self._idle[0] + time.perf_counter() - self._idle[1], None)
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished():
                    self._hand_over(self.engine.step().outputs)
                self._stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 - every stream must hear about it
            log.error("the engine worker for %s died; every request now gets 503 engine_dead",
                      self._name, exc_info=e)
            self._dead = e
            self._fail_all(e)

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if isinstance(item, _Add):
                try:
                    self.engine.validate(item.request)
                    self.engine.add_request(item.request)
                except Exception as e:  # noqa: BLE001 - typed errors go back to the caller
                    self._deliver(item.request.request_id, e)
            elif isinstance(item, _Abort):
                self._emit(self.engine.abort(item.request_id))
                # a request aborted before it reached the engine still needs its stream closed
                if item.request_id in self._streams and not self.engine.is_running(item.request_id):
                    self._emit([RequestOutput(item.request_id, finish_reason="abort", finished=True)])

    def _hand_over(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs to the event loop (timed: the "emit" phase)."""
        if outputs:
            started = time.perf_counter()
            self._emit(outputs)
            self._emit_s += time.perf_counter() - started

    def _emit(self, outputs: list[RequestOutput]) -> None:
        # One hand-over per step, not one per output: each call_soon_threadsafe writes to the
        # loop's wake-up pipe, and at batch 64+ those wake-ups and their GIL hand-offs were a
        # visible share of the server's cost per step.
        ready = [(stream, o) for o in outputs if (stream := self._stream_for(o.request_id, o)) is not None]
        if ready:
            self._loop.call_soon_threadsafe(_put_all, ready)

    def _deliver(self, request_id: str, item: object) -> None:
        stream = self._stream_for(request_id, item)
        if stream is not None:
            self._loop.call_soon_threadsafe(stream.put, item)

    def _stream_for(self, request_id: str, item: object) -> Optional[OutputCollector]:
        """The request's output collector (forgotten here when `item` closes the stream)."""
        closes = isinstance(item, BaseException) or getattr(item, "finished", False)
        return self._streams.pop(request_id, None) if closes else self._streams.get(request_id)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._deliver(request_id, EngineDead(f"The engine worker died: {error!r}"))
        while True:  # requests still in the inbox
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Add):
                self._deliver(item.request.request_id, EngineDead(f"The engine worker died: {error!r}"))


def _put_all(ready: list[tuple[OutputCollector, object]]) -> None:
    for stream, item in ready:
        stream.put(item)


def _set_done(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
