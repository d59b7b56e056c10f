"""JobService: the fine-tuning jobs API (create, list, get, cancel, events, checkpoints).

Job lifecycle: validating_files -> queued -> running -> succeeded | failed | cancelled.
A running job whose worker or server died goes back to queued and resumes from its last
checkpoint (see runner.py). The JobRunner thread runs one job at a time.
"""
from __future__ import annotations

import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from parallm.engine.errors import InvalidRequest, UnknownModel
from parallm.finetune.job_errors import JobNotCancellable, NotFound
from parallm.finetune.files import FINE_TUNE_PURPOSE, FileStore
from parallm.finetune.hyperparams import parse_method, resolve_plan
from parallm.finetune.ids import is_valid_id, new_id
from parallm.finetune.store import JobRecord, Page, Store

TERMINAL = ("succeeded", "failed", "cancelled")
SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_PAGE = 100
MAX_SEED = 2**31 - 1  # OpenAI's range; the worker seeds MLX and NumPy with seed + step

# served base model name -> what the loader loads (a directory, hub id or GGUF path)
BaseModels = Union[Mapping[str, str], Callable[[], Mapping[str, str]]]


@dataclass
class JobRequest:
    """A create request as the server validated its shape (values are checked here)."""

    model: str
    training_file: str
    validation_file: Optional[str] = None
    suffix: Optional[str] = None
    seed: Optional[int] = None
    hyperparameters: Optional[dict] = None
    method: Optional[dict] = None


def adapter_dir_of(data_dir: Path, job_id: str) -> Path:
    """Where a job's finished adapter lives (gone once its model is deleted)."""
    assert is_valid_id(job_id, "ftjob"), job_id
    return Path(data_dir) / "adapters" / job_id


def fine_tuned_model_name(base: str, suffix: Optional[str], job_id: str) -> str:
    return f"ft:{base}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"


def check_page_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}, got {limit}.", param="limit")
    return limit


