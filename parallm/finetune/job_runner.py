"""JobRunner: a thread in the server process that runs queued jobs one at a time, each in a
training worker process, and finalises them when the worker exits.

While a worker runs, the runner (every POLL_S):
- mirrors `serving_busy()` (e.g. the engine has running or waiting requests) into the pause
  flag file the worker checks between steps, so serving keeps priority;
- logs each new event as a progress line (logger "parallm.finetune");
- kills a worker that ignores a cancel for CANCEL_GRACE_S.
When the worker exits: success -> result file, `on_adapter_ready(name, adapter_dir, base)`,
then status succeeded (so the model is servable by the time a client sees "succeeded");
failure -> failed with the worker's error; a crash or kill -> queued again to resume from
the last checkpoint, up to `max_attempts` starts, after which failed with a clear error.
At start, jobs left "running" by a dead server are treated the same way.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from parallm.finetune.adapter_files import is_complete_adapter_dir
from parallm.finetune.jobs import JobService, fine_tuned_model_name
from parallm.finetune.store import JobRecord
from parallm.finetune.worker_spec import (EXIT_CANCELLED, EXIT_FAILED, EXIT_SUCCEEDED,
                                                  WorkerSpec)

log = logging.getLogger("parallm.finetune")

POLL_S = 0.05
CANCEL_GRACE_S = 10.0
DEFAULT_MAX_ATTEMPTS = 3

AdapterReadyHook = Callable[[str, Path, str], None]  # (fine_tuned_model, adapter_dir, base_model)


def progress_line(job_id: str, data: dict, width: int = 20) -> str:
    step, total = data.get("step", 0), max(1, data.get("total_steps", 1))
    filled = int(width * min(step, total) / total)
    eta = data.get("eta_seconds")
    return (f"{job_id} [{'#' * filled}{'.' * (width - filled)}] {step}/{total} "
            f"loss {data.get('train_loss', float('nan')):.4f} {data.get('tokens_per_second', 0):.0f} tok/s"
            + (f" ETA {eta:.0f}s" if eta is not None else ""))


def worker_environment() -> dict:
    """The worker imports the same `parallm` as this process (a checkout need not be installed)."""
    import parallm

    package_root = str(Path(parallm.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


class JobRunner:
    def __init__(self, jobs: JobService, *, on_adapter_ready: Optional[AdapterReadyHook] = None,
                 serving_busy: Optional[Callable[[], bool]] = None, max_pause_s: Optional[float] = 30.0,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, worker_nice: int = 19, python: str = sys.executable):
        self.jobs = jobs
        self.store = jobs.store
        self.on_adapter_ready = on_adapter_ready
        self.serving_busy = serving_busy
        self.max_pause_s = max_pause_s
        self.max_attempts = max_attempts
        self.worker_nice = worker_nice
        self.python = python
        self.pause_flag = self.store.data_dir / "fine_tuning" / "serving_busy"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.current: Optional[subprocess.Popen] = None
        jobs.wake_runner = self._wake.set

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self.pause_flag.parent.mkdir(parents=True, exist_ok=True)
        self.pause_flag.unlink(missing_ok=True)
        self.recover()
        self.serve_finished()
        self._thread = threading.Thread(target=self._loop, name="parallm-finetune-runner", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the worker (its job goes back to queued and resumes at the next start)."""
        self._stopping.set()
        self._wake.set()
        proc = self.current
        if proc is not None and proc.poll() is None:
            proc.terminate()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def recover(self) -> None:
        """Jobs the last server left behind: running -> requeued (resume) or failed."""
        for job in self.store.jobs_with_status("validating_files"):
            self._fail(job.id, "interrupted", "The server stopped while validating this job's files; create it again.")
        for job in self.store.jobs_with_status("running"):
            self._requeue(job, "parallm restarted while this job was running")

    def serve_finished(self) -> None:
        """Hand the adapters of the jobs that succeeded before this start to `on_adapter_ready`, so
        that a restarted server still serves every `ft:...` model it had (they are a job's result,
        kept in the data dir). One that cannot be loaded is logged and skipped: the job stays
        succeeded, its files stay, and the rest are still served."""
        if self.on_adapter_ready is None:
            return
        for job in self.store.jobs_with_status("succeeded"):
            adapter_dir = self.jobs.adapter_dir(job.id)
            if not adapter_dir.exists():
                continue  # its model was deleted (DELETE /v1/models/{model})
            if not job.fine_tuned_model or not is_complete_adapter_dir(adapter_dir):
                log.warning("fine-tuning job %s succeeded but its adapter at %s is missing or incomplete: not served",
                            job.id, adapter_dir)
                continue
            try:
                self.on_adapter_ready(job.fine_tuned_model, adapter_dir, job.model)
            except Exception:
                log.exception("fine-tuning job %s: serving its adapter again failed", job.id)

    # -- the loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            queued = self.store.jobs_with_status("queued")
            if not queued:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._run(queued[0])
            except Exception as e:  # never let one job stop the runner
                log.exception("fine-tuning job %s: runner error", queued[0].id)
                self._fail(queued[0].id, "internal_error", f"The job runner failed: {e}")

    def _requeue(self, job: JobRecord, why: str, *, count_attempt: bool = True) -> None:
        """Back to queued, to resume from the last checkpoint. A clean server shutdown does not
        count against max_attempts; a crash or kill does."""
        ckpt = self.store.latest_checkpoint(job.id)
        where = f"checkpoint step {ckpt.step}" if ckpt else "the start (no checkpoint yet)"
        if not count_attempt:
            self.store.update_job(job.id, attempts=max(0, job.attempts - 1))
        elif job.attempts >= self.max_attempts:
            self._fail(job.id, "worker_died", f"{why}; the training worker has stopped {job.attempts} times, "
                                              f"giving up (last checkpoint: {where}).")
            return
        if self.store.update_job(job.id, status="queued", worker_pid=None, only_if_status=("running",)):
            self.store.add_event(job.id, f"{why}; resuming from {where}", level="warn")
            log.warning("fine-tuning job %s: %s; resuming from %s", job.id, why, where)

    def _fail(self, job_id: str, code: str, message: str) -> None:
        if self.store.update_job(job_id, status="failed", finished_at=int(time.time()), estimated_finish=None,
                                 error={"code": code, "message": message, "param": None},
                                 only_if_status=("validating_files", "queued", "running")):
            self.store.add_event(job_id, f"Job failed: {message}", level="error")
            log.error("fine-tuning job %s failed: %s", job_id, message)

    def _spec(self, job: JobRecord) -> WorkerSpec:
        base_models = self.jobs.base_models()
        if job.model not in base_models:
            raise RuntimeError(f"base model '{job.model}' is no longer served")
        job_dir = self.jobs.job_dir(job.id)
        ckpt = self.store.latest_checkpoint(job.id)
        if ckpt is not None and not is_complete_adapter_dir(Path(ckpt.path)):
            ckpt = None
        return WorkerSpec(
            job_id=job.id, data_dir=str(self.store.data_dir), base_model=job.model,
            model_source=base_models[job.model], training_file=str(self.jobs.files.path_of(job.training_file)),
            validation_file=str(self.jobs.files.path_of(job.validation_file)) if job.validation_file else None,
            plan=job.plan, seed=job.seed, fine_tuned_model=fine_tuned_model_name(job.model, job.suffix, job.id),
            adapter_dir=str(self.jobs.adapter_dir(job.id)), checkpoints_dir=str(job_dir / "checkpoints"),
            parent_pid=os.getpid(), pause_flag=str(self.pause_flag), max_pause_s=self.max_pause_s,
            nice=self.worker_nice,
            resume_checkpoint=ckpt.path if ckpt else None, resume_step=ckpt.step if ckpt else 0,
            resume_trained_tokens=ckpt.trained_tokens if ckpt else 0)

    def _run(self, job: JobRecord) -> None:
        if not self.store.update_job(job.id, status="running", attempts=job.attempts + 1, only_if_status=("queued",)):
            return  # cancelled in between
        job_dir = self.jobs.job_dir(job.id)
        job_dir.mkdir(parents=True, exist_ok=True)
        spec = self._spec(job)
        spec.write(job_dir)
        self.store.add_event(job.id, "Fine-tuning job started" if not spec.resume_step
                             else f"Fine-tuning job resumed at step {spec.resume_step}")
        with open(job_dir / "worker.log", "ab") as log_file:
            proc = subprocess.Popen([self.python, "-m", "parallm.finetune.worker", str(job_dir)],
                                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=worker_environment())
        self.current = proc
        self.store.update_job(job.id, worker_pid=proc.pid)
        log.info("fine-tuning job %s: worker pid %d started", job.id, proc.pid)
        code = self._watch(job.id, proc)
        self.current = None
        self._set_pause(False)
        self._finish(job.id, code, spec)

    def _watch(self, job_id: str, proc: subprocess.Popen) -> int:
        last_seq = 0
        cancel_seen_at = None
        while True:
            code = proc.poll()
            last_seq = self._log_events(job_id, last_seq)
            if code is not None:
                return code
            if self.serving_busy is not None:
                self._set_pause(bool(self.serving_busy()))
            job = self.store.get_job(job_id)
            if job is not None and job.cancel_requested:
                cancel_seen_at = cancel_seen_at or time.monotonic()
                if time.monotonic() - cancel_seen_at > CANCEL_GRACE_S:
                    proc.kill()
            time.sleep(POLL_S)

    def _set_pause(self, busy: bool) -> None:
        if busy and not self.pause_flag.exists():
            self.pause_flag.touch()
        elif not busy and self.pause_flag.exists():
            self.pause_flag.unlink(missing_ok=True)

    def _log_events(self, job_id: str, last_seq: int) -> int:
        for event in self.store.events_since(job_id, last_seq):
            last_seq = event.seq
            if event.type == "metrics" and "train_loss" in (event.data or {}):
                log.info("%s", progress_line(job_id, event.data))
            else:
                log.info("fine-tuning job %s: %s", job_id, event.message)
        return last_seq

    def _finish(self, job_id: str, code: int, spec: WorkerSpec) -> None:
        job = self.store.get_job(job_id)
        if job is None or job.status != "running":
            return  # cancelled meanwhile: the cancel already set the final status
        if code == EXIT_SUCCEEDED and is_complete_adapter_dir(Path(spec.adapter_dir)):
            self._succeed(job, spec)
        elif code == EXIT_FAILED:
            self._fail(job_id, "training_failed", job.worker_error or "the training worker failed; see worker.log")
        elif code == EXIT_CANCELLED:
            self._fail(job_id, "cancelled_unexpectedly", "the worker stopped for a cancel the job does not have")
        elif self._stopping.is_set():
            self._requeue(job, "The server shut down while this job was running", count_attempt=False)
        else:
            self._requeue(job, f"The training worker exited unexpectedly (exit status {code})")

    def _succeed(self, job: JobRecord, spec: WorkerSpec) -> None:
        result = self._result_file(job)
        if self.on_adapter_ready is not None:
            try:
                self.on_adapter_ready(spec.fine_tuned_model, Path(spec.adapter_dir), job.model)
            except Exception as e:
                log.exception("fine-tuning job %s: registering the adapter failed", job.id)
                self._fail(job.id, "adapter_registration_failed",
                           f"Training finished (adapter at {spec.adapter_dir}) but loading it for serving failed: {e}")
                return
        if self.store.update_job(job.id, status="succeeded", finished_at=int(time.time()), estimated_finish=None,
                                 fine_tuned_model=spec.fine_tuned_model, result_files=[result],
                                 only_if_status=("running",)):
            self.store.add_event(job.id, f"The job has successfully completed; model {spec.fine_tuned_model}")
            log.info("fine-tuning job %s succeeded: %s", job.id, spec.fine_tuned_model)

    def _result_file(self, job: JobRecord) -> str:
        """OpenAI's result file: a CSV of step metrics, stored as purpose fine-tune-results."""
        lines = ["step,train_loss,tokens_per_second,trained_tokens"]
        for event in self.store.metric_events(job.id):
            d = event.data or {}
            if "train_loss" in d:
                lines.append(f"{d['step']},{d['train_loss']:.6f},{d.get('tokens_per_second', 0):.1f},{d.get('trained_tokens', 0)}")
        record = self.jobs.files.save_bytes(("\n".join(lines) + "\n").encode(), filename=f"{job.id}-results.csv",
                                            purpose="fine-tune-results")
        return record.id
