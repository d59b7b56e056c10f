"""What the parent tells a training worker process: written as JSON into the job directory
(`<data_dir>/fine_tuning/<job-id>/spec.json`) before `python -m parallm.finetune.worker DIR`.

Protocol between the two processes (the only channels):
- SQLite (the shared Store, WAL): the worker appends events and checkpoints, updates
  trained_tokens / estimated_finish, and on failure writes `worker_error`. The parent owns the
  job's `status` (except that a cancel sets it) and finalises it after the worker exits.
- The worker reads `cancel_requested` from the job row after every step.
- `pause_flag` file: while it exists the worker waits between steps (serving has priority);
  and the worker runs at low CPU priority (`nice`), so even mid-step the server's threads win.
- Exit status: see EXIT_* below. A signal death (e.g. kill -9) reads as a crash -> resume.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 3
EXIT_ORPHANED = 4  # the parent died; the next parent resumes the job

SPEC_FILE = "spec.json"


@dataclass
class WorkerSpec:
    job_id: str
    data_dir: str
    base_model: str  # the served name
    model_source: str  # what the loader loads (a directory, a hub id, a GGUF path)
    training_file: str  # path
    validation_file: Optional[str]
    plan: dict  # hyperparams.TrainingPlan.as_dict()
    seed: int
    fine_tuned_model: str
    adapter_dir: str  # where the final adapter goes (renamed into place)
    checkpoints_dir: str
    parent_pid: int
    pause_flag: str
    max_pause_s: Optional[float] = None  # longest wait per step while serving is busy; None = no limit
    nice: int = 19  # CPU niceness of the worker: mid-step, serving threads still win the CPU
    resume_checkpoint: Optional[str] = None  # an adapter dir to start from
    resume_step: int = 0
    resume_trained_tokens: int = 0

    def write(self, job_dir: Path) -> Path:
        path = Path(job_dir) / SPEC_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, job_dir: Path) -> "WorkerSpec":
        return cls(**json.loads((Path(job_dir) / SPEC_FILE).read_text()))
