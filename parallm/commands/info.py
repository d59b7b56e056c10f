"""`parallm info [SPEC]`: load a model and print what it is and what it needs."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a GGUF file, an mlx-lm model directory, or a Hugging Face repo id "
                             "(default: the embedded smollm2-135m-instruct)")
    parser.add_argument("--device", default="auto", choices=("auto", "gpu", "cpu"),
                        help="where MLX computes (default: auto = the GPU when there is one)")
    parser.add_argument("--keep-quantized", action="store_true",
                        help="on the CPU, keep quantized weights quantized (less memory, slower)")


def run(args: argparse.Namespace) -> int:
    from parallm._blas import blas_in_use
    from parallm.models import ModelLoadError, load
    from parallm.models.cache_layout import UnsupportedCache, probe_cache_layout
    from parallm.models.device import describe_device
    from parallm.models.memory import format_bytes

    try:
        lm = load(args.model, device=args.device, keep_quantized=args.keep_quantized)
    except ModelLoadError as e:
        print(f"parallm info: {e}", file=sys.stderr)
        return 1
    c = lm.config
    try:
        layout = probe_cache_layout(lm.model).describe()
    except UnsupportedCache as e:
        layout = f"not servable by the batched engine: {e}"
    rows = [
        ("name", lm.name),
        ("source", lm.source),
        ("architecture", c.get("model_type", "?")),
        ("layers", c.get("num_hidden_layers", "?")),
        ("cache", layout),
        ("context length", lm.context_length),
        ("weights", format_bytes(lm.memory.weight_bytes)),
        ("KV cache", f"{format_bytes(lm.memory.kv_bytes_per_token)} per token, "
                     f"{format_bytes(lm.memory.kv_bytes(lm.context_length))} per full-context sequence"),
        ("device", describe_device(lm.device)),
        ("weights on device", "; ".join(lm.notes)),
        ("BLAS", blas_in_use() if lm.device == "cpu" else "n/a (GPU)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
