"""The whole path through the team's server with the real openai client: upload -> create ->
poll -> succeeded -> chat with model=<fine_tuned_model>, which create_app + AsyncEngine +
AdapterManager serve at once (the job's hook loads the adapter before the job reads succeeded)."""
import io
import openai
import pytest

from ft_support import TERMINAL, LiveServer, open_fine_tuning, text_rows, wait_for, write_small_model
from parallm.engine.adapter_manager import AdapterManager
from parallm.engine.async_engine import AsyncEngine
from parallm.engine.engine import EngineConfig
from parallm.server.app import create_app
from parallm.server.config import ServerSettings
from parallm.server.routes_fine_tuning import model_deletion_router
from parallm.server.routes_files import files_router
from parallm.server.routes_fine_tuning import fine_tuning_router
from test_served_after_training import greedy_reference


@pytest.fixture
def served(tmp_path):
    from parallm.models import load

    model_dir = write_small_model(tmp_path / "model")
    loaded = load(str(model_dir), device="cpu", name="tiny")
    manager = AdapterManager("tiny", loaded.model)
    engine = AsyncEngine(loaded, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64), adapters=manager)
    holder = {}
    ft = open_fine_tuning(tmp_path / "data", base_models={"tiny": str(model_dir)},
                          on_adapter_ready=lambda name, path, base: manager.load(name, path, trusted=True),
                          serving_busy=lambda: holder["app"].state.admission.in_flight > 0)
    app = create_app(engine, ServerSettings(), routers=[files_router(ft.files), fine_tuning_router(ft.jobs),
                                                        model_deletion_router(ft, engine)])
    holder["app"] = app
    with LiveServer(app, lifespan="on") as server:  # the engine starts with the app
        ft.start()
        yield openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0), ft, model_dir
        ft.shutdown()


def test_chat_with_the_fine_tuned_model(served):
    from mlx_lm import load as mlx_load
    from mlx_lm.tuner.utils import load_adapters

    client, ft, model_dir = served
    f = client.files.create(file=("t.jsonl", io.BytesIO(text_rows(4))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, suffix="zorb", hyperparameters={
        "n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 50})
    # the base model keeps serving while the job is queued or training
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].message.content is not None
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j,
                    what="the job")
    assert done.status == "succeeded", done.error
    name = done.fine_tuned_model

    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "What are zorbs?"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.content  # (the response's "model" field names the base model: serving's choice)
    models = {m.id: m for m in client.models.list().data}
    assert name in models and getattr(models[name], "parent", None) == "tiny"

    # The served tokens are the adapter's (mlx-lm's own load_adapters), not the base model's.
    reference, tok = mlx_load(str(model_dir))
    prompt = tok.encode("Zorbs are")
    base_expected = greedy_reference(reference, prompt, 6)
    load_adapters(reference, str(ft.jobs.adapter_dir(job.id)))
    tuned_expected = greedy_reference(reference, prompt, 6)
    assert tuned_expected != base_expected
    for model, expected in ((name, tuned_expected), ("tiny", base_expected)):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == tok.decode(expected), model


def test_delete_the_fine_tuned_model(served):
    client, ft, _ = served
    f = client.files.create(file=("t.jsonl", io.BytesIO(text_rows(4))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, hyperparameters={"n_epochs": 1, "batch_size": 2})
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j, what="the job")
    assert done.status == "succeeded", done.error
    name, hi = done.fine_tuned_model, [{"role": "user", "content": "hi"}]
    assert client.chat.completions.create(model=name, messages=hi, max_tokens=2).choices[0].message.content is not None

    with pytest.raises(openai.BadRequestError) as e:  # the base model is not a fine-tuned one
        client.models.delete("tiny")
    assert "unload" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.delete("ft:tiny:nothing:0")
    deleted = client.models.delete(name)
    assert deleted.id == name and deleted.deleted is True

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name, messages=hi, max_tokens=2)
    assert name not in {m.id for m in client.models.list().data}
    assert not ft.jobs.adapter_dir(job.id).exists()
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"  # the job stays
    with pytest.raises(openai.NotFoundError):
        client.models.delete(name)  # already gone
    served_again = []
    ft.runner.on_adapter_ready = lambda *a: served_again.append(a)
    ft.runner.serve_finished()  # what the next start does: the deleted model is not served again
    assert served_again == []
