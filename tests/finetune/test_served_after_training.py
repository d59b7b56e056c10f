"""Integration with the adapters teammate's AdapterManager and the engine: when a job succeeds its
hook loads the adapter, and a request for `model=<fine_tuned_model>` (EngineRequest.adapter) is
served at once, in the same batch as a base-model request, with mlx-lm's own adapter output."""
import io

import mlx.core as mx
import pytest

from ft_support import open_fine_tuning, TERMINAL, text_rows, wait_for, write_small_model
from parallm.engine.adapter_manager import AdapterManager
from parallm.engine.engine import Engine, EngineConfig
from parallm.finetune import FineTuning, JobRequest
from parallm.engine.types import EngineRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def greedy_reference(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(mx.argmax(model(mx.array([ids]))[0, -1]).item())
    return ids[len(prompt):]


def test_fine_tuned_model_is_served_by_the_engine_when_the_job_succeeds(tmp_path):
    from mlx_lm import load as mlx_load
    from mlx_lm.tuner.utils import load_adapters
    from parallm.models import load

    model_dir = write_small_model(tmp_path / "model")
    loaded = load(str(model_dir), name="tiny")
    manager = AdapterManager("tiny", loaded.model)
    engine = Engine(loaded, EngineConfig(prefix_cache_bytes=0), adapters=manager)
    ft = open_fine_tuning(tmp_path / "data", base_models={"tiny": str(model_dir)},
                         on_adapter_ready=lambda name, path, base: manager.load(name, path, trusted=True))
    ft.start()
    try:
        f = ft.files.save_bytes(text_rows(4), filename="t.jsonl", purpose="fine-tune")
        job = ft.jobs.create(JobRequest(model="tiny", training_file=f.id, hyperparameters={
            "n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 50}))
        done = wait_for(lambda: (j := ft.jobs.get(job.id)).status in TERMINAL and j, what="the job")
        assert done.status == "succeeded", done.error
        name = done.fine_tuned_model
        assert manager.has_adapter(name)  # registered before the job read as succeeded

        prompt = loaded.tokenizer.encode("Zorbs are")
        engine.add_request(EngineRequest("base", prompt, GREEDY, model="tiny"))
        engine.add_request(EngineRequest("tuned", prompt, GREEDY, model="tiny", adapter=name))
        outs = {"base": [], "tuned": []}
        while engine.has_unfinished():
            for o in engine.step().outputs:
                outs[o.request_id] += o.token_ids

        reference, _ = mlx_load(str(model_dir))
        base_expected = greedy_reference(reference, prompt, 6)
        load_adapters(reference, str(ft.jobs.adapter_dir(job.id)))
        tuned_expected = greedy_reference(reference, prompt, 6)
        assert tuned_expected != base_expected  # the training changed the model
        assert outs == {"base": base_expected, "tuned": tuned_expected}
    finally:
        ft.shutdown()
