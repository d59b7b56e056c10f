"""Weight precision per device: the fast CPU path.

On the CPU, MLX's quantized matmul does not batch (measured on SmolLM2-135M Q4: ~4 tok/s at any
batch size) while float32 matmul goes through BLAS (~84 tok/s at batch 32), and float16/bfloat16
have no BLAS path at all. So on the CPU we dequantize to float32 by default. `keep_quantized=True`
keeps weights as stored, for users short of memory. On a GPU, weights stay as stored.
"""
from __future__ import annotations


def _has_quantized(model) -> bool:
    import mlx.nn as nn

    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def prepare_weights(model, device: str, keep_quantized: bool = False) -> str:
    """Convert `model` in place for `device` ('cpu' or 'gpu'); returns what was done, for the log."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import dequantize_model

    if device != "cpu" or keep_quantized:
        return "weights kept as stored"
    done = []
    if _has_quantized(model):
        dequantize_model(model)
        done.append("dequantized")
    low = [k for k, v in nn.utils.tree_flatten(model.parameters())
           if v.dtype in (mx.float16, mx.bfloat16)]
    if low:
        model.update(nn.utils.tree_map(
            lambda p: p.astype(mx.float32) if p.dtype in (mx.float16, mx.bfloat16) else p,
            model.parameters()))
        done.append("cast to float32")
    mx.eval(model.parameters())
    return " and ".join(done) + " for the CPU" if done else "weights already float32"
