"""Cancel while running, a worker killed mid-job, and the whole service killed and restarted."""
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from ft_support import open_fine_tuning, TERMINAL, LiveServer, build_app, text_rows, wait_for, write_small_model
from parallm.finetune import FineTuning, JobRequest, Store
from parallm.finetune.adapter_files import is_complete_adapter_dir

HERE = Path(__file__).resolve().parent
EIGHT_STEPS = {"n_epochs": 4, "batch_size": 2}  # 4 rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_small_model(tmp_path_factory.mktemp("small-llama"))


def metric_steps(store, job_id):
    return [e.data["step"] for e in store.metric_events(job_id) if "train_loss" in e.data]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cancel_while_running(model_dir, tmp_path):
    busy = threading.Event()
    ready = []
    ft = open_fine_tuning(tmp_path / "data", base_models={"tiny": str(model_dir)}, serving_busy=busy.is_set,
                          max_pause_s=None, on_adapter_ready=lambda *a: ready.append(a),
                          worker_nice=3)
    ft.start()
    try:
        with LiveServer(build_app(ft)) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
            f = client.files.create(file=("t.jsonl", io.BytesIO(text_rows(4))), purpose="fine-tune")
            busy.set()  # serving is busy: the worker holds after its first step
            job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, hyperparameters=EIGHT_STEPS)
            wait_for(lambda: metric_steps(ft.store, job.id), what="the first step")
            pid = ft.jobs.get(job.id).worker_pid
            assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
            assert metric_steps(ft.store, job.id) == [1]  # held by serving priority
            assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 3
            assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
            wait_for(lambda: not pid_alive(pid) and ft.runner.current is None, what="the worker to stop")
            final = client.fine_tuning.jobs.retrieve(job.id)
            assert final.status == "cancelled" and final.fine_tuned_model is None
            messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
            assert "Training stopped: the job was cancelled" in messages
            assert not (tmp_path / "data" / "adapters" / job.id).exists() and ready == []
    finally:
        ft.shutdown()


def test_worker_killed_mid_job_resumes_from_checkpoint(model_dir, tmp_path):
    busy = threading.Event()
    ft = open_fine_tuning(tmp_path / "data", base_models={"tiny": str(model_dir)}, serving_busy=busy.is_set,
                         max_pause_s=None, checkpoint_every=1)
    ft.start()
    try:
        busy.set()  # serving is busy: the worker saves its step-1 checkpoint, then holds
        f = ft.files.save_bytes(text_rows(4), filename="t.jsonl", purpose="fine-tune")
        job = ft.jobs.create(JobRequest(model="tiny", training_file=f.id, hyperparameters=EIGHT_STEPS))
        wait_for(lambda: ft.store.latest_checkpoint(job.id), what="the first checkpoint")
        assert metric_steps(ft.store, job.id) == [1]
        pid = ft.jobs.get(job.id).worker_pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: ft.jobs.get(job.id).attempts == 2, what="the job to restart")
        busy.clear()
        done = wait_for(lambda: (j := ft.jobs.get(job.id)).status in TERMINAL and j, what="the job to finish")
        assert done.status == "succeeded", done.error
        messages = [e.message for e in ft.store.list_events(job.id, None, 100).items]
        assert any("exited unexpectedly (exit status -9); resuming from checkpoint step 1" in m for m in messages)
        assert "Fine-tuning job resumed at step 1" in messages
        assert metric_steps(ft.store, job.id) == [1, 2, 3, 4, 5, 6, 7, 8]  # no step lost or repeated
        assert is_complete_adapter_dir(tmp_path / "data" / "adapters" / job.id)
    finally:
        ft.shutdown()


def test_worker_killed_too_often_fails_cleanly(model_dir, tmp_path):
    ft = open_fine_tuning(tmp_path / "data", base_models={"tiny": str(model_dir)}, max_attempts=1)
    ft.start()
    try:
        f = ft.files.save_bytes(text_rows(4), filename="t.jsonl", purpose="fine-tune")
        job = ft.jobs.create(JobRequest(model="tiny", training_file=f.id, hyperparameters=EIGHT_STEPS))
        pid = wait_for(lambda: ft.jobs.get(job.id).worker_pid, what="the worker")
        os.kill(pid, signal.SIGKILL)
        done = wait_for(lambda: (j := ft.jobs.get(job.id)).status in TERMINAL and j, what="the job to fail")
        assert done.status == "failed" and done.error["code"] == "worker_died"
        assert "stopped 1 times" in done.error["message"]
        assert not (tmp_path / "data" / "adapters" / job.id).exists()
    finally:
        ft.shutdown()


