"""Typed errors of the files and fine-tuning services. Each maps to one HTTP status."""
from __future__ import annotations

from typing import TYPE_CHECKING

from parallm.engine.errors import EngineError, InvalidRequest

if TYPE_CHECKING:
    from parallm.finetune.validation import LineError


class NotFound(EngineError):
    status = 404
    code = "not_found"

    def __init__(self, kind: str, object_id: str, param: str | None = None):
        super().__init__(f"No {kind} with id '{object_id}' exists.", param=param)


class InvalidTrainingFile(InvalidRequest):
    """A JSONL upload whose rows are not a fine-tuning dataset. `line_errors` are (line, message)."""

    code = "invalid_file"

    def __init__(self, filename: str, line_errors: list["LineError"], total_errors: int):
        shown = "; ".join(f"line {e.line}: {e.message}" for e in line_errors)
        more = f" (and {total_errors - len(line_errors)} more)" if total_errors > len(line_errors) else ""
        super().__init__(
            f"The file '{filename}' is not a valid fine-tuning JSONL file: {shown}{more}. "
            "Each line must be one JSON object, all of one format: chat {\"messages\": [...]}, "
            "completion {\"prompt\": ..., \"completion\": ...} or text {\"text\": ...}.",
            param="file",
        )
        self.line_errors = line_errors


class FileTooLarge(EngineError):
    status = 413
    code = "file_too_large"

    def __init__(self, limit: int):
        super().__init__(f"The upload is larger than this server's limit of {limit} bytes.", param="file")


class StorageFull(EngineError):
    """Writing the upload failed (e.g. the disk is full). Nothing of it was kept."""

    status = 507
    type = "server_error"
    code = "storage_error"

    def __init__(self, reason: str):
        super().__init__(f"The server could not store the file: {reason}. Nothing was saved; retry later.")


class JobNotCancellable(EngineError):
    status = 409
    code = "job_not_cancellable"

    def __init__(self, job_id: str, status: str):
        super().__init__(f"The job '{job_id}' has already finished with status '{status}' and cannot be cancelled.")

