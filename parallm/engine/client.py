"""EngineClient: everything the server calls on an engine, and nothing else.

The HTTP layer (parallm/server/) knows the engine only through this protocol and the boundary
types (engine/types.py) and errors (engine/errors.py). One implementation per kind of server:
- `AsyncEngine` (async_engine.py): one model on one worker thread;
- `MultiModelEngine` (multi_model_engine.py): several base models, one AsyncEngine each, loaded
  and unloaded at run time;
- the distributed leader (engine/distributed/): an AsyncEngine whose engine is rank 0's.
Tests may pass any object of this shape.

Errors: every method raises typed EngineErrors (one HTTP status each), never another type for a
client's mistake.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Optional, Protocol

from parallm.engine.types import AdapterInfo, EngineRequest, EngineStats, RequestOutput


class EngineClient(Protocol):
    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the background worker(s). Idempotent."""

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Refuse new requests (EngineDraining), let running ones finish for up to drain_timeout
        seconds, abort the rest, stop the worker(s)."""

    # ---- requests ----------------------------------------------------------------------------
    def validate(self, request: EngineRequest) -> None:
        """The checks that need no worker state (prompt and budget sizes, sampling parameters, the
        model and adapter names, draining, the queue bound): a typed EngineError for a request the
        engine cannot take. Cheap, on the caller's thread; call it before generate(). The worker
        checks what only it knows (a duplicate request id, an adapter unloaded meanwhile) once,
        when the request reaches it, and the stream raises that error."""

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Queue a validated request and yield its outputs as they come. If the consumer stops
        iterating (aclose / cancellation), the request is aborted."""

    async def abort(self, request_id: str) -> None:
        """Free the request's rows within one engine step. Unknown ids are ignored."""

    # ---- what is served ----------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """Served base models, the default first."""

    def model_cards(self) -> list[dict]:
        """/v1/models entries: base models, then servable adapters (parent = their base model)."""

    def adapter_parent(self, name: str) -> Optional[str]:
        """The base model a servable adapter runs on, or None when `name` is not an adapter."""

    def tokenizer(self, model: str) -> Any:
        """The model's tokenizer (mlx-lm's TokenizerWrapper) for chat templates and tokenizing."""

    def context_length(self, model: str) -> int:
        """The model's maximum context in tokens."""

    # ---- health and metrics ------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """A snapshot for /health and /metrics (summed over models)."""

    def health_error(self) -> Optional[str]:
        """Why the server cannot serve (a worker died, a distributed group failed), or None."""

    def adapters_loaded(self) -> dict[str, int]:
        """Resident adapters per base model (a metrics gauge)."""

    # ---- run-time admin (the admin routes) ---------------------------------------------------
    async def load_adapter(self, name: str, path: str, base_model: Optional[str] = None) -> AdapterInfo:
        """Load a LoRA/DoRA adapter (path confined to the adapters directory) on `base_model`
        (the only one when None)."""

    async def unload_adapter(self, name: str) -> None:
        """Stop routing new requests to an adapter; requests in flight finish with it."""

    def adapters(self) -> list[AdapterInfo]:
        """Every adapter, those still unloading included."""

    async def load_model(self, spec: str, name: Optional[str] = None) -> dict:
        """Load a base model at run time and start its engine; its /v1/models card."""

    async def unload_model(self, name: str, force: bool = False) -> None:
        """Unload a base model: new requests 404 at once, requests in flight finish (force=False
        refuses while any run)."""
