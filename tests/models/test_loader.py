"""Loading mlx-lm directories (and repo ids from the Hugging Face cache) into a LoadedModel."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import TOKENIZER_DIR
from models_gguf_helpers import gguf_metadata, gguf_tensors, save_with_mlx



def test_loads_a_tiny_mlx_lm_dir(tiny_model_dir):
    import mlx.core as mx
    import mlx_lm

    from parallm.models import DEFAULT_MODEL_NAME, LoadedModel, MemoryEstimate, load

    lm = load(str(tiny_model_dir), device="cpu")
    assert isinstance(lm, LoadedModel) and lm.name == tiny_model_dir.name != DEFAULT_MODEL_NAME
    assert lm.source == str(tiny_model_dir) and lm.device == "cpu"
    assert lm.config["model_type"] == "llama" and lm.context_length == 2048
    assert len(lm.model.layers) == 2
    # 2 (k and v) x 2 layers x 2 kv heads x head_dim 16 x 4 bytes (float32)
    assert lm.memory == MemoryEstimate(weight_bytes=lm.memory.weight_bytes, kv_bytes_per_token=2 * 2 * 2 * 16 * 4)
    n_params = sum(v.size for _, v in __import__("mlx.utils", fromlist=["x"]).tree_flatten(lm.model.parameters()))
    assert lm.memory.weight_bytes == 4 * n_params

    ref_model, ref_tok = mlx_lm.load(str(tiny_model_dir))
    tokens = mx.array([ref_tok.encode("The capital of France is")])
    np.testing.assert_array_equal(np.array(lm.model(tokens)), np.array(ref_model(tokens)))
    assert lm.tokenizer.encode("Hi there") == ref_tok.encode("Hi there")
    assert lm.tokenizer.eos_token_ids == ref_tok.eos_token_ids


def test_name_overrides_the_default(tiny_model_dir):
    from parallm.models import load

    assert load(str(tiny_model_dir), device="cpu", name="my-model").name == "my-model"


def test_quantized_mlx_dir_is_dequantized_on_cpu_unless_kept(tiny_model_dir, tmp_path):
    """An mlx-lm 4-bit directory: float32 on the CPU by default, quantized with keep_quantized."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import load as mlx_load, quantize_model, save

    model, tok, config = mlx_load(str(tiny_model_dir), return_config=True)
    qmodel, qconfig = quantize_model(model, config, group_size=32, bits=4)
    save(tmp_path / "q4", str(tiny_model_dir), qmodel, tok, qconfig)

    from parallm.models import load

    fast = load(str(tmp_path / "q4"), device="cpu")
    small = load(str(tmp_path / "q4"), device="cpu", keep_quantized=True)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fast.model.named_modules())
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in small.model.named_modules())
    assert small.memory.weight_bytes < fast.memory.weight_bytes / 3
    tokens = mx.array([[1, 2, 3, 4, 5, 6]])
    np.testing.assert_allclose(np.array(fast.model(tokens)), np.array(small.model(tokens)), rtol=1e-3, atol=1e-3)


def test_repo_id_loads_from_the_hf_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's cache; with HF_HUB_OFFLINE nothing is fetched."""
    import mlx.core as mx
    from huggingface_hub import constants

    from parallm.models import ModelLoadError, load

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    lm = load("tiny-org/tiny-llama", device="cpu")
    assert lm.name == "tiny-org/tiny-llama" and commit in lm.source

    # org/name/file.gguf: one GGUF file of a cached repo
    tensors, config = gguf_tensors(tiny_model_dir)
    save_with_mlx(repo / "snapshots" / commit / "tiny-f32.gguf", tensors, gguf_metadata(config, TOKENIZER_DIR))
    gguf = load("tiny-org/tiny-llama/tiny-f32.gguf", device="cpu")
    assert gguf.name == "tiny-f32" and gguf.source.endswith("tiny-f32.gguf")
    tokens = mx.array([[1, 2, 3, 4]])
    np.testing.assert_allclose(np.array(gguf.model(tokens)), np.array(lm.model(tokens)), rtol=1e-4, atol=1e-4)

    with pytest.raises(ModelLoadError, match="not in the local cache"):
        load("tiny-org/not-downloaded", device="cpu")


def test_select_device():
    from parallm.models import ModelLoadError
    from parallm.models.device import gpu_backend, select_device

    assert select_device("cpu") == "cpu"
    assert select_device("auto") == ("gpu" if gpu_backend() else "cpu")
    if gpu_backend() is None:
        with pytest.raises(ModelLoadError, match="no GPU"):
            select_device("gpu")
    select_device("cpu")


def test_kv_bytes_per_token_formula():
    from parallm.models.memory import kv_bytes_per_token

    smollm2 = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert kv_bytes_per_token(smollm2, 2) == 2 * 30 * 3 * 64 * 2
    nested = {"text_config": dict(num_hidden_layers=4, num_attention_heads=8, head_dim=32)}
    assert kv_bytes_per_token(nested, 4) == 2 * 4 * 8 * 32 * 4
