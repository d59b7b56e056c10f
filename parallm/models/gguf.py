"""Load a GGUF file as an mlx-lm model: tensors read by `mx.load` (files of only the types it
handles) or by parallm/models/gguf_quants.py (everything else: K-quants, Q5_0/Q5_1, BF16), names
and hyperparameters mapped onto mlx-lm's own model classes (so the result is called exactly like
an mlx-lm model). Architectures: llama, qwen2, qwen3, gemma, gemma2, gemma3, phi3.

Quantized matrices arrive as MLX affine-quantized triplets `name.weight` (uint32), `name.scales`,
`name.biases` with group size 32, laid out (out_features, packed in_features) like
nn.QuantizedLinear wants; build_model reads each module's bits off the shapes, so a mixed file
(Q4_K_M: Q4_K and Q6_K matrices, F32 norms) gives modules of different bits.

GGUF conventions to undo (each checked by a logits test in tests/models/test_gguf*.py):
- llama.cpp's converter permutes the rows of attn_q / attn_k of `llama` models so that RoPE can
  rotate interleaved pairs (x0,x1),(x2,x3)... instead of halves. mlx-lm's llama rotates halves
  (like HF), so we apply the inverse permutation. Quantization groups run along the input
  dimension, so permuting rows of the packed weight, scales and biases is exact. Other
  architectures use llama.cpp's NEOX RoPE and are written unpermuted.
- For Gemma, the converter adds 1 to every norm weight (HF's Gemma RMSNorm scales by 1 + w,
  llama.cpp's by w); mlx-lm's Gemma RMSNorm adds the 1 itself, so we subtract it.
- No `output.weight` means the output projection is tied to the token embedding.
"""
from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass, field

from parallm.models.load_errors import ModelLoadError
from parallm.models.gguf_file import GGUFHeader, tensor_bytes, tensor_named

logger = logging.getLogger("parallm.models")

_ATTENTION = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm"}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LLAMA_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_ATTENTION, **_MLP}
# Gemma 2/3 have four norms per layer; llama.cpp's `ffn_norm` is then the pre-feed-forward one.
_GEMMA2_LAYER = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                 **_ATTENTION, **_MLP}
# Phi-3 keeps HF's fused projections: attn_qkv is q, k, v stacked; ffn_up is gate then up.
_PHI3_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
               "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors llama.cpp writes that mlx-lm's models compute themselves, or that go into the config.
_IGNORED_TENSORS = ("rope_freqs", "rope_factors_long", "rope_factors_short")
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_0-9]+)\.(weight|scales|biases|bias)$")


@dataclass(frozen=True)
class GGUFArchitecture:
    mlx_model_type: str  # the mlx_lm.models module
    qk_permuted: bool = False  # whether llama.cpp's converter permuted attn_q/attn_k rows
    norm_shift: float = 0.0    # what the converter added to every norm weight
    layer_tensors: dict = field(default_factory=lambda: _LLAMA_LAYER)


# general.architecture -> how to read it
ARCHITECTURES = {
    "llama": GGUFArchitecture("llama", qk_permuted=True),
    "qwen2": GGUFArchitecture("qwen2"),
    "qwen3": GGUFArchitecture("qwen3"),
    "gemma": GGUFArchitecture("gemma", norm_shift=1.0),
    "gemma2": GGUFArchitecture("gemma2", norm_shift=1.0, layer_tensors=_GEMMA2_LAYER),
    "gemma3": GGUFArchitecture("gemma3_text", norm_shift=1.0, layer_tensors=_GEMMA2_LAYER),
    "phi3": GGUFArchitecture("phi3", layer_tensors=_PHI3_LAYER),
}


def architecture_of(header: GGUFHeader) -> GGUFArchitecture:
    arch = header.architecture
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{header.path}: GGUF architecture {arch!r} is not supported. Supported GGUF "
            f"architectures: {', '.join(ARCHITECTURES)}. Other models load from an mlx-lm "
            f"directory or a Hugging Face repo id.")
    return ARCHITECTURES[arch]


