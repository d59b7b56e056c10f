"""FileStore: uploaded files on disk (`<data_dir>/files/<file-id>`) with their rows in SQLite.

An upload is streamed to a temporary name in the same directory, fsynced, validated (for
purpose=fine-tune) and only then renamed to its id and recorded. Any failure on the way (too
large, disk full, bad JSONL) removes the temporary file, so no partial file is ever visible.
"""
from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from parallm.finetune.job_errors import FileTooLarge, InvalidTrainingFile, NotFound, StorageFull
from parallm.finetune.ids import is_valid_id, new_id, require_path_safe
from parallm.finetune.store import FileRecord, Page, Store
from parallm.finetune.validation import validate_jsonl_file
from parallm.engine.errors import InvalidRequest

FINE_TUNE_PURPOSE = "fine-tune"
ACCEPTED_PURPOSES = ("fine-tune", "fine-tune-results", "batch", "assistants", "user_data", "evals")
CHUNK_BYTES = 1 << 20
DEFAULT_MAX_UPLOAD_BYTES = 512 << 20


class FileStore:
    def __init__(self, store: Store, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        self.store = store
        self.dir = store.data_dir / "files"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """A crash mid-upload can leave a temporary file; it was never recorded, so drop it."""
        for p in self.dir.glob(".upload-*"):
            p.unlink(missing_ok=True)

    def path_of(self, file_id: str) -> Path:
        return self.dir / require_path_safe(file_id, "file")

    def _write_chunk(self, out: BinaryIO, chunk: bytes) -> None:
        out.write(chunk)

    def save(self, source: BinaryIO, *, filename: str, purpose: str) -> FileRecord:
        """Store an upload read from `source` (a binary file-like). Raises InvalidRequest,
        InvalidTrainingFile (400), FileTooLarge (413) or StorageFull (507)."""
        if purpose not in ACCEPTED_PURPOSES:
            raise InvalidRequest(f"Unknown purpose '{purpose}'. Accepted: {', '.join(ACCEPTED_PURPOSES)}.",
                                 param="purpose")
        filename = os.path.basename(filename or "upload.jsonl")[:255] or "upload.jsonl"
        fd, tmp_name = tempfile.mkstemp(prefix=".upload-", dir=self.dir)
        tmp = Path(tmp_name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK_BYTES):
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise FileTooLarge(self.max_upload_bytes)
                    self._write_chunk(out, chunk)
                out.flush()
                os.fsync(out.fileno())
            rows, fmt = 0, None
            if purpose == FINE_TUNE_PURPOSE:
                report = validate_jsonl_file(str(tmp))
                if not report.ok:
                    raise InvalidTrainingFile(filename, report.errors, report.total_errors)
                rows, fmt = report.rows, report.format
            record = FileRecord(new_id("file"), filename, purpose, size, int(time.time()), rows, fmt)
            final = self.path_of(record.id)
            os.replace(tmp, final)
            try:
                self.store.add_file(record)
            except BaseException:
                final.unlink(missing_ok=True)  # never a stored file without its record
                raise
            return record
        except OSError as e:
            reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise StorageFull(reason) from e
        finally:
            tmp.unlink(missing_ok=True)  # gone already after a successful rename

    def get(self, file_id: str) -> FileRecord:
        record = self.store.get_file(file_id) if is_valid_id(file_id, "file") else None
        if record is None:
            raise NotFound("file", file_id, param="file_id")
        return record

    def list(self, purpose: Optional[str] = None, after: Optional[str] = None, limit: int = 10000) -> Page:
        return self.store.list_files(purpose, after, limit)

    def delete(self, file_id: str) -> FileRecord:
        record = self.get(file_id)
        self.store.delete_file(record.id)
        self.path_of(record.id).unlink(missing_ok=True)
        return record

    def content(self, file_id: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The stored bytes, in chunks (opened before returning, so a missing file fails here)."""
        record = self.get(file_id)
        f = open(self.path_of(record.id), "rb")

        def chunks() -> Iterator[bytes]:
            with f:
                while chunk := f.read(chunk_bytes):
                    yield chunk

        return chunks()

    def save_bytes(self, data: bytes, *, filename: str, purpose: str) -> FileRecord:
        import io

        return self.save(io.BytesIO(data), filename=filename, purpose=purpose)
