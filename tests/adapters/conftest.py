"""Write mlx-lm adapter directories the way mlx-lm's trainer does, with random non-zero weights."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

NOISE = 0.1  # std of the noise added to lora_a and lora_b: large enough to change greedy tokens


def write_adapter_dir(base_dir: Path, out: Path, *, seed: int, rank: int = 4, scale: float = 20.0,
                      num_layers: int = 2, keys: Optional[list[str]] = None, dora: bool = False) -> Path:
    """Convert a freshly loaded base model with mlx-lm's linear_to_lora_layers, randomise the
    trainable tensors (B non-zero, so the adapter changes the output) and save them as
    `mlx_lm lora --train` does: adapters.safetensors of the trainable parameters and
    adapter_config.json of the run's arguments."""
    from mlx_lm.utils import load_model
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load_model(Path(base_dir))
    model.freeze()
    params = {"rank": rank, "dropout": 0.0, "scale": scale}
    if keys is not None:
        params["keys"] = keys
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    mx.random.seed(seed)

    def randomise(p):
        # lora_a [in, r] ~ U(+-1/sqrt(in)) like mlx-lm's init; lora_b [r, out] and m get noise.
        return p + NOISE * mx.random.normal(p.shape).astype(p.dtype) if p.ndim == 2 else \
            p * (0.25 + 1.5 * mx.random.uniform(shape=p.shape)).astype(p.dtype)

    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable, "linear_to_lora_layers made nothing trainable"
    new = {k: randomise(v) for k, v in trainable.items()}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), new)
    config = {"model": str(base_dir), "fine_tune_type": "dora" if dora else "lora", "num_layers": num_layers,
              "lora_parameters": params, "batch_size": 4, "iters": 10, "learning_rate": 1e-5, "seed": seed}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=4))
    return out


@pytest.fixture
def make_adapter(tiny_model_dir, tmp_path):
    """make_adapter(name, **kwargs) -> Path of a fresh adapter dir under tmp_path/adapters."""

    def make(name: str, **kwargs) -> Path:
        return write_adapter_dir(tiny_model_dir, tmp_path / "adapters" / name, **kwargs)

    return make
