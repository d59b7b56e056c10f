"""SQLite persistence for files, fine-tuning jobs, their events and checkpoints.

One database file, `<data_dir>/parallm.db`, in WAL mode so that the server process (reading,
and writing job state) and the training worker process (writing events and checkpoints) can
use it at once. Within a process one `Store` is shared by threads; a lock serialises use of
its one connection. Rows keep an integer `seq` (insertion order) that cursors page on.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from parallm.finetune.ids import new_id

DB_NAME = "parallm.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, filename TEXT NOT NULL,
    purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    rows INTEGER NOT NULL DEFAULT 0, format TEXT);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, model TEXT NOT NULL,
    created_at INTEGER NOT NULL, finished_at INTEGER, status TEXT NOT NULL,
    trained_tokens INTEGER, training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT,
    seed INTEGER NOT NULL, hyperparameters TEXT NOT NULL, method TEXT NOT NULL,
    fine_tuned_model TEXT, error TEXT, result_files TEXT NOT NULL DEFAULT '[]',
    estimated_finish INTEGER, cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, worker_pid INTEGER, plan TEXT NOT NULL,
    worker_error TEXT);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL,
    data TEXT);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, step INTEGER NOT NULL, path TEXT NOT NULL,
    trained_tokens INTEGER NOT NULL, metrics TEXT NOT NULL, fine_tuned_model_checkpoint TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS checkpoints_by_job ON checkpoints (job_id, seq);
"""

JSON_COLUMNS = {"hyperparameters", "method", "error", "result_files", "plan", "data", "metrics"}

log = logging.getLogger("parallm.finetune")


