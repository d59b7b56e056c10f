"""Fine-tuning jobs end to end through the real openai client: upload -> create -> poll ->
succeeded, then the events, checkpoints, result file, adapter and hook are checked."""
import io
import json

import httpx
import openai
import pytest

from ft_support import open_fine_tuning, TERMINAL, LiveServer, build_app, text_rows, wait_for, write_small_model
from parallm.finetune import FineTuning


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_small_model(tmp_path_factory.mktemp("small-llama"))


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    """One job run to the end; the tests below read what it left."""
    ready = []
    ft = open_fine_tuning(tmp_path_factory.mktemp("data"), base_models={"tiny": str(model_dir)},
                         on_adapter_ready=lambda name, path, base: ready.append((name, path, base)),
                         checkpoint_every=2)
    ft.start()
    with LiveServer(build_app(ft)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        f = client.files.create(file=("train.jsonl", io.BytesIO(text_rows(4))), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, suffix="zorb", seed=7,
                                             hyperparameters={"n_epochs": 2, "batch_size": 2,
                                                              "learning_rate_multiplier": 20})
        assert job.status in ("validating_files", "queued", "running")
        done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j,
                        what="the job to finish")
        yield ft, client, server, done, ready
    ft.shutdown()


def test_job_succeeds_with_openai_fields(finished):
    ft, client, _, job, ready = finished
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:zorb:{job.id.removeprefix('ftjob-')}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.finished_at >= job.created_at and job.seed == 7
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 2
    assert len(job.result_files) == 1
    csv = client.files.content(job.result_files[0]).text.splitlines()
    assert csv[0].startswith("step,train_loss") and len(csv) == 1 + 4  # 4 steps


def test_hook_gets_a_complete_adapter_that_changes_the_model(finished, model_dir):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    ft, _, _, job, ready = finished
    assert len(ready) == 1
    name, adapter_dir, base = ready[0]
    assert (name, base) == (job.fine_tuned_model, "tiny")
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["fine_tune_type"] == "lora"

    model, tok = load(str(model_dir))
    ids = mx.array([tok.encode("Zorbs are teal 1.") + [tok.eos_token_id]])

    def loss(m):
        logits = m(ids[:, :-1])
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item()

    before = loss(model)
    load_adapters(model, str(adapter_dir))
    after = loss(model)
    assert after < before, (before, after)  # it learnt the training text


def test_events_are_listed_newest_first_with_metrics(finished):
    _, client, _, job, _ = finished
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in events]
    assert messages[0].startswith("The job has successfully completed")
    assert messages[-1].startswith("Created fine-tuning job")
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [4, 3, 2, 1]
    assert all(e.data["train_loss"] > 0 and e.data["tokens_per_second"] > 0 for e in metrics)
    first_page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert first_page.has_more and [e.id for e in first_page.data] == [e.id for e in events[:3]]
    second = client.fine_tuning.jobs.list_events(job.id, limit=3, after=first_page.data[-1].id)
    assert [e.id for e in second.data] == [e.id for e in events[3:6]]


def test_checkpoints_every_k_steps(finished):
    _, client, _, job, _ = finished
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [4, 2]
    assert ckpts[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-4"


def test_legacy_routes_and_sse_event_stream(finished):
    _, _, server, job, _ = finished
    base = server.base_url
    assert httpx.get(f"{base}/fine-tunes/{job.id}").json()["status"] == "succeeded"
    assert httpx.get(f"{base}/fine_tunes/{job.id}").json()["id"] == job.id
    datas = []
    with httpx.stream("GET", f"{base}/fine-tunes/{job.id}/events", params={"stream": "true"}, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                datas.append(line[5:].strip())
    assert datas[-1] == "[DONE]"
    streamed = [json.loads(d)["message"] for d in datas[:-1]]
    assert streamed[0].startswith("Created fine-tuning job")  # oldest first
    assert streamed[-1].startswith("The job has successfully completed")


def test_unknown_ids_and_models(finished):
    _, client, _, job, _ = finished
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")
    with pytest.raises(openai.NotFoundError) as info:
        client.fine_tuning.jobs.create(model="tiny", training_file="file-000000000000000000000000")
    assert info.value.body["param"] == "training_file"
    with pytest.raises(openai.NotFoundError) as info:
        client.fine_tuning.jobs.create(model="nope", training_file=job.training_file)
    assert info.value.body["code"] == "model_not_found" and "tiny" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(model="tiny", training_file=job.training_file,
                                       hyperparameters={"n_epochs": -1})
    assert info.value.body["param"] == "hyperparameters.n_epochs"
    with pytest.raises(openai.APIStatusError) as info:
        client.fine_tuning.jobs.cancel(job.id)
    assert info.value.status_code == 409


def test_pagination_and_cancel_of_queued_jobs(model_dir, tmp_path):
    ft = open_fine_tuning(tmp_path / "data", base_models={"tiny": str(model_dir)})  # runner not started
    with LiveServer(build_app(ft)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        f = client.files.create(file=("t.jsonl", io.BytesIO(text_rows(4))), purpose="fine-tune")
        ids = [client.fine_tuning.jobs.create(model="tiny", training_file=f.id).id for _ in range(5)]
        page = client.fine_tuning.jobs.list(limit=2)
        assert [j.id for j in page.data] == ids[::-1][:2] and page.has_more
        seen = [j.id for j in client.fine_tuning.jobs.list(limit=2)]  # the SDK follows `after` cursors
        assert seen == ids[::-1]
        last = client.fine_tuning.jobs.list(limit=2, after=ids[1])
        assert [j.id for j in last.data] == [ids[0]] and not last.has_more
        with pytest.raises(openai.BadRequestError):
            client.fine_tuning.jobs.list(limit=0)
        cancelled = client.fine_tuning.jobs.cancel(ids[2])
        assert cancelled.status == "cancelled" and cancelled.finished_at
        assert client.fine_tuning.jobs.retrieve(ids[2]).status == "cancelled"
        assert client.fine_tuning.jobs.retrieve(ids[3]).status == "queued"
    ft.shutdown()
