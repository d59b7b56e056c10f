"""`parallm jobs`: list fine-tuning jobs from the data directory's database (works whether or not
a server is running), with each running job's progress."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="parallm's data directory (default $PARALLM_DATA_DIR or ~/.local/share/parallm)")
    parser.add_argument("--limit", type=int, default=20, help="newest N jobs (default 20)")
    parser.add_argument("job_id", nargs="?", help="show this job's events instead")


def run(args: argparse.Namespace) -> int:
    from parallm.finetune.jobs import adapter_dir_of
    from parallm.finetune.job_runner import progress_line
    from parallm.finetune.store import DB_NAME, Store, default_data_dir

    data_dir = args.data_dir or default_data_dir()
    if not (data_dir / DB_NAME).exists():
        print(f"no fine-tuning jobs: {data_dir / DB_NAME} does not exist")
        return 0
    store = Store(data_dir)
    try:
        if args.job_id:
            job = store.get_job(args.job_id)
            if job is None:
                print(f"parallm jobs: no job {args.job_id!r}")
                return 1
            for event in reversed(store.list_events(job.id, None, 100).items):
                print(f"{event.created_at} {event.level:5} {event.message}")
            return 0
        jobs = store.list_jobs(None, max(1, args.limit)).items
        if not jobs:
            print("no fine-tuning jobs")
        for job in jobs:
            line = f"{job.id}  {job.status:10}  {job.model}"
            metrics = [e for e in store.metric_events(job.id) if "train_loss" in (e.data or {})]
            if job.status == "running" and metrics:
                line += "  " + progress_line(job.id, metrics[-1].data).split(" ", 1)[1]
            if job.fine_tuned_model:
                line += f"  -> {job.fine_tuned_model}"
                if job.status == "succeeded" and not adapter_dir_of(data_dir, job.id).exists():
                    line += " (deleted)"
            if job.error:
                line += f"  error: {job.error.get('message')}"
            print(line)
        return 0
    finally:
        store.close()
