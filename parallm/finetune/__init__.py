"""Fine-tuning jobs: uploaded files, a persisted job queue, and training in a worker process on
mlx-lm's tuner. No fastapi/pydantic here; the routes live in parallm/server/."""
from parallm.finetune.files import FileStore
from parallm.finetune.jobs import JobRequest, JobService, fine_tuned_model_name
from parallm.finetune.job_runner import JobRunner
from parallm.finetune.service import FineTuning
from parallm.finetune.store import Store, default_data_dir

__all__ = ["FileStore", "FineTuning", "JobRequest", "JobRunner", "JobService", "Store", "default_data_dir",
           "fine_tuned_model_name"]
