"""Fine-tuning inputs are checked before they cost anything: a hyperparameter that is NaN or absurd
is a 400 and no job exists; a training file that training would trip over is a 400 at upload and
nothing is kept; one bad stored job never breaks the job list; a loss that goes NaN fails the job
with the reason instead of writing a NaN adapter."""
from __future__ import annotations

import json
import math

import httpx
import pytest

from parallm.engine.errors import InvalidRequest
from parallm.finetune import validation, worker
from parallm.finetune.hyperparams import MAX_STEPS, parse_method, resolve_plan
from parallm.finetune.store import JobRecord, Store
from parallm.finetune.worker_spec import EXIT_FAILED, WorkerSpec

from .live import MODEL, assert_openai_error

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
GOOD = (json.dumps(ROW) + "\n").encode() * 4


@pytest.fixture(scope="module")
def client(full_server):
    with httpx.Client(base_url=full_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def training_file(client) -> str:
    r = client.post("/v1/files", files={"file": ("train.jsonl", GOOD)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def job_ids(client) -> list[str]:
    r = client.get("/v1/fine_tuning/jobs", params={"limit": 100})
    assert r.status_code == 200, r.text
    return [j["id"] for j in r.json()["data"]]


BAD_HYPERPARAMETERS = {
    "learning_rate_multiplier NaN": '{"learning_rate_multiplier": NaN}',
    "learning_rate_multiplier Infinity": '{"learning_rate_multiplier": Infinity}',
    "learning_rate_multiplier 1e300": '{"learning_rate_multiplier": 1e300}',
    "n_epochs 10^12": '{"n_epochs": 1000000000000}',
    "n_epochs 51": '{"n_epochs": 51}',
}


@pytest.mark.parametrize("name", list(BAD_HYPERPARAMETERS))
def test_bad_hyperparameters_are_a_400_and_no_job(client, training_file, name):
    before = job_ids(client)
    body = f'{{"model": "{MODEL}", "training_file": "{training_file}", "hyperparameters": {BAD_HYPERPARAMETERS[name]}}}'
    r = client.post("/v1/fine_tuning/jobs", content=body, headers={"content-type": "application/json"})
    error = assert_openai_error(r, 400)
    assert error["param"].startswith("hyperparameters"), error
    assert job_ids(client) == before  # nothing was created, so nothing will run


def test_total_steps_and_batch_size_are_bounded_by_the_data_size():
    with pytest.raises(InvalidRequest, match="steps"):
        resolve_plan(parse_method(None, {"n_epochs": 50, "batch_size": 1}), train_rows=MAX_STEPS // 10,
                     model_layers=None)
    plan = resolve_plan(parse_method(None, {"n_epochs": 10, "batch_size": 1}), train_rows=MAX_STEPS // 10,
                        model_layers=None)
    assert plan.iters == MAX_STEPS
    with pytest.raises(InvalidRequest, match="batch_size"):  # OpenAI's most, however many rows there are
        resolve_plan(parse_method(None, {"batch_size": 257}), train_rows=10_000, model_layers=None)


def chat_row(**raw: bytes) -> bytes:
    """A chat row (the file's format) with each of `raw` spliced in as written."""
    return json.dumps(ROW)[:-1].encode() + b"".join(b', "%s": %s' % (k.encode(), v) for k, v in raw.items()) + b"}\n"


BAD_FILES = {
    "a lone surrogate escape": (b'{"messages": [{"role": "user", "content": "caf\\udce9"}, '
                                b'{"role": "assistant", "content": "x"}]}\n', "surrogate"),
    "NaN": (chat_row(weight=b"NaN"), "NaN"),
    "a 5,000-digit number": (chat_row(n=b"1" + b"0" * 5000), "digits"),
    "nesting 10k deep": (chat_row(meta=b"[" * 10_000 + b"]" * 10_000), "nested"),
    "nesting 100 deep": (chat_row(meta=b"[" * 100 + b"]" * 100), "nested"),
    "tool_calls not a list": (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
                              b'"content": "a", "tool_calls": {"x": 1}}]}\n', "tool_calls"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_file_training_would_trip_over_is_a_400_at_upload(client, full_server, name):
    data, why = BAD_FILES[name]
    before = sorted(p.name for p in (full_server.data_dir / "files").iterdir())
    r = client.post("/v1/files", files={"file": ("train.jsonl", GOOD + data)}, data={"purpose": "fine-tune"})
    error = assert_openai_error(r, 400)
    assert error["code"] == "invalid_file" and "line 5" in error["message"] and why in error["message"], error
    assert sorted(p.name for p in (full_server.data_dir / "files").iterdir()) == before  # nothing kept


def test_an_overlong_line_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD + b'{"text": "' + b"x" * 5000 + b'"}\n' + GOOD)
    report = validation.validate_jsonl_file(str(path))
    assert [(e.line, "longer than 1000 bytes" in e.message) for e in report.errors] == [(5, True)]
    assert report.rows == 8  # the lines after it were read as lines


def test_one_bad_stored_job_never_breaks_the_job_list(client, full_server, training_file):
    """A job stored before values were checked (a NaN multiplier, which JSON cannot carry) and one
    whose stored JSON is damaged: both listed, retrievable, their events too."""
    store = full_server.fine_tuning.store
    nan = float("nan")
    for job_id in ("ftjob-" + "a" * 24, "ftjob-" + "b" * 24):
        store.add_job(JobRecord(id=job_id, model=MODEL, created_at=1, status="queued", training_file=training_file,
                                seed=1, hyperparameters={"learning_rate_multiplier": nan}, method={"type": "lora"},
                                plan={"learning_rate": nan}))
        store.add_event(job_id, "metrics", type="metrics", data={"step": 1, "train_loss": nan})
    store._execute("UPDATE jobs SET method = '{damaged', hyperparameters = 'NaN' WHERE id = ?", ("ftjob-" + "b" * 24,))
    r = client.get("/v1/fine_tuning/jobs")
    assert r.status_code == 200, r.text
    listed = {j["id"]: j for j in json.loads(r.text, parse_constant=pytest.fail)["data"]}
    assert listed["ftjob-" + "a" * 24]["hyperparameters"] == {"learning_rate_multiplier": None}
    assert listed["ftjob-" + "b" * 24]["method"] is None
    for job_id in listed:
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200
        events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events")
        assert events.status_code == 200, events.text
        json.loads(events.text, parse_constant=pytest.fail)


def spec_for(store: Store, tmp_path, job_id: str) -> WorkerSpec:
    return WorkerSpec(job_id=job_id, data_dir=str(store.data_dir), base_model=MODEL, model_source="unused",
                      training_file="unused", validation_file=None,
                      plan={"iters": 10, "checkpoint_every": 5, "learning_rate": 2e-4}, seed=1,
                      fine_tuned_model="ft:tiny::x", adapter_dir=str(tmp_path / "adapter"),
                      checkpoints_dir=str(tmp_path / "ckpt"), parent_pid=0, pause_flag=str(tmp_path / "pause"),
                      nice=0)


def test_a_loss_gone_nan_fails_the_job_with_the_reason(tmp_path, monkeypatch):
    store = Store(tmp_path / "data")
    job_id = "ftjob-" + "c" * 24
    store.add_job(JobRecord(id=job_id, model=MODEL, created_at=1, status="running", training_file="file-x", seed=1,
                            hyperparameters={}, method={}, plan={}))
    spec = spec_for(store, tmp_path, job_id)
    plan = type("Plan", (), {"iters": 10, "checkpoint_every": 5, "learning_rate": 2e-4})()
    callback = worker.JobCallback(spec, plan, store, model=None, num_layers=1)
    info = {"iteration": 3, "trained_tokens": 10, "iterations_per_second": 1.0, "train_loss": math.nan,
            "learning_rate": 2e-4, "tokens_per_second": 5.0}
    with pytest.raises(worker.TrainingDiverged):
        callback.on_train_loss_report(info)
    assert store.metric_events(job_id) == []  # no NaN was stored

    def diverging(spec, store):
        callback = worker.JobCallback(spec, plan, store, model=None, num_layers=1)
        callback.on_train_loss_report(info)

    monkeypatch.setattr(worker, "train_job", diverging)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    spec.write(job_dir)
    assert worker.main([str(job_dir)]) == EXIT_FAILED  # the runner fails the job with worker_error
    store = Store(tmp_path / "data")
    assert "diverged" in store.get_job(job_id).worker_error and "learning_rate_multiplier" in \
        store.get_job(job_id).worker_error
    assert any("diverged" in e.message for e in store.events_since(job_id, 0))
