"""Weight precision per device: the fast CPU path.

On the CPU, MLX's quantized matmul does not batch (measured on SmolLM2-135M Q4: ~4 tok/s at any
batch size) while float32 matmul goes through BLAS (~84 tok/s at batch 32), and float16/bfloat16
have no BLAS path at all. So on the CPU we dequantize to float32 by default. `keep_quantized=True`
keeps weights as stored, for users short of memory. On a GPU, weights stay as stored.
"""
from __future__ import annotations


def _dequantized(module):
    """A float32 nn.Linear / nn.Embedding / SwitchLinear equal to a quantized module, or None.

    Affine scales and biases are widened to float32 *before* dequantizing: mx.dequantize returns
    the scales' dtype, and float16 output would round every weight (~1e-3 relative)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    if isinstance(module, nn.QuantizedLinear):
        cls = nn.Linear
    elif isinstance(module, nn.QuantizedEmbedding):
        cls = nn.Embedding
    elif isinstance(module, QuantizedSwitchLinear):
        cls = SwitchLinear
    else:
        return None
    mode = getattr(module, "mode", "affine")
    scales, biases = module.scales, module.get("biases")
    if mode == "affine":
        scales = scales.astype(mx.float32)
        biases = biases.astype(mx.float32) if biases is not None else None
    weight = mx.dequantize(module.weight, scales, biases, module.group_size, module.bits, mode)
    weight = weight.astype(mx.float32)
    has_bias = "bias" in module
    if cls is nn.Embedding:
        new = nn.Embedding(weight.shape[0], weight.shape[1])
    elif cls is nn.Linear:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    else:
        new = SwitchLinear(weight.shape[-1], weight.shape[-2], weight.shape[0], bias=has_bias)
    new.weight = weight
    if has_bias:
        new.bias = module.bias.astype(mx.float32)
    return new


def dequantize_to_float32(model) -> int:
    """Replace every quantized layer by a float32 one, in place; returns how many were replaced."""
    from mlx.utils import tree_unflatten

    replaced = [(name, new) for name, m in model.named_modules() if (new := _dequantized(m)) is not None]
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return len(replaced)


def prepare_weights(model, device: str, keep_quantized: bool = False) -> str:
    """Convert `model` in place for `device` ('cpu' or 'gpu'); returns what was done, for the log."""
    import mlx.core as mx
    import mlx.nn as nn

    if device != "cpu" or keep_quantized:
        return "weights kept as stored"
    done = []
    if dequantize_to_float32(model):
        done.append("dequantized")
    low = (mx.float16, mx.bfloat16)
    if any(v.dtype in low for _, v in nn.utils.tree_flatten(model.parameters())):
        model.update(nn.utils.tree_map(lambda p: p.astype(mx.float32) if p.dtype in low else p,
                                       model.parameters()))
        done.append("cast to float32")
    mx.eval(model.parameters())
    return " and ".join(done) + " for the CPU" if done else "weights already float32"
