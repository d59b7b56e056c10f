"""FineTuning: the files store, the job service and the job runner over one data directory.

    ft = FineTuning.open(data_dir, base_models={"smollm2": "/path/or/spec"},
                         on_adapter_ready=adapter_manager_load, serving_busy=lambda: engine_busy())
    ft.start()      # recovers interrupted jobs, starts the runner thread
    ... mount parallm.server.routes_files.files_router(ft.files) and
        parallm.server.routes_fine_tuning.fine_tuning_router(ft.jobs) ...
    ft.shutdown()   # a running job is stopped and resumes from its checkpoint next start
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from parallm.finetune.files import DEFAULT_MAX_UPLOAD_BYTES, FileStore
from parallm.finetune.jobs import BaseModels, JobService
from parallm.finetune.job_runner import AdapterReadyHook, JobRunner
from parallm.finetune.store import Store, default_data_dir


@dataclass
class FineTuning:
    store: Store
    files: FileStore
    jobs: JobService
    runner: JobRunner

    @classmethod
    def open(cls, data_dir: Optional[Path] = None, *, base_models: BaseModels,
             on_adapter_ready: Optional[AdapterReadyHook] = None, serving_busy: Optional[Callable[[], bool]] = None,
             max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, checkpoint_every: Optional[int] = None,
             max_pause_s: Optional[float] = 30.0, max_attempts: int = 3, worker_nice: int = 19) -> "FineTuning":
        store = Store(Path(data_dir) if data_dir else default_data_dir())
        files = FileStore(store, max_upload_bytes=max_upload_bytes)
        jobs = JobService(store, files, base_models, checkpoint_every=checkpoint_every)
        runner = JobRunner(jobs, on_adapter_ready=on_adapter_ready, serving_busy=serving_busy,
                           max_pause_s=max_pause_s, max_attempts=max_attempts, worker_nice=worker_nice)
        return cls(store, files, jobs, runner)

    def start(self) -> None:
        self.runner.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        self.runner.shutdown(timeout)
        self.store.close()
