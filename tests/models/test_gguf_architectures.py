"""GGUF architectures beyond llama/qwen2: a tiny random model of each family, written as GGUF the
way llama.cpp's convert_hf_to_gguf.py writes it (gguf-py's GGUFWriter and tensor name map, the
metadata each model class writes, Gemma's norm + 1, Phi-3's LongRoPE factors as tensors), gives the
same logits as the same weights loaded from safetensors by mlx-lm. Norm weights are randomised
(mlx-lm initialises them all equal), so a norm mapped to the wrong slot would show."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from family_configs import FAMILIES, build_family_model
from models_gguf_helpers import write_with_gguf_py
from tiny_models import TOKENIZER_DIR

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 47, 2, 198, 1, 520]  # longer than windows of 8

# Configs GGUF can state: llama.cpp fixes Gemma 3's pattern at one global layer in 6, so the tiny
# Gemma 3 has 6 layers (5 sliding, window 8, then 1 global) rather than family_configs' 2. Gemma
# 2/3 heads are 32 wide (not hidden / heads = 16), as GGUF does not store query_pre_attn_scalar
# and llama.cpp takes head_dim for it: a loader taking hidden / heads would then fail.
_GEMMA_HEADS = dict(head_dim=32, query_pre_attn_scalar=32)
CONFIGS = {
    "qwen3": FAMILIES["qwen3"],
    "gemma": dict(FAMILIES["gemma2"], model_type="gemma", num_key_value_heads=1),
    "gemma2": dict(FAMILIES["gemma2"], **_GEMMA_HEADS),
    "gemma3": dict(FAMILIES["gemma3"], num_hidden_layers=6, sliding_window_pattern=6, **_GEMMA_HEADS),
    "phi3": FAMILIES["phi3"],
}


def logits_of(model, tokens=PROMPT) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([tokens])).astype(mx.float32))


def write_model(arch: str, out) -> tuple[dict, dict]:
    """An mlx-lm directory for `arch` (family_configs' weights where the config is theirs), with
    random norm weights. Returns (config, float32 weights by mlx-lm name)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = json.loads(json.dumps(CONFIGS[arch]))
    if arch in FAMILIES and FAMILIES[arch] == CONFIGS[arch]:
        model, _ = build_family_model(arch)
    else:
        model_cls, args_cls = _get_classes(config)
        mx.random.seed(1)
        model = model_cls(args_cls.from_dict(json.loads(json.dumps(config))))
    mx.random.seed(2)
    weights = {k: v.astype(mx.float32) + (0.3 * mx.random.normal(v.shape) if v.ndim == 1 else 0)
               for k, v in tree_flatten(model.parameters())}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, out / f.name)
    return config, {k: np.array(v) for k, v in weights.items()}


def gguf_tensors(arch: str, weights: dict, config: dict, *, norm_plus_one: bool = True) -> dict:
    """GGUF-named tensors, as the converter maps them (gguf-py's TensorNameMap for the arch)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    out = {}
    for name, value in weights.items():
        base, suffix = name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        assert gguf_name, f"llama.cpp has no name for {name}"
        if arch.startswith("gemma") and norm_plus_one and name.endswith("norm.weight"):
            value = value + 1  # Gemma*Model.modify_tensors: HF's (1 + w) norm as llama.cpp's w
        out[f"{gguf_name}.{suffix}"] = value
    if arch == "phi3":  # Phi3MiniModel.generate_extra_tensors
        out["rope_factors_long.weight"] = np.array(config["rope_scaling"]["long_factor"], np.float32)
        out["rope_factors_short.weight"] = np.array(config["rope_scaling"]["short_factor"], np.float32)
    return out


def gguf_hparams(arch: str, c: dict) -> dict:
    """GGUFWriter calls, as each model class's set_gguf_parameters makes them."""
    hp = dict(add_block_count=c["num_hidden_layers"], add_context_length=c["max_position_embeddings"],
              add_embedding_length=c["hidden_size"], add_feed_forward_length=c["intermediate_size"],
              add_head_count=c["num_attention_heads"], add_head_count_kv=c["num_key_value_heads"],
              add_layer_norm_rms_eps=c["rms_norm_eps"], add_file_type=0)
    if arch != "phi3":
        hp.update(add_key_length=c["head_dim"], add_value_length=c["head_dim"])
    if arch in ("qwen3", "gemma3", "phi3"):  # Gemma 1/2 write no base: llama.cpp's 10000 applies
        hp["add_rope_freq_base"] = c["rope_theta"]
    if arch == "gemma2":
        hp.update(add_attn_logit_softcapping=c["attn_logit_softcapping"],
                  add_final_logit_softcapping=c["final_logit_softcapping"], add_sliding_window=4096)
    if arch == "gemma3":
        hp.update(add_sliding_window=c["sliding_window"], add_rope_scaling_type="linear",
                  add_rope_scaling_factor=c["rope_scaling"]["factor"])
    if arch == "phi3":
        head_dim = c["hidden_size"] // c["num_attention_heads"]
        original = c["original_max_position_embeddings"]
        hp.update(add_rope_scaling_orig_ctx_len=original, add_rope_dimension_count=head_dim,
                  add_sliding_window=0, add_rope_scaling_attn_factors=math.sqrt(
                      1 + math.log(c["max_position_embeddings"] / original) / math.log(original)))
    return hp


def write_gguf(arch: str, tmp_path, **kwargs):
    import gguf

    config, weights = write_model(arch, tmp_path / "hf")
    hparams = gguf_hparams(arch, config)
    if "add_rope_scaling_type" in hparams:
        hparams["add_rope_scaling_type"] = gguf.RopeScalingType.LINEAR
    path = write_with_gguf_py(tmp_path / f"{arch}.gguf", arch, gguf_tensors(arch, weights, config, **kwargs),
                              hparams, TOKENIZER_DIR)
    return path, config


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_f32_gguf_matches_safetensors(arch, tmp_path):
    import mlx_lm

    from parallm.models import load

    path, config = write_gguf(arch, tmp_path)
    lm = load(str(path), device="cpu")
    assert lm.config["model_type"] == config["model_type"]
    reference, _ = mlx_lm.load(str(tmp_path / "hf"))
    got, want = logits_of(lm.model), logits_of(reference)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got[0].argmax(-1) == want[0].argmax(-1)).all()


def test_gemma_norms_without_the_shift_differ(tmp_path):
    """Guards the test above: were the converter's + 1 not undone, the logits would not match."""
    import mlx_lm

    from parallm.models import load

    path, _ = write_gguf("gemma2", tmp_path, norm_plus_one=False)
    reference, _ = mlx_lm.load(str(tmp_path / "hf"))
    assert np.abs(logits_of(load(str(path), device="cpu").model) - logits_of(reference)).max() > 1e-2


def test_phi3_longrope_factors_come_from_the_tensors(tmp_path):
    from parallm.models.gguf import config_from_metadata
    from parallm.models.gguf_file import read_gguf_header

    path, config = write_gguf("phi3", tmp_path)
    got = config_from_metadata(read_gguf_header(path))
    assert got["rope_scaling"]["type"] == "longrope"
    np.testing.assert_allclose(got["rope_scaling"]["long_factor"], config["rope_scaling"]["long_factor"])
    np.testing.assert_allclose(got["rope_scaling"]["short_factor"], config["rope_scaling"]["short_factor"])
    assert got["original_max_position_embeddings"] == 512 and got["max_position_embeddings"] == 2048
