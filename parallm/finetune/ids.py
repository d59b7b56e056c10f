"""Identifiers for files, jobs, events and checkpoints.

Ids are generated here and only ever looked up in SQLite. Where an id names a path on disk
(a file's bytes, a job's directory) it is checked against `ID_PATTERN` first, so a client-chosen
string can never reach the filesystem (no "../", no separators)."""
from __future__ import annotations

import re
import secrets

PREFIXES = ("file", "ftjob", "ftevent", "ftckpt")
ID_PATTERN = re.compile(r"^(file|ftjob|ftevent|ftckpt)-[A-Za-z0-9]{24}$")


def new_id(prefix: str) -> str:
    assert prefix in PREFIXES, prefix
    return f"{prefix}-{secrets.token_hex(12)}"


def is_valid_id(value: str, prefix: str) -> bool:
    return bool(ID_PATTERN.match(value or "")) and value.startswith(prefix + "-")


def require_path_safe(value: str, prefix: str) -> str:
    """Return `value` when it is one of our generated ids; raise ValueError otherwise.
    Call this before joining an id into a path."""
    if not is_valid_id(value, prefix):
        raise ValueError(f"not a valid {prefix} id: {value!r}")
    return value
