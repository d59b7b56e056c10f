"""Decode throughput of a batch that mixes N LoRA adapters vs the same batch with no adapter.

Both run in one process on one model (the MultiLoRALinear layers attached, adapters loaded), each
with its own KV cache, interleaved step by step so machine noise hits both alike; throughput is
batch / median step time, and the printed ratio is mixed / base-only.
A third column runs the pristine model (no wrappers at all) to show what the wrappers cost when
no row uses an adapter.

The model is a random-weight Llama with SmolLM2-135M's shape (hidden 576, 30 layers, 9/3 heads,
MLP 1536, vocab 49152) in float32 by default; adapters are mlx-lm-default: rank 8, scale 20, every
linear of the last 16 layers (pass --keys q_proj,v_proj for attention-only adapters).
`--shape llama-1b` uses Llama-3.2-1B's shape instead (16 layers, hidden 2048), for GPU runs.

    python loadtests/bench_adapters.py --batch 32 64 --adapters 8 --steps 24
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parallm  # noqa: E402,F401  first: preloads an optimized BLAS before mlx loads (see parallm/_blas.py)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from parallm._blas import blas_in_use  # noqa: E402
from parallm.engine.adapter_manager import AdapterManager  # noqa: E402
from parallm.models.lora_kernel import shared_kernel  # noqa: E402

from bench_engine import SHAPES as LAYER_SHAPES  # noqa: E402  hidden, layers, heads, kv heads, MLP, head dim


def _llama_config(shape: str, vocab_size: int, rope_theta: float) -> dict:
    """A random Llama of one of bench_engine's layer shapes, with this benchmark's vocabulary."""
    hidden, layers, heads, kv_heads, intermediate, head_dim = LAYER_SHAPES[shape]
    return dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, rms_norm_eps=1e-5, rope_theta=rope_theta, tie_word_embeddings=True,
                max_position_embeddings=8192)


SMOLLM2_135M = _llama_config("135m", 49152, 100000.0)
# Llama-3.2-1B's shape (and vocabulary): the real-size GPU check
LLAMA_1B = _llama_config("1b", 128256, 500000.0)
SHAPES = {"smollm2-135m": SMOLLM2_135M, "llama-1b": LLAMA_1B}


def build_model(shape: dict, layers: int, dtype):
    from mlx_lm.models import llama

    config = dict(shape, num_hidden_layers=layers)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.update(nn.utils.tree_map(lambda p: p.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    return model


def write_adapters(model, out: Path, n: int, rank: int, num_layers: int, keys) -> list[Path]:
    """n mlx-lm adapter dirs with random non-zero A and B, written as mlx-lm's trainer does."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    dirs = []
    for i in range(n):
        m = copy.deepcopy(model)
        m.freeze()
        params = {"rank": rank, "dropout": 0.0, "scale": 20.0}
        if keys:
            params["keys"] = keys
        linear_to_lora_layers(m, num_layers, params)
        mx.random.seed(i)
        tensors = {k: mx.random.normal(v.shape) * 0.01 for k, v in tree_flatten(m.trainable_parameters())}
        d = out / f"a{i}"
        d.mkdir(parents=True)
        mx.save_safetensors(str(d / "adapters.safetensors"), tensors)
        (d / "adapter_config.json").write_text(json.dumps(
            {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}))
        dirs.append(d)
    return dirs


class DecodeRun:
    """One batch decoding greedily with its own KV cache; `step()` times one decode step."""

    def __init__(self, model, batch: int, prompt_len: int, before_forward, vocab: int):
        from mlx_lm.models.cache import make_prompt_cache

        self.model, self.before_forward = model, before_forward
        self.cache = make_prompt_cache(model)
        before_forward()
        mx.eval(model(mx.random.randint(0, vocab, (batch, prompt_len)), cache=self.cache))  # prefill
        self.tokens = mx.random.randint(0, vocab, (batch, 1))
        mx.eval(self.tokens)

    def step(self) -> float:
        start = time.perf_counter()
        self.before_forward()
        logits = self.model(self.tokens, cache=self.cache)
        self.tokens = mx.argmax(logits[:, -1, :], axis=-1)[:, None]
        mx.eval(self.tokens)
        return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m", help="the random model's shape")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks of the model (default: the shape's)")
    p.add_argument("--lora-layers", type=int, default=16, help="mlx-lm num_layers of the adapters")
    p.add_argument("--keys", default="", help="comma list, e.g. self_attn.q_proj,self_attn.v_proj")
    p.add_argument("--steps", type=int, default=24, help="timed decode steps per configuration")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-lora-kernel", action="store_true",
                   help="CUDA: keep the gather_mm path instead of the one-launch kernel (lora_kernel.py)")
    p.add_argument("--kernel-tile", default=None, metavar="TILExTHREADS",
                   help="CUDA: the LoRA kernel's outputs per block and threads, e.g. 1024x256 (default: lora_kernel's)")
    args = p.parse_args(argv)
    if args.kernel_tile:
        from bench_lora_kernel import use_tiles
        use_tiles(args.kernel_tile)
    if args.no_lora_kernel:
        from parallm.models import lora_kernel
        lora_kernel.set_enabled(False)

    dtype = getattr(mx, args.dtype)
    keys = [k for k in args.keys.split(",") if k] or None
    shape = SHAPES[args.shape]
    args.layers = args.layers or shape["num_hidden_layers"]
    vocab = shape["vocab_size"]
    model = build_model(shape, args.layers, dtype)
    pristine = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_adapters(model, Path(tmp), args.adapters, args.rank, args.lora_layers, keys)
        manager = AdapterManager("base", model, adapters_dir=tmp)
        names = []
        for d in dirs:
            names.append(manager.load(d.name, d.name).name)
        manager.apply_pending()
    print(f"device={mx.default_device()} blas={blas_in_use()} shape={args.shape} dtype={args.dtype} layers={args.layers} adapters={len(names)} "
          f"rank={args.rank} lora_layers={args.lora_layers} keys={keys or 'all linears'} "
          f"wrapped_linears={manager.wrapped_layer_count()} lora_kernel={shared_kernel() is not None} steps={args.steps} (median step, interleaved)")
    print(f"{'batch':>5} {'base tok/s':>11} {'mixed tok/s':>12} {'mixed/base':>10} {'pristine tok/s':>15} "
          f"{'base/pristine':>13}")
    for batch in args.batch:
        mixed_rows = [names[i % len(names)] for i in range(batch)]
        base_rows = [None] * batch
        runs = {"base": DecodeRun(model, batch, args.prompt_len, lambda: manager.bind_rows(base_rows), vocab),
                "mixed": DecodeRun(model, batch, args.prompt_len, lambda: manager.bind_rows(mixed_rows), vocab),
                "pristine": DecodeRun(pristine, batch, args.prompt_len, lambda: None, vocab)}
        times = {k: [] for k in runs}
        for _ in range(args.steps):  # interleaved step by step: neighbours' load hits all three alike
            for k, run in runs.items():
                times[k].append(run.step())
        tps = {k: batch / statistics.median(v) for k, v in times.items()}  # median step: robust to spikes
        print(f"{batch:>5} {tps['base']:>11.1f} {tps['mixed']:>12.1f} {tps['mixed'] / tps['base']:>10.3f} "
              f"{tps['pristine']:>15.1f} {tps['base'] / tps['pristine']:>13.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