def _read_f32(header: GGUFHeader, name: str) -> list[float] | None:
    import numpy as np

    from parallm.models.gguf_quants import convert_tensor

    info = tensor_named(header, name)
    if info is None:
        return None
    value = convert_tensor(tensor_bytes(header, info), info.type_name, info.shape[::-1])["weight"]
    return np.array(value).astype(np.float32).reshape(-1).tolist()


def _gemma_scalar(config: dict, big_layer_count: int) -> float:
    """Gemma 2/3's query_pre_attn_scalar, which GGUF does not store: llama.cpp uses hidden / heads
    for the 27B models (recognised by their layer count) and head_dim otherwise."""
    if config["num_hidden_layers"] == big_layer_count:
        return config["hidden_size"] // config["num_attention_heads"]
    return config["head_dim"]


def _architecture_config(header: GGUFHeader, arch: str, config: dict, get) -> dict:
    """The keys a family needs beyond the common ones, from `<arch>.*` metadata (as llama.cpp's
    convert_hf_to_gguf.py writes them, and with llama.cpp's defaults where it has them)."""
    if arch == "gemma2":
        return dict(attn_logit_softcapping=float(get("attn_logit_softcapping", 50.0)),
                    final_logit_softcapping=float(get("final_logit_softcapping", 30.0)),
                    query_pre_attn_scalar=_gemma_scalar(config, 46))
    if arch == "gemma3":
        # llama.cpp hard-codes these for gemma3: every 6th layer global, local RoPE base 1e4 (a
        # pattern stated as one number in the file is taken, as more specific)
        pattern = get("attention.sliding_window_pattern", 6)
        return dict(sliding_window=int(get("attention.sliding_window")),
                    sliding_window_pattern=pattern if isinstance(pattern, int) else 6,
                    rope_local_base_freq=10000.0, query_pre_attn_scalar=_gemma_scalar(config, 62))
    if arch == "phi3":
        extra = dict(original_max_position_embeddings=int(get("rope.scaling.original_context_length",
                                                              config["max_position_embeddings"])))
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        extra["partial_rotary_factor"] = int(get("rope.dimension_count", head_dim)) / head_dim
        long, short = _read_f32(header, "rope_factors_long.weight"), _read_f32(header, "rope_factors_short.weight")
        if long is not None:  # LongRoPE (Phi-3 128k, Phi-3.5): the factors are tensors
            extra["rope_scaling"] = {"type": "longrope", "long_factor": long, "short_factor": short or long}
        return extra
    return {}


def config_from_metadata(header: GGUFHeader) -> dict:
    """An HF/mlx-lm style config.json dict from the `<arch>.*` metadata keys."""
    md, arch = header.metadata, header.architecture
    spec = architecture_of(header)
    _missing = object()

    def get(key, default=_missing):
        value = md.get(f"{arch}.{key}", default)
        if value is _missing or value is None:
            raise ModelLoadError(f"{header.path}: GGUF metadata lacks {arch}.{key}; the file is "
                                 f"incomplete or not a language model")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = {t.name for t in header.tensors}
    vocab = md.get(f"{arch}.vocab_size")
    if vocab is None:  # older files: the embedding's row count
        embd = tensor_named(header, "token_embd.weight")
        if embd is None:
            raise ModelLoadError(f"{header.path}: GGUF file without token_embd.weight")
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
    config.update(_architecture_config(header, arch, config, get))
    return config


