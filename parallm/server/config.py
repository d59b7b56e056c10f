"""ServerSettings: one dataclass, filled from defaults < TOML file < PARALLM_* env vars < command line."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union, get_args, get_origin, get_type_hints


if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A setting that cannot be read: names the setting, where it came from, and what is accepted."""




@dataclass
class ServerSettings:
    # A model spec for parallm.models.load (None: the default model), or a list of specs to serve
    # several base models at once (--model repeated, or `model = [..]` in the TOML file).
    model: Union[str, list, None] = None
    # The name clients use (default: the loader's name); a list pairs with `model` by position.
    served_model_name: Union[str, list, None] = None
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    device: str = "auto"  # auto | cpu | gpu
    max_num_seqs: int = 64  # rows the engine runs at once
    max_num_batched_tokens: Optional[int] = None  # tokens per engine step; None: by device (2048 CUDA, else 512)
    max_queue: int = 256  # requests that may wait for a row; past it, 429
    kv_budget_bytes: Optional[int] = None  # KV of all running sequences; None: the engine's default
    prefix_cache_bytes: Optional[int] = None  # 0 turns the prefix cache off; None: the engine's default
    api_key: Optional[str] = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    drain_timeout: float = 30.0  # seconds requests in flight get to finish after SIGTERM
    # When an engine worker dies, exit non-zero after a grace period (so /health's 503 and the
    # requests' engine_dead errors are seen) and let launchd/systemd restart the server.
    exit_on_engine_death: bool = True
    max_body_bytes: int = 8 * 1024 * 1024
    retry_after: float = 1.0  # seconds suggested to clients that get a 429
    log_level: str = "info"
    log_format: str = "text"  # text | json (one JSON object per line)
    log_prompts: bool = False  # put prompt text in access-log lines (off: prompts may be private)
    data_dir: Optional[str] = None  # uploaded files, fine-tuning jobs and adapters (default ~/.local/share/parallm)
    fine_tuning: bool = True  # /v1/files and /v1/fine_tuning/jobs
    max_upload_bytes: int = 512 * 1024 * 1024  # a /v1/files upload; other bodies stay under max_body_bytes
    adapters_dir: Optional[str] = None  # run-time /v1/load_lora_adapter paths must lie under it; None: off
    adapters: Optional[str] = None  # startup LoRA adapters, "NAME=PATH[@MODEL][,...]" (--adapter, repeatable)
    memory_budget_bytes: Optional[int] = None  # weights of all base models; past it, LRU idle ones are evicted
    # --- what a hostile client may cost (docs/reliability.md) ---
    # a chat template sent in chat_template_kwargs runs only when allowed, in a sandbox with limits
    allow_client_chat_template: bool = False
    header_timeout: float = 10.0  # seconds a connection gets to send a request's headers
    max_header_bytes: int = 32 * 1024  # a request's headers, all together
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    # open connections at most (None: by the process's file limit, raised to its hard limit at start);
    # past it new connections are refused cheaply and /health still answers
    max_connections: Optional[int] = None
    # a stream whose client reads nothing for this long is aborted and its row freed (0: never)
    stream_stall_timeout: float = 60.0
    # --- admin routes (model and adapter load/unload) ---
    # their own key; without one they are off unless the server binds to loopback
    admin_key: Optional[str] = None
    models_dir: Optional[str] = None  # run-time model loads must lie under it; None: no local paths
    allowed_hub_models: Optional[str] = None  # comma-separated repo ids (fnmatch patterns) loadable at run time
    cors_origin: Optional[str] = None  # comma-separated origins sent CORS headers; None: no CORS headers

    def __post_init__(self):
        checks = {
            "port": 0 <= self.port <= 65535,
            "max_num_seqs": self.max_num_seqs >= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
            "max_queue": self.max_queue >= 0,
            "drain_timeout": self.drain_timeout >= 0,
            "max_body_bytes": self.max_body_bytes >= 1024,
            "retry_after": self.retry_after > 0,
            "header_timeout": self.header_timeout > 0,
            "max_header_bytes": self.max_header_bytes >= 1024,
            "keep_alive_timeout": self.keep_alive_timeout > 0,
            "max_connections": self.max_connections is None or self.max_connections >= 1,
            "stream_stall_timeout": self.stream_stall_timeout >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError("invalid settings: " + ", ".join(f"{b}={getattr(self, b)!r}" for b in bad))
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format={self.log_format!r}: use text or json")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"device={self.device!r}: use auto, cpu or gpu")
        for key in ("api_key", "admin_key"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise ConfigError(f"{key} is empty: give a real key, or leave it out")

    @property
    def max_in_flight(self) -> int:
        """Engine requests the server admits at once: the running rows plus the waiting queue."""
        return self.max_num_seqs + self.max_queue


_LIST_FIELDS = ("model", "served_model_name")  # a string, or (TOML, command line) a list of strings
_KEY_FIELDS = ("api_key", "admin_key")


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a TOML/env value into the field's type, or say what is wrong."""
    if name in _LIST_FIELDS and isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{source}: setting '{name}' must be a string or a non-empty list of strings, "
                              f"got {value!r}")
        return value[0] if len(value) == 1 else list(value)
    if name in _KEY_FIELDS and isinstance(value, str):
        # Taken literally: "" (or "none") would otherwise turn auth off without a word.
        if not value.strip():
            raise ConfigError(f"{source}: setting '{name}' is empty: give a real key, or leave it out")
        return value
    hint = get_type_hints(ServerSettings)[name]
    if get_origin(hint) is Union:  # Optional[X]
        inner = [a for a in get_args(hint) if a is not type(None)][0]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        hint = inner
    try:
        if hint is bool:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if hint is int and isinstance(value, float):
            raise ValueError("not an integer")
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: setting '{name}' must be {hint.__name__}, got {value!r}") from None


def from_toml(path: Union[str, Path]) -> dict[str, Any]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    data = data.get("server", data)  # accept a [server] table or top-level keys
    known = {f.name for f in fields(ServerSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {unknown}; known: {sorted(known)}")
    return {k: _coerce(k, v, f"config file {path}") for k, v in data.items()}


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for f in fields(ServerSettings):
        key = "PARALLM_" + f.name.upper()
        if key in environ:
            out[f.name] = _coerce(f.name, environ[key], f"environment variable {key}")
    return out


def load_settings(cli: Mapping[str, Any], config_file: Optional[str] = None,
                  environ: Optional[Mapping[str, str]] = None) -> ServerSettings:
    """Merge the layers; `cli` holds only the options given on the command line (None = not given)."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get("PARALLM_CONFIG")
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(from_toml(config_file))
    merged.update(from_env(environ))
    merged.update({k: v for k, v in cli.items() if v is not None})
    try:
        return ServerSettings(**merged)
    except TypeError as e:
        raise ConfigError(str(e)) from None
