"""DoRA and full fine-tuning jobs produce adapters mlx-lm loads, and they change the model."""
import json

import mlx.core as mx
import mlx.nn as nn
import pytest

from ft_support import TERMINAL, open_fine_tuning, text_rows, wait_for, write_small_model
from parallm.finetune import JobRequest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_small_model(tmp_path_factory.mktemp("small-llama"))


@pytest.mark.parametrize("method", ["dora", "full"])
def test_method_trains_and_loads(method, model_dir, tmp_path):
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    ft = open_fine_tuning(tmp_path / "data", base_models={"tiny": str(model_dir)})
    ft.start()
    try:
        f = ft.files.save_bytes(text_rows(4), filename="t.jsonl", purpose="fine-tune")
        job = ft.jobs.create(JobRequest(model="tiny", training_file=f.id, method={"type": method},
                                        hyperparameters={"n_epochs": 1, "batch_size": 2,
                                                         "learning_rate_multiplier": 20}))
        done = wait_for(lambda: (j := ft.jobs.get(job.id)).status in TERMINAL and j, what="the job")
        assert done.status == "succeeded", done.error
        assert done.method["supervised"]["adapter"] == method
        adapter_dir = ft.jobs.adapter_dir(job.id)
        assert json.loads((adapter_dir / "adapter_config.json").read_text())["fine_tune_type"] == method
    finally:
        ft.shutdown()
    model, tok = load(str(model_dir))
    ids = mx.array([tok.encode("Zorbs are teal 1.") + [tok.eos_token_id]])

    def loss():
        return nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean().item()

    before = loss()
    load_adapters(model, str(adapter_dir))
    assert loss() < before