def test_service_killed_and_restarted_resumes_the_job(model_dir, tmp_path):
    data, busy_file = tmp_path / "data", tmp_path / "busy"
    store = Store(data)
    ft0 = open_fine_tuning(data, base_models={"tiny": str(model_dir)}, checkpoint_every=1)  # to create the job
    f = ft0.files.save_bytes(text_rows(4), filename="t.jsonl", purpose="fine-tune")
    job = ft0.jobs.create(JobRequest(model="tiny", training_file=f.id, hyperparameters=EIGHT_STEPS))
    ft0.store.close()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")]))
    busy_file.touch()
    service = subprocess.Popen([sys.executable, str(HERE / "service_main.py"), str(data), str(model_dir), str(busy_file)],
                               env=env, start_new_session=True)
    try:
        # serving is busy from the start: the worker saves its step-1 checkpoint and holds; then
        # the service and its worker are killed at once
        wait_for(lambda: store.latest_checkpoint(job.id), what="the first checkpoint")
        assert metric_steps(store, job.id) == [1]
    finally:
        os.killpg(service.pid, signal.SIGKILL)
        service.wait()
    assert store.get_job(job.id).status == "running"  # what a dead server leaves behind
    ckpt_dir = data / "fine_tuning" / job.id / "checkpoints"
    half = ckpt_dir / ".tmp-step-0000002-99999"  # as if killed while writing a checkpoint
    half.mkdir()
    (half / "adapters.safetensors").write_bytes(b"partial")

    ready = []
    ft = open_fine_tuning(data, base_models={"tiny": str(model_dir)},
                         on_adapter_ready=lambda *a: ready.append(a))
    ft.start()
    try:
        done = wait_for(lambda: (j := ft.jobs.get(job.id)).status in TERMINAL and j, what="the resumed job")
        assert done.status == "succeeded", done.error
        messages = [e.message for e in ft.store.list_events(job.id, None, 100).items]
        assert any("parallm restarted while this job was running; resuming from checkpoint step 1" in m
                   for m in messages)
        assert metric_steps(ft.store, job.id) == [1, 2, 3, 4, 5, 6, 7, 8]
        assert not half.exists()
        assert all(is_complete_adapter_dir(p) for p in ckpt_dir.iterdir())
        assert len(ready) == 1 and is_complete_adapter_dir(ready[0][1])
    finally:
        ft.shutdown()
        store.close()


def test_a_restarted_service_serves_again_the_models_of_jobs_that_succeeded(model_dir, tmp_path):
    data, ready = tmp_path / "data", []
    ft = open_fine_tuning(data, base_models={"tiny": str(model_dir)}, on_adapter_ready=lambda *a: ready.append(a))
    ft.start()
    try:
        f = ft.files.save_bytes(text_rows(4), filename="t.jsonl", purpose="fine-tune")
        job = ft.jobs.create(JobRequest(model="tiny", training_file=f.id, hyperparameters={"n_epochs": 1, "batch_size": 2}))
        done = wait_for(lambda: (j := ft.jobs.get(job.id)).status in TERMINAL and j, what="the job")
        assert done.status == "succeeded", done.error
    finally:
        ft.shutdown()
    assert [a[0] for a in ready] == [done.fine_tuned_model]

    again = []
    ft = open_fine_tuning(data, base_models={"tiny": str(model_dir)}, on_adapter_ready=lambda *a: again.append(a))
    ft.start()  # a new server process on the same data dir
    try:
        assert again == [(done.fine_tuned_model, ft.jobs.adapter_dir(job.id), "tiny")]
        assert is_complete_adapter_dir(again[0][1])
    finally:
        ft.shutdown()

    def refuse(*_):
        raise ValueError("this adapter no longer fits the base model")

    ft = open_fine_tuning(data, base_models={"tiny": str(model_dir)}, on_adapter_ready=refuse)
    ft.start()  # one adapter that cannot be served again does not stop the service
    try:
        assert ft.jobs.get(job.id).status == "succeeded"
    finally:
        ft.shutdown()