class JobService:
    def __init__(self, store: Store, files: FileStore, base_models: BaseModels,
                 *, checkpoint_every: Optional[int] = None, wake_runner: Callable[[], None] = lambda: None):
        self.store = store
        self.files = files
        self._base_models = base_models
        self.checkpoint_every = checkpoint_every
        self.wake_runner = wake_runner  # the runner sets this so a new job starts without delay

    def base_models(self) -> Mapping[str, str]:
        return self._base_models() if callable(self._base_models) else self._base_models

    def job_dir(self, job_id: str) -> Path:
        assert is_valid_id(job_id, "ftjob"), job_id
        return self.store.data_dir / "fine_tuning" / job_id

    def adapter_dir(self, job_id: str) -> Path:
        return adapter_dir_of(self.store.data_dir, job_id)

    # -- API ------------------------------------------------------------------------------
    def _training_file(self, file_id: str, param: str):
        if not isinstance(file_id, str) or not file_id:
            raise InvalidRequest(f"{param} must be a file id from POST /v1/files.", param=param)
        record = self.store.get_file(file_id) if is_valid_id(file_id, "file") else None
        if record is None:
            raise NotFound("file", file_id, param=param)
        if record.purpose != FINE_TUNE_PURPOSE:
            raise InvalidRequest(f"File '{file_id}' was uploaded with purpose '{record.purpose}'; "
                                 f"fine-tuning needs purpose '{FINE_TUNE_PURPOSE}'.", param=param)
        return record

    def create(self, request: JobRequest) -> JobRecord:
        models = self.base_models()
        if request.model not in models:
            raise UnknownModel(request.model, list(models))
        if request.suffix is not None and not SUFFIX_PATTERN.match(request.suffix):
            raise InvalidRequest("suffix must be 1-64 characters of letters, digits, '_', '-' or '.'.", param="suffix")
        if request.seed is not None and (isinstance(request.seed, bool) or not isinstance(request.seed, int)
                                         or not 0 <= request.seed <= MAX_SEED):
            raise InvalidRequest(f"seed must be an integer in 0..{MAX_SEED}.", param="seed")
        train_file = self._training_file(request.training_file, "training_file")
        if request.validation_file is not None:
            self._training_file(request.validation_file, "validation_file")
        requested = parse_method(request.method, request.hyperparameters)
        plan = resolve_plan(requested, train_rows=train_file.rows, model_layers=None,
                            checkpoint_every=self.checkpoint_every)
        job_id = new_id("ftjob")
        hyper = {"n_epochs": plan.n_epochs, "batch_size": plan.batch_size,
                 "learning_rate_multiplier": plan.learning_rate_multiplier}
        method = {"type": "supervised", "supervised": {"hyperparameters": hyper, "adapter": plan.method}}
        record = JobRecord(
            id=job_id, model=request.model, created_at=int(time.time()), status="validating_files",
            training_file=train_file.id, validation_file=request.validation_file, suffix=request.suffix,
            seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
            hyperparameters=hyper, method=method, plan=plan.as_dict())
        self.store.add_job(record)
        self.store.add_event(job_id, f"Created fine-tuning job: {job_id}")
        # Files were validated line by line on upload; what is left is checked above.
        self.store.add_event(job_id, f"Files validated ({train_file.rows} training examples, format "
                                     f"{train_file.format}); {plan.iters} steps of batch {plan.batch_size}, "
                                     f"{plan.n_epochs} epochs, lr {plan.learning_rate:g}, {plan.method}")
        self.store.update_job(job_id, status="queued", only_if_status=("validating_files",))
        self.store.add_event(job_id, "Job queued")
        self.wake_runner()
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        record = self.store.get_job(job_id) if is_valid_id(job_id, "ftjob") else None
        if record is None:
            raise NotFound("fine-tuning job", job_id, param="fine_tuning_job_id")
        return record

    def list(self, after: Optional[str] = None, limit: int = 20) -> Page:
        return self.store.list_jobs(after, check_page_limit(limit))

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.status == "cancelled":
            return job
        if job.status in TERMINAL:
            raise JobNotCancellable(job_id, job.status)
        # The status flips now (a compare-and-set, so a finish racing this cannot also win);
        # a running worker sees cancel_requested after its current step and stops.
        if self.store.update_job(job_id, status="cancelled", cancel_requested=1, finished_at=int(time.time()),
                                 estimated_finish=None, only_if_status=("validating_files", "queued", "running")):
            self.store.add_event(job_id, "Job cancelled")
        return self.get(job_id)

    def succeeded_job_of(self, fine_tuned_model: str) -> Optional[JobRecord]:
        """The succeeded job that made this `ft:...` model, if any."""
        for job in self.store.jobs_with_status("succeeded"):
            if job.fine_tuned_model == fine_tuned_model:
                return job
        return None

    def delete_model(self, fine_tuned_model: str) -> JobRecord:
        """Delete a fine-tuned model's adapter files (OpenAI's DELETE /v1/models/{model}); the job
        and its events stay. A restart no longer serves it, since its adapter is gone. The caller
        stops serving it first. Unknown (or already deleted) names: UnknownModel."""
        job = self.succeeded_job_of(fine_tuned_model)
        try:
            if job is None:
                raise FileNotFoundError(fine_tuned_model)
            shutil.rmtree(self.adapter_dir(job.id))
        except FileNotFoundError:  # never made, or deleted already (two deletes racing included)
            raise UnknownModel(fine_tuned_model, [j.fine_tuned_model for j in self.store.jobs_with_status("succeeded")
                                                  if j.fine_tuned_model and self.adapter_dir(j.id).exists()]) from None
        self.store.add_event(job.id, f"The fine-tuned model {fine_tuned_model} was deleted")
        return job

    def events(self, job_id: str, after: Optional[str] = None, limit: int = 20) -> Page:
        self.get(job_id)
        return self.store.list_events(job_id, after, check_page_limit(limit))

    def checkpoints(self, job_id: str, after: Optional[str] = None, limit: int = 10) -> Page:
        self.get(job_id)
        return self.store.list_checkpoints(job_id, after, check_page_limit(limit))
