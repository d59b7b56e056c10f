"""How much memory a model needs: weight bytes, and KV-cache bytes per token of context.

Estimated before loading (from file sizes and the config) so a user sees the cost up front, and
measured after loading (the parameters' actual bytes, which differ from the file when the CPU path
dequantizes). KV bytes per token = 2 (keys and values) x layers x kv_heads x head_dim x dtype size.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryEstimate:
    weight_bytes: int
    kv_bytes_per_token: int

    def kv_bytes(self, tokens: int) -> int:
        return self.kv_bytes_per_token * tokens

    def describe(self, context_length: int | None = None) -> str:
        text = f"weights {format_bytes(self.weight_bytes)}, KV cache {format_bytes(self.kv_bytes_per_token)}/token"
        if context_length:
            text += f" ({format_bytes(self.kv_bytes(context_length))} for one {context_length}-token sequence)"
        return text


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _text_config(config: dict) -> dict:
    """Multimodal configs nest the language model's settings in text_config."""
    return {**config, **config.get("text_config", {})}


def kv_bytes_per_token(config: dict, dtype_size: int) -> int:
    c = _text_config(config)
    layers = int(c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers") or 0)
    heads = int(c.get("num_attention_heads") or c.get("n_head") or 0)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = c.get("head_dim") or (int(c.get("hidden_size", 0)) // heads if heads else 0)
    return 2 * layers * kv_heads * int(head_dim) * dtype_size


def estimate_before_loading(config: dict, file_weight_bytes: int, dtype_size: int) -> MemoryEstimate:
    return MemoryEstimate(file_weight_bytes, kv_bytes_per_token(config, dtype_size))


def parameter_bytes(model) -> int:
    import mlx.nn as nn

    return sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))


def activation_dtype_size(model) -> int:
    """Bytes per element of the KV cache: the dtype the model computes in, found by one tiny forward
    pass through a fresh cache (exact whatever mix of quantized/f16/f32 tensors the file held)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([[0]]), cache=cache)
    for c in cache:
        keys = getattr(c, "keys", None)
        if isinstance(keys, mx.array):
            return keys.dtype.size
    return logits.dtype.size


def measure_after_loading(model, config: dict) -> MemoryEstimate:
    return MemoryEstimate(parameter_bytes(model), kv_bytes_per_token(config, activation_dtype_size(model)))
