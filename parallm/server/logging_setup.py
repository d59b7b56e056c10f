"""Log output for `parallm serve`: human-readable lines by default, JSON lines with --log-format json.

Every record carries `request_id` (from request_context's ContextVar, "-" outside a request).
Access-log records (logger `parallm.access`) also carry their fields as structured data, which the
JSON formatter writes as top-level keys, so `jq 'select(.status >= 500)'` works on the log.
Prompt text never reaches the log unless the server runs with --log-prompts (request_context
drops it at the source, so no formatter has to remember to).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, TextIO

from parallm.server.request_context import current_request_id

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Loggers whose output we route through our handler; uvicorn's own access log is silenced because
# ours carries the request id, the route template and token counts.
_OUR_LOGGERS = ("parallm", "uvicorn", "uvicorn.error")
_HANDLER_NAME = "parallm-handler"


@dataclass(frozen=True)
class LogSettings:
    """From ServerSettings.log_format / log_level (`parallm serve --log-format json --log-level
    info`, or PARALLM_LOG_FORMAT...). --log-prompts is not here: it acts where the prompt is
    dropped, in request_context (install_observability(..., log_prompts=...))."""

    format: str = "text"
    level: str = "info"


class RequestIdFilter(logging.Filter):
    """Stamps `record.request_id` from the current request (keeps one passed in `extra=`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id() or "-"
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, message, request_id, and the
    access fields when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or current_request_id(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def build_handler(settings: LogSettings, stream: Optional[TextIO] = None) -> logging.Handler:
    if settings.format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {settings.format!r}; accepted: {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    return handler


def configure_logging(settings: LogSettings, stream: Optional[TextIO] = None) -> logging.Handler:
    """Install one handler on parallm's and uvicorn's loggers (replacing one we installed
    before, so calling this twice does not double every line). Returns the handler."""
    if settings.level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {settings.level!r}; accepted: {', '.join(LOG_LEVELS)}")
    handler = build_handler(settings, stream)
    level = getattr(logging, settings.level.upper())
    for name in _OUR_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
            logger.removeHandler(old)
        if name != "parallm":
            # uvicorn installs its own handlers with dictConfig; ours replace them.
            for old in list(logger.handlers):
                logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True
    return handler