def finite(value: Any) -> Any:
    """`value` with NaN and Infinity replaced by None: what the API sends must be JSON. A job stored
    before values were checked (a NaN multiplier) must not break every listing that holds it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def default_data_dir() -> Path:
    """$PARALLM_DATA_DIR, else ~/.local/share/parallm."""
    env = os.environ.get("PARALLM_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "parallm"


@dataclass
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    rows: int = 0
    format: Optional[str] = None

    def as_openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None}


@dataclass
class JobRecord:
    id: str
    model: str
    created_at: int
    status: str
    training_file: str
    seed: int
    hyperparameters: dict
    method: dict
    plan: dict  # the resolved training plan (numbers, never "auto"); see hyperparams.TrainingPlan
    validation_file: Optional[str] = None
    suffix: Optional[str] = None
    finished_at: Optional[int] = None
    trained_tokens: Optional[int] = None
    fine_tuned_model: Optional[str] = None
    error: Optional[dict] = None
    result_files: list = field(default_factory=list)
    estimated_finish: Optional[int] = None
    cancel_requested: int = 0
    attempts: int = 0
    worker_pid: Optional[int] = None
    worker_error: Optional[str] = None
    seq: int = 0

    def as_openai(self) -> dict:
        return finite({
            "id": self.id, "object": "fine_tuning.job", "model": self.model,
            "created_at": self.created_at, "finished_at": self.finished_at, "status": self.status,
            "trained_tokens": self.trained_tokens, "training_file": self.training_file,
            "validation_file": self.validation_file, "result_files": list(self.result_files or []),
            "error": self.error, "fine_tuned_model": self.fine_tuned_model,
            "hyperparameters": self.hyperparameters, "method": self.method, "seed": self.seed,
            "suffix": self.suffix, "estimated_finish": self.estimated_finish,
            "organization_id": "parallm", "integrations": [], "user_provided_suffix": self.suffix,
        })


@dataclass
class EventRecord:
    id: str
    job_id: str
    created_at: int
    level: str
    message: str
    type: str  # "message" | "metrics"
    data: Optional[dict] = None
    seq: int = 0

    def as_openai(self) -> dict:
        return finite({"id": self.id, "object": "fine_tuning.job.event", "created_at": self.created_at,
                       "level": self.level, "message": self.message, "type": self.type, "data": self.data or {}})


@dataclass
class CheckpointRecord:
    id: str
    job_id: str
    created_at: int
    step: int
    path: str
    trained_tokens: int
    metrics: dict
    fine_tuned_model_checkpoint: str
    seq: int = 0

    def as_openai(self) -> dict:
        return finite({"id": self.id, "object": "fine_tuning.job.checkpoint", "created_at": self.created_at,
                       "fine_tuning_job_id": self.job_id, "step_number": self.step,
                       "fine_tuned_model_checkpoint": self.fine_tuned_model_checkpoint,
                       "metrics": dict(self.metrics or {}, step=self.step)})


@dataclass
class Page:
    """One page of a cursor listing (newest first)."""

    items: list
    has_more: bool


class Store:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0,
                                   isolation_level=None)  # autocommit; each statement is atomic
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- generic helpers -------------------------------------------------------------------
    def _execute(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @staticmethod
    def _decode(row: sqlite3.Row) -> dict[str, Any]:
        out = dict(row)
        for k in JSON_COLUMNS & out.keys():
            if out[k] is not None:
                try:
                    out[k] = json.loads(out[k])
                except (ValueError, RecursionError):  # a damaged row: shown without the column, not a 500
                    log.error("%s of row %s in the database is not JSON; shown as null", k, out.get("id"))
                    out[k] = None
        return out

    def _insert(self, table: str, values: dict) -> int:
        values = {k: (json.dumps(v) if k in JSON_COLUMNS and v is not None else v) for k, v in values.items()}
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._lock:
            return self._db.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(values.values())).lastrowid

    def _page(self, table: str, where: str, params: tuple, after: Optional[str], limit: int) -> tuple[list, bool]:
        """Rows newest first; `after` is the id of the last row of the previous page."""
        if after is not None:
            found = self._execute(f"SELECT seq FROM {table} WHERE id = ?", (after,))
            if not found:
                return [], False
            where += " AND seq < ?"
            params = params + (found[0]["seq"],)
        rows = self._execute(f"SELECT * FROM {table} WHERE {where} ORDER BY seq DESC LIMIT ?", params + (limit + 1,))
        return [self._decode(r) for r in rows[:limit]], len(rows) > limit

    # -- files -------------------------------------------------------------------------------
    def add_file(self, record: FileRecord) -> None:
        self._insert("files", vars(record))

    def get_file(self, file_id: str) -> Optional[FileRecord]:
        rows = self._execute("SELECT * FROM files WHERE id = ?", (file_id,))
        return FileRecord(**{k: v for k, v in self._decode(rows[0]).items() if k != "seq"}) if rows else None

    def list_files(self, purpose: Optional[str] = None, after: Optional[str] = None, limit: int = 10000) -> Page:
        where, params = ("purpose = ?", (purpose,)) if purpose else ("1 = 1", ())
        rows, more = self._page("files", where, params, after, limit)
        return Page([FileRecord(**{k: v for k, v in r.items() if k != "seq"}) for r in rows], more)

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    # -- jobs --------------------------------------------------------------------------------
    def add_job(self, record: JobRecord) -> None:
        self._insert("jobs", {k: v for k, v in vars(record).items() if k != "seq"})

    def get_job(self, job_id: str) -> Optional[JobRecord]:
        rows = self._execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRecord(**self._decode(rows[0])) if rows else None

    def list_jobs(self, after: Optional[str], limit: int) -> Page:
        rows, more = self._page("jobs", "1 = 1", (), after, limit)
        return Page([JobRecord(**r) for r in rows], more)

    def count_jobs_by_status(self) -> dict[str, int]:
        return {status: n for status, n in self._execute("SELECT status, COUNT(*) FROM jobs GROUP BY status", ())}

    def jobs_with_status(self, *statuses: str) -> list[JobRecord]:
        marks = ", ".join("?" for _ in statuses)
        rows = self._execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses)
        return [JobRecord(**self._decode(r)) for r in rows]

    def update_job(self, job_id: str, *, only_if_status: Optional[tuple[str, ...]] = None, **fields) -> bool:
        """Set fields; with `only_if_status`, only while the job is in one of those states
        (a compare-and-set, so a cancel and a finish cannot both win). Returns whether it changed."""
        values = {k: (json.dumps(v) if k in JSON_COLUMNS and v is not None else v) for k, v in fields.items()}
        sql = "UPDATE jobs SET " + ", ".join(f"{k} = ?" for k in values) + " WHERE id = ?"
        params = tuple(values.values()) + (job_id,)
        if only_if_status:
            sql += " AND status IN (" + ", ".join("?" for _ in only_if_status) + ")"
            params += tuple(only_if_status)
        with self._lock:
            return self._db.execute(sql, params).rowcount > 0

    # -- events ------------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: Optional[dict] = None) -> EventRecord:
        record = EventRecord(new_id("ftevent"), job_id, int(time.time()), level, message, type, data)
        record.seq = self._insert("events", {k: v for k, v in vars(record).items() if k != "seq"})
        return record

    def list_events(self, job_id: str, after: Optional[str], limit: int) -> Page:
        rows, more = self._page("events", "job_id = ?", (job_id,), after, limit)
        return Page([EventRecord(**r) for r in rows], more)

    def events_since(self, job_id: str, seq: int) -> list[EventRecord]:
        """Events with seq > `seq`, oldest first (for streaming and for the progress log)."""
        rows = self._execute("SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq))
        return [EventRecord(**self._decode(r)) for r in rows]

    def metric_events(self, job_id: str) -> list[EventRecord]:
        rows = self._execute("SELECT * FROM events WHERE job_id = ? AND type = 'metrics' ORDER BY seq", (job_id,))
        return [EventRecord(**self._decode(r)) for r in rows]

    # -- checkpoints -------------------------------------------------------------------------
    def add_checkpoint(self, record: CheckpointRecord) -> None:
        self._insert("checkpoints", {k: v for k, v in vars(record).items() if k != "seq"})

    def list_checkpoints(self, job_id: str, after: Optional[str], limit: int) -> Page:
        rows, more = self._page("checkpoints", "job_id = ?", (job_id,), after, limit)
        return Page([CheckpointRecord(**r) for r in rows], more)

    def latest_checkpoint(self, job_id: str) -> Optional[CheckpointRecord]:
        rows = self._execute("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step DESC, seq DESC LIMIT 1", (job_id,))
        return CheckpointRecord(**self._decode(rows[0])) if rows else None
