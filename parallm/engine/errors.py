"""Typed errors that a client can cause or meet. The server maps each one to one HTTP status."""
from __future__ import annotations


class EngineError(Exception):
    """Base class. `param` names the request field at fault, when there is one."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(EngineError):
    code = "invalid_request"


class PromptTooLong(EngineError):
    """Prompt plus max_tokens does not fit the model's context."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int):
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, but the request asks for "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} to generate). "
            "Shorten the prompt or lower max_tokens.",
            param="max_tokens" if prompt_tokens < context_length else "messages",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length


class UnknownModel(EngineError):
    status = 404
    code = "model_not_found"

    def __init__(self, name: str, known: list[str]):
        super().__init__(
            f"The model '{name}' does not exist. Served models: {', '.join(sorted(known)) or '(none)'}.",
            param="model",
        )
        self.name = name
        self.known = known


class QueueFull(EngineError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, max_queue: int, retry_after: float = 1.0):
        super().__init__(f"The server's queue is full ({max_queue} waiting requests). Retry later.")
        self.retry_after = retry_after


class EngineDraining(EngineError):
    status = 503
    type = "server_error"
    code = "draining"

    def __init__(self):
        super().__init__("The server is shutting down and accepts no new requests.")


class EngineDead(EngineError):
    """The worker died; every waiting request gets this instead of hanging. 503: the server cannot
    serve until it is restarted (`--exit-on-engine-death` makes it exit so a supervisor does that)."""

    status = 503
    type = "server_error"
    code = "engine_dead"


class ModelAdminError(EngineError):
    """A run-time model load or unload that cannot be done: not supported by this server, a model
    that is not there or is busy, a budget or name conflict, files that are not a model."""

    def __init__(self, message: str, code: str, status: int = 400):
        super().__init__(message, param="model")
        self.code = code
        self.status = status
