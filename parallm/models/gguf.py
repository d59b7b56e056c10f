"""Load a GGUF file as an mlx-lm model: tensors via `mx.load`, names and hyperparameters mapped onto
mlx-lm's own model classes (so the result is called exactly like an mlx-lm model).

What `mx.load(path, return_metadata=True)` gives us: F32/F16 tensors as arrays, and Q4_0/Q4_1/Q8_0
tensors as MLX affine-quantized triplets `name.weight` (uint32), `name.scales`, `name.biases` with
group size 32, laid out (out_features, packed in_features) like nn.QuantizedLinear wants.

Two GGUF conventions to undo:
- llama.cpp's converter permutes the rows of attn_q / attn_k so that RoPE can rotate interleaved
  pairs (x0,x1),(x2,x3)... instead of halves. mlx-lm's llama rotates halves (like HF), so we apply
  the inverse permutation. Quantization groups run along the input dimension, so permuting rows of
  the packed weight, scales and biases is exact. (tests/models/test_gguf.py checks the logits.)
- No `output.weight` means the output projection is tied to the token embedding.
"""
from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass

from parallm.models.errors import ModelLoadError
from parallm.models.gguf_file import GGUFHeader

logger = logging.getLogger("parallm.models")


@dataclass(frozen=True)
class GGUFArchitecture:
    mlx_model_type: str  # the mlx_lm.models module
    qk_permuted: bool    # whether llama.cpp's converter permuted attn_q/attn_k rows


# general.architecture -> how to read it
ARCHITECTURES = {
    "llama": GGUFArchitecture("llama", qk_permuted=True),
    "qwen2": GGUFArchitecture("qwen2", qk_permuted=False),
}

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors llama.cpp writes that mlx-lm's models compute themselves.
_IGNORED_TENSORS = ("rope_freqs",)
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_0-9]+)\.(weight|scales|biases|bias)$")


def architecture_of(header: GGUFHeader) -> GGUFArchitecture:
    arch = header.architecture
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{header.path}: GGUF architecture {arch!r} is not supported. Supported GGUF "
            f"architectures: {', '.join(ARCHITECTURES)}. Other models load from an mlx-lm "
            f"directory or a Hugging Face repo id.")
    return ARCHITECTURES[arch]


def config_from_metadata(header: GGUFHeader) -> dict:
    """An HF/mlx-lm style config.json dict from the `<arch>.*` metadata keys."""
    md, arch = header.metadata, header.architecture
    spec = architecture_of(header)

    def get(key, default=None):
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{header.path}: GGUF metadata lacks {arch}.{key}; the file is "
                                 f"incomplete or not a language model")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = {t.name for t in header.tensors}
    vocab = md.get(f"{arch}.vocab_size")
    if vocab is None:  # older files: the embedding's row count, or the vocabulary's length
        embd = next(t for t in header.tensors if t.name == "token_embd.weight")
        vocab = embd.shape[1]
    config = dict(
        model_type=spec.mlx_model_type,
        hidden_size=hidden,
        num_hidden_layers=int(get("block_count")),
        intermediate_size=int(get("feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(md.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(md.get(f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(md.get(f"{arch}.context_length", 2048)),
        vocab_size=int(vocab),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
    )
    scaling = md.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(md[f"{arch}.rope.scaling.factor"])}
    elif scaling not in (None, "none"):
        logger.warning("%s: RoPE scaling %r is ignored; quality may drop past the original context",
                       header.path, scaling)
    if "rope_freqs.weight" in names:
        logger.warning("%s: rope_freqs (Llama 3.1 long-context RoPE factors) are ignored; quality "
                       "may drop beyond 8k tokens", header.path)
    return config


def _unpermute_rows(w, n_heads: int):
    """Inverse of llama.cpp's `permute`: rows (n_heads, 2, d/2) <- (n_heads, d/2, 2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def mlx_weights(raw: dict, config: dict, spec: GGUFArchitecture, path) -> dict:
    """GGUF tensor names -> mlx-lm parameter names, with q/k rows un-permuted where needed."""
    out = {}
    for name, value in raw.items():
        m = _NAME.match(name)
        if m is None or m.group(2) in _IGNORED_TENSORS:
            if m is None or m.group(2) not in _IGNORED_TENSORS:
                logger.warning("%s: ignoring unknown tensor %s", path, name)
            continue
        layer, base, suffix = m.groups()
        if layer is None:
            target = _GLOBAL_TENSORS.get(base)
        else:
            target = _LAYER_TENSORS.get(base)
            target = target and f"model.layers.{layer}.{target}"
        if target is None:
            raise ModelLoadError(f"{path}: tensor {name} has no counterpart in mlx-lm's "
                                 f"{spec.mlx_model_type} model; this GGUF variant is not supported")
        if spec.qk_permuted and base in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if base == "attn_q" else "num_key_value_heads"]
            value = _unpermute_rows(value, heads)
        out[f"{target}.{suffix}"] = value
    return out


def build_model(config: dict, weights: dict):
    """Instantiate the mlx-lm model for `config`, quantize the modules whose weights came packed
    (bits and group size read off each tensor's shapes), and load the weights strictly."""
    import mlx.nn as nn

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))

    def quantization_of(path: str, module) -> dict | bool:
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        in_dims = module.weight.shape[-1]
        group_size = in_dims // weights[f"{path}.scales"].shape[-1]
        bits = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
        return {"group_size": group_size, "bits": bits}

    nn.quantize(model, class_predicate=quantization_of)
    model.eval()
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelLoadError(f"GGUF tensors do not match the {config['model_type']} model built "
                             f"from its metadata: {e}") from e
    return model


def load_gguf(header: GGUFHeader):
    """(model, config, metadata) for a GGUF file whose header has already been validated."""
    import mlx.core as mx

    spec = architecture_of(header)
    config = config_from_metadata(header)
    try:
        raw, metadata = mx.load(str(header.path), return_metadata=True)
    except Exception as e:  # mx.load raises RuntimeError/ValueError with a terse message
        raise ModelLoadError(f"{header.path}: could not read the GGUF tensors ({e})") from e
    model = build_model(config, mlx_weights(raw, config, spec, header.path))
    return model, config, metadata