def _unpermute_rows(w, n_heads: int):
    """Inverse of llama.cpp's `permute`: rows (n_heads, 2, d/2) <- (n_heads, d/2, 2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def mlx_name(name: str, spec: GGUFArchitecture, path) -> tuple[str, str] | None:
    """(mlx-lm parameter name, GGUF base name) for a GGUF tensor name, or None to skip it."""
    m = _NAME.match(name)
    if m is None or m.group(2) in _IGNORED_TENSORS:
        if m is None:
            logger.warning("%s: ignoring unknown tensor %s", path, name)
        return None
    layer, base, suffix = m.groups()
    if layer is None:
        target = _GLOBAL_TENSORS.get(base)
    else:
        target = spec.layer_tensors.get(base)
        target = target and f"model.layers.{layer}.{target}"
    if target is None:
        raise ModelLoadError(f"{path}: tensor {name} has no counterpart in mlx-lm's "
                             f"{spec.mlx_model_type} model; this GGUF variant is not supported")
    return f"{target}.{suffix}", base


def mlx_weights(raw: dict, config: dict, spec: GGUFArchitecture, path) -> dict:
    """GGUF tensor names -> mlx-lm parameter names, with q/k rows un-permuted and norm shifts
    undone where needed."""
    out = {}
    for name, value in raw.items():
        mapped = mlx_name(name, spec, path)
        if mapped is None:
            continue
        target, base = mapped
        if spec.qk_permuted and base in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if base == "attn_q" else "num_key_value_heads"]
            value = _unpermute_rows(value, heads)
        if spec.norm_shift and base.endswith("norm"):
            value = value - spec.norm_shift
        out[target] = value
    return out


def build_model(config: dict, weights: dict):
    """Instantiate the mlx-lm model for `config`, quantize the modules whose weights came packed
    (bits and group size read off each tensor's shapes), and load the weights strictly."""
    import mlx.nn as nn

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    if hasattr(model, "sanitize"):  # as mlx-lm's loader does: e.g. gemma3 ties its head here
        weights = model.sanitize(weights)

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


# Types `mx.load` reads itself, ~3x faster than parallm's numpy route and to identical arrays
# (tests/models/test_gguf_kquants.py compares the two). It misreads Q4_K and fails on Q5_x, so a
# file with any other type goes through gguf_quants whole.
MX_LOAD_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")


def read_tensors(header: GGUFHeader, spec: GGUFArchitecture, *, use_mx_load: bool | None = None) -> dict:
    """Every tensor the model uses, by GGUF name, as MLX arrays (quantized ones as
    `<name>.weight/.scales/.biases`). On the numpy route tensors are converted one at a time from a
    memory map, so a requantized tensor's float32 copy exists for one chunk of one tensor at a time."""
    import mlx.core as mx

    from parallm.models.gguf_quants import convert_tensor

    if use_mx_load is None:
        use_mx_load = all(t.type_name in MX_LOAD_TYPES for t in header.tensors)
    if use_mx_load:
        try:
            return mx.load(str(header.path))
        except Exception as e:  # mx.load raises RuntimeError/ValueError with a terse message
            raise ModelLoadError(f"{header.path}: could not read the GGUF tensors ({e})") from e
    raw = {}
    for info in header.tensors:
        if mlx_name(info.name, spec, header.path) is None:
            continue
        stem = info.name[:-len(".weight")] if info.name.endswith(".weight") else info.name
        try:
            arrays = convert_tensor(tensor_bytes(header, info), info.type_name, info.shape[::-1])
        except (ValueError, OSError) as e:
            raise ModelLoadError(f"{header.path}: could not read tensor {info.name} "
                                 f"({info.type_name}, shape {info.shape}): {e}") from e
        for suffix, value in arrays.items():
            raw[info.name if suffix == "weight" else f"{stem}.{suffix}"] = value
    return raw


def load_gguf(header: GGUFHeader, config: dict | None = None):
    """(model, config, metadata) for a GGUF file whose header has already been validated."""
    spec = architecture_of(header)
    config = config or config_from_metadata(header)
    model = build_model(config, mlx_weights(read_tensors(header, spec), config, spec, header.path))
    return model, config, header.metadata
