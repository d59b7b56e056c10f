"""Does one matmul for q/k/v, and one for gate/up, make a decode step cheaper? (--fuse-projections)

On CUDA a 1B model's decode step is host-bound: 60-70% of it is spent inside mx.async_eval, MLX
queuing the step's kernels (BENCHMARKS.md, seventh session, the "dispatch" phase), so kernels per
layer cost more than their FLOPs. parallm/models/fused_projections.py runs the projections that
share an input as one matmul against their concatenated weights: q/k/v 3 -> 1, gate/up 2 -> 1 per
layer. This measures it on mlx-lm's own forward and KV cache (not parallm's engine): two copies of
one random Llama, `stock` and `fused` (fuse_projections applied), decode at batch B, interleaved
step by step so that the host's drift cancels.

Per variant: median ms per step of graph build (Python) and of evaluation (dispatch + device), the
graph's nodes per step by primitive (mx.export_to_dot), and the largest |logit| difference from
stock on the same cache contents. --bits 4 quantizes both copies first (as a GGUF Q4 model loads).

  python loadtests/bench_fused_projections.py --shape 1b --batch 64 --steps 40 --dtype bfloat16   # on a GPU
  python loadtests/bench_fused_projections.py --shape 1b --bits 4 ...                             # quantized
  python loadtests/bench_fused_projections.py --shape tiny --batch 8 --steps 10                   # a CPU check
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import parallm  # noqa: E402,F401  (BLAS preload before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from parallm.models.fused_projections import fuse_projections  # noqa: E402

from bench_engine import SHAPES  # noqa: E402  hidden, layers, heads, kv heads, intermediate, head_dim

VARIANTS = ("stock", "fused")
VIEWS = {"Broadcast", "Reshape", "Slice", "Split", "Transpose"}  # nodes that need not launch a kernel


def build_model(shape: str, dtype, bits: int, seed: int = 0) -> llama.Model:
    hidden, layers, heads, kv_heads, intermediate, head_dim = SHAPES[shape]
    args = llama.ModelArgs.from_dict(dict(
        model_type="llama", vocab_size=32000 if shape == "tiny" else 128256, hidden_size=hidden,
        num_hidden_layers=layers, intermediate_size=intermediate, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=True, max_position_embeddings=8192))
    mx.random.seed(seed)  # both copies get the same weights
    model = llama.Model(args)
    model.update(nn.utils.tree_map(lambda p: p.astype(dtype), model.parameters()))
    if bits:
        nn.quantize(model, group_size=32 if hidden % 64 else 64, bits=bits)
    mx.eval(model.parameters())
    return model


def graph_nodes(*outputs) -> collections.Counter:
    fd, path = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        mx.export_to_dot(path, *outputs)
        text = Path(path).read_text()
    finally:
        os.unlink(path)
    return collections.Counter(part.split('"')[0] for part in text.split('[label ="')[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128, help="tokens in each row's cache before decoding")
    p.add_argument("--steps", type=int, default=40, help="decode steps per variant")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--bits", type=int, default=0, choices=(0, 4, 8), help="quantize both copies first (0: no)")
    args = p.parse_args(argv)
    dtype = getattr(mx, args.dtype)
    models = {"stock": build_model(args.shape, dtype, args.bits), "fused": build_model(args.shape, dtype, args.bits)}
    groups = fuse_projections(models["fused"])
    vocab = models["stock"].args.vocab_size
    prompt = mx.random.randint(0, vocab, (args.batch, args.prompt_len))

    # the same prefill in one cache per variant, plus one more for the equality check
    caches = {}
    for name in [*VARIANTS, "check"]:
        model = models.get(name, models["stock"])
        caches[name] = make_prompt_cache(model)
        logits = model(prompt, cache=caches[name])
        mx.eval(logits, [c.state for c in caches[name]])
    first = mx.argmax(logits[:, -1, :], axis=-1)[:, None]
    mx.eval(first)

    result = {"args": vars(args), "device": str(mx.default_device()), "fused_groups": groups, "variants": {}}
    check = {}
    for name in VARIANTS:  # one step of each variant on a copy of the same cache contents
        model = models[name]
        cache = make_prompt_cache(model)
        for c, src in zip(cache, caches["check"]):
            c.state = [mx.array(s) for s in src.state]
            c.offset = src.offset
        out = model(first, cache=cache)[:, -1, :].astype(mx.float32)
        nodes = graph_nodes(mx.argmax(out, axis=-1))
        mx.eval(out)
        check[name] = out
        result["variants"][name] = {"nodes": sum(nodes.values()),
                                    "nodes_not_views": sum(v for k, v in nodes.items() if k not in VIEWS),
                                    "by_primitive": dict(nodes.most_common())}
    for name in VARIANTS:
        result["variants"][name]["max_abs_logit_diff_vs_stock"] = round(
            mx.max(mx.abs(check[name] - check["stock"])).item(), 5)

    tokens = {name: first for name in VARIANTS}
    times = {name: ([], []) for name in VARIANTS}
    for step in range(args.steps + 3):  # the first 3 rounds compile and are left out
        order = VARIANTS if step % 2 == 0 else VARIANTS[::-1]
        for name in order:
            t0 = time.perf_counter()
            nxt = mx.argmax(models[name](tokens[name], cache=caches[name])[:, -1, :], axis=-1)[:, None]
            t1 = time.perf_counter()
            mx.eval(nxt)
            t2 = time.perf_counter()
            tokens[name] = nxt
            if step >= 3:
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
    for name in VARIANTS:
        build, evaluate = (statistics.median(v) * 1e3 for v in times[name])
        result["variants"][name].update(build_ms=round(build, 3), eval_ms=round(evaluate, 3),
                                        step_ms=round(build + evaluate, 3))
    base = result["variants"]["stock"]["step_ms"]
    for name in VARIANTS:
        result["variants"][name]["stock_over_this"] = round(base / result["variants"][name]["step_ms"], 3)
    print(json.dumps(result))
    for name in VARIANTS:
        v = result["variants"][name]
        print(f"{name:8s} build {v['build_ms']:7.2f} ms  eval {v['eval_ms']:7.2f} ms  speed vs stock "
              f"{v['stock_over_this']:.3f}x  nodes {v['nodes']} ({v['nodes_not_views']} not views)  "
              f"max |dlogit| {v['max_abs_logit_diff_vs_stock']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
