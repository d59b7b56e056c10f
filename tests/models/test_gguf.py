"""GGUF loading: a tiny Llama written as GGUF (llama.cpp's names, metadata and q/k permutation)
gives the same logits as the same weights loaded from safetensors by mlx-lm."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tiny_models import TOKENIZER_DIR, write_tiny_llama
from models_gguf_helpers import (gguf_metadata, gguf_tensors, quantize_blocks, save_with_mlx,
                                 write_raw_gguf)

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 47, 2, 198, 1, 520]


def logits_of(model, tokens=PROMPT) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([tokens])).astype(mx.float32))


def reference_logits(model_dir) -> np.ndarray:
    import mlx_lm

    model, _ = mlx_lm.load(str(model_dir))
    return logits_of(model)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """A tiny Llama whose output head is its embedding matrix (GGUF then has no output.weight)."""
    return write_tiny_llama(tmp_path_factory.mktemp("tied"), tied=True)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    """A tiny Llama with a separate output projection (lm_head), so GGUF has output.weight."""
    import mlx.core as mx

    d = write_tiny_llama(tmp_path_factory.mktemp("untied"), seed=3)
    config = json.loads((d / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(d / "model.safetensors"))
    mx.random.seed(4)
    weights["lm_head.weight"] = mx.random.normal(weights["model.embed_tokens.weight"].shape) * 0.1
    mx.save_safetensors(str(d / "model.safetensors"), weights)
    return d


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_f32_gguf_matches_safetensors(which, tied_dir, untied_dir, tmp_path):
    from parallm.models import load

    model_dir = tied_dir if which == "tied" else untied_dir
    tensors, config = gguf_tensors(model_dir)
    assert ("output.weight" in tensors) == (which == "untied")
    path = save_with_mlx(tmp_path / "tiny.gguf", tensors, gguf_metadata(config, TOKENIZER_DIR))

    lm = load(str(path), device="cpu")
    got, want = logits_of(lm.model), reference_logits(model_dir)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got[0].argmax(-1) == want[0].argmax(-1)).all()
    assert lm.name == "tiny" and lm.context_length == config["max_position_embeddings"]
    assert lm.config["tie_word_embeddings"] == (which == "tied")


def test_without_unpermuting_the_logits_differ(tiny_model_dir, tmp_path):
    """Guards the test above: if the q/k rows were left permuted, the logits would not match."""
    import mlx.core as mx

    from parallm.models import load

    tensors, config = gguf_tensors(tiny_model_dir)
    hf = mx.load(str(tiny_model_dir / "model.safetensors"))
    for layer in range(config["num_hidden_layers"]):  # q/k in HF order, NOT the way llama.cpp writes them
        for gguf_name, hf_name in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            tensors[f"blk.{layer}.{gguf_name}.weight"] = np.array(hf[f"model.layers.{layer}.self_attn.{hf_name}.weight"])
    path = save_with_mlx(tmp_path / "unpermuted.gguf", tensors, gguf_metadata(config, TOKENIZER_DIR))
    got, want = logits_of(load(str(path), device="cpu").model), reference_logits(tiny_model_dir)
    assert np.abs(got - want).max() > 1e-2


def test_f16_gguf_close_to_safetensors(tiny_model_dir, tmp_path):
    from parallm.models import load

    tensors, config = gguf_tensors(tiny_model_dir)
    path = save_with_mlx(tmp_path / "tiny-f16.gguf", tensors, gguf_metadata(config, TOKENIZER_DIR, file_type="F16"),
                         dtype="F16")
    lm = load(str(path), device="cpu")
    got, want = logits_of(lm.model), reference_logits(tiny_model_dir)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=5e-2)
    assert lm.memory.weight_bytes > 0


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_gguf_matches_dequantized_reference(kind, tiny_model_dir, tmp_path):
    """mx.save_gguf cannot write quantized tensors, so a raw writer encodes ggml blocks. The
    reference is mlx-lm on float32 weights equal to what those blocks decode to (quantization is
    per row, so quantizing the HF-order rows gives the same values as permuting first). Q5_0/Q5_1
    are read by parallm's own reader (gguf_quants), the others by mx.load."""
    import mlx.core as mx
    import mlx.nn as nn

    from parallm.models import load

    tensors, config = gguf_tensors(tiny_model_dir)
    path, _ = write_raw_gguf(tmp_path / f"tiny-{kind}.gguf", tensors,
                             gguf_metadata(config, TOKENIZER_DIR, file_type=kind), kind)

    ref_dir = tmp_path / "reference"
    shutil.copytree(tiny_model_dir, ref_dir)
    hf = mx.load(str(tiny_model_dir / "model.safetensors"))
    decoded = {k: mx.array(quantize_blocks(np.array(v), kind)[1]) if v.ndim == 2 else v for k, v in hf.items()}
    mx.save_safetensors(str(ref_dir / "model.safetensors"), decoded)
    want = reference_logits(ref_dir)

    lm = load(str(path), device="cpu")  # CPU default: dequantized to float32
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in lm.model.named_modules())
    np.testing.assert_allclose(logits_of(lm.model), want, rtol=1e-3, atol=1e-3)

    kept = load(str(path), device="cpu", keep_quantized=True)
    bits = {m.bits for _, m in kept.model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert bits == {{"Q8_0": 8, "Q5_0": 5, "Q5_1": 5}.get(kind, 4)}
    assert kept.memory.weight_bytes < lm.memory.weight_bytes / 3
    np.testing.assert_allclose(logits_of(kept.model), want, rtol=2e-2, atol=2e-2)


def test_qwen2_gguf_matches_safetensors(tmp_path):
    """qwen2 GGUFs: q/k/v biases, and no q/k permutation (llama.cpp permutes for llama only)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import qwen2

    from parallm.models import load

    config = dict(model_type="qwen2", vocab_size=49152, hidden_size=64, num_hidden_layers=2,
                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=True)
    mx.random.seed(7)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.update(nn.utils.tree_map(lambda p: p * 4 if p.ndim == 1 else p, model.parameters()))
    model_dir = tmp_path / "qwen"
    model_dir.mkdir()
    mx.save_safetensors(str(model_dir / "model.safetensors"), dict(nn.utils.tree_flatten(model.parameters())))
    (model_dir / "config.json").write_text(json.dumps(config))
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, model_dir / f.name)

    tensors, _ = gguf_tensors(model_dir, permute_qk=False)
    assert "blk.0.attn_q.bias" in tensors
    path = save_with_mlx(tmp_path / "qwen.gguf", tensors, gguf_metadata(config, TOKENIZER_DIR, arch="qwen2"))
    lm = load(str(path), device="cpu")
    assert lm.config["model_type"] == "qwen2" and lm.context_length == 4096
    np.testing.assert_allclose(logits_of(lm.model), reference_logits(model_dir), rtol=1e-4, atol=1e-4)
