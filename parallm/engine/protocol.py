"""EngineClient: the only thing the server knows about the engine.

`parallm.engine.async_engine.AsyncEngine` implements it; tests may use any object of this shape.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Protocol

from parallm.engine.types import EngineRequest, EngineStats, RequestOutput


class EngineClient(Protocol):
    async def start(self) -> None:
        """Start the background worker. Idempotent."""

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Refuse new requests (EngineDraining), let running ones finish for up to drain_timeout
        seconds, abort the rest, stop the worker."""

    def validate(self, request: EngineRequest) -> None:
        """Raise a typed EngineError (PromptTooLong, UnknownModel, InvalidRequest, QueueFull,
        EngineDraining) for a request the engine cannot take. Cheap; called before generate()."""

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Queue the request and yield its outputs as they come. Raises the errors of validate().
        If the consumer stops iterating (aclose / cancellation), the request is aborted."""

    async def abort(self, request_id: str) -> None:
        """Free the request's rows within one engine step. Unknown ids are ignored."""

    def stats(self) -> EngineStats:
        """A snapshot for /health and /metrics."""

    def model_names(self) -> list[str]:
        """Served base models (and, once adapters exist, adapter names are listed separately)."""

    def tokenizer(self, model: str) -> Any:
        """The model's tokenizer (a transformers PreTrainedTokenizer-like object, or mlx-lm's
        TokenizerWrapper) for chat templates and tokenization in the serving layer."""

    def context_length(self, model: str) -> int:
        """The model's maximum context in tokens."""
