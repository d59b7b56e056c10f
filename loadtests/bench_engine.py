"""parallm's engine vs mlx-lm's BatchGenerator: same model, same process, same prompts.

For each batch size, both generate `--gen` tokens (greedy, no EOS stop) for `batch` prompts of
mixed lengths, submitted together; generated tok/s = generated tokens / wall time from submit to
the last token (prefill included). Baseline and candidate are interleaved round by round so the
ratio survives a noisy machine; the best round of each is kept.

    python loadtests/bench_engine.py --batches 1 8 32 --gen 32 --json out.json     # the default model
    python loadtests/bench_engine.py --random-llama 1b --dtype bfloat16 --batches 64 128 --gen 128

The JSON (--json) is what loadtests/plot_bench.py draws.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    batch: int
    mlx_lm_tok_s: float
    parallm_tok_s: float
    ratio: float
    generated_tokens: int


SHAPES = {  # hidden, layers, heads, kv heads, intermediate, head_dim (as /work/shared/gpu/make_random_model.py)
    "tiny": (64, 2, 4, 2, 128, 16),  # for measuring per-step overhead, not model speed
    "135m": (576, 30, 9, 3, 1536, 64),
    "1b": (2048, 16, 32, 8, 8192, 64),
    "8b": (4096, 32, 32, 8, 14336, 128),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model spec for parallm.models.load (default model if unset)")
    p.add_argument("--random-llama", choices=sorted(SHAPES), default=None,
                   help="instead of --model: a random-weight Llama of this shape (no download)")
    p.add_argument("--dtype", default="float32", help="dtype for --random-llama")
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    p.add_argument("--gen", type=int, default=64, help="tokens generated per sequence")
    p.add_argument("--gen-min", type=int, default=None,
                   help="if set, each sequence generates a random count in [gen-min, gen] (same for both)")
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--build-ahead-max-kv-mb", type=float, default=None,
                   help="EngineConfig.build_ahead_max_kv_bytes in MiB (default: the engine's default)")
    p.add_argument("--no-overlap", action="store_true", help="EngineConfig.overlap=False")
    p.add_argument("--no-decode-kernels", action="store_true", help="EngineConfig.decode_kernels=False")
    p.add_argument("--pass-cost", type=int, default=None,
                   help="PassShapes.pass_cost_tokens (how many padded tokens a prefill pass is worth)")
    p.add_argument("--json", default=None, help="write the results here as JSON")




@dataclass
class _Loaded:
    model: object
    tokenizer: object
    context_length: int
    name: str
    config: dict


def _load(args):
    import mlx.core as mx

    if args.random_llama is None:
        from parallm.models import load

        return load(args.model, device=args.device)
    from mlx_lm.models import llama

    import mlx.nn as nn

    h, n_layers, heads, kv, inter, head_dim = SHAPES[args.random_llama]
    config = dict(model_type="llama", vocab_size=49152, hidden_size=h, num_hidden_layers=n_layers,
                  intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                  rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                  max_position_embeddings=8192)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    dtype = getattr(mx, args.dtype)
    # small weights keep activations finite in bf16; throughput does not depend on the values
    for name, p in nn.utils.tree_flatten(model.parameters()):
        model.update(nn.utils.tree_unflatten([(name, (p * 0.02).astype(dtype))]))
        mx.eval(model.parameters())

    class _NoTokenizer:  # detokenizing random ids is not what this measures
        eos_token_ids: list = []

        def decode(self, ids, **kw):
            return ""

    return _Loaded(model, _NoTokenizer(), 8192, f"random-llama-{args.random_llama}", config)


def _prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 1) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_mlx_lm(model, prompts: list[list[int]], gen: list[int]) -> tuple[float, int]:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    bg = BatchGenerator(model, max_tokens=max(gen), completion_batch_size=len(prompts),
                        prefill_batch_size=min(8, len(prompts)))
    t0 = time.perf_counter()
    bg.insert(prompts, max_tokens=list(gen))
    done, generated = 0, 0
    while done < len(prompts):
        for r in bg.next_generated():
            generated += 1
            done += r.finish_reason is not None
    mx.synchronize()
    elapsed = time.perf_counter() - t0
    bg.close()
    return elapsed, generated


def run_parallm(loaded, prompts: list[list[int]], gen: list[int], max_batched_tokens: int,
                build_ahead_mb=None, overlap: bool = True, pass_cost=None,
                decode_kernels: bool = True) -> tuple[float, int]:
    import mlx.core as mx

    from parallm.engine.engine import Engine, EngineConfig
    from parallm.engine.types import EngineRequest, SamplingParams

    extra = {} if build_ahead_mb is None else {"build_ahead_max_kv_bytes": int(build_ahead_mb * 2**20)}
    engine = Engine(loaded, EngineConfig(max_num_seqs=len(prompts), max_num_batched_tokens=max_batched_tokens,
                                         prefix_cache_bytes=0, overlap=overlap,
                                         decode_kernels=decode_kernels, **extra))
    if pass_cost is not None:
        from dataclasses import replace

        engine.runner.shapes = replace(engine.runner.shapes, pass_cost_tokens=pass_cost)
    t0 = time.perf_counter()
    for i, (p, g) in enumerate(zip(prompts, gen)):
        engine.add_request(EngineRequest(f"b{i}", p, SamplingParams(max_tokens=g, temperature=0.0, ignore_eos=True)))
    generated = 0
    while engine.has_unfinished():
        for o in engine.step().outputs:
            generated += len(o.token_ids)
    mx.synchronize()
    return time.perf_counter() - t0, generated


def measure(args) -> list[Row]:
    import mlx.core as mx

    loaded = _load(args)
    vocab = int(loaded.config.get("vocab_size", 32000))
    print(f"model {loaded.name} on {mx.default_device()}", flush=True)
    rows = []
    for batch in args.batches:
        prompts = _prompts(batch, args.prompt_min, args.prompt_max, vocab, seed=batch)
        rng = random.Random(batch)
        gens = [rng.randint(args.gen_min, args.gen) if args.gen_min else args.gen for _ in prompts]
        best_base, best_ours, gen_count = float("inf"), float("inf"), 0
        # a short warm-up of each, so one-time costs (kernels, allocations) are not timed
        warm = prompts[:2]
        run_mlx_lm(loaded.model, warm, [4] * len(warm))
        run_parallm(loaded, warm, [4] * len(warm), args.max_batched_tokens)
        for _ in range(args.rounds):
            t, n_base = run_mlx_lm(loaded.model, prompts, gens)
            best_base = min(best_base, t)
            mx.clear_cache()
            t, n_ours = run_parallm(loaded, prompts, gens, args.max_batched_tokens, args.build_ahead_max_kv_mb,
                                    not args.no_overlap, args.pass_cost, not args.no_decode_kernels)
            best_ours = min(best_ours, t)
            mx.clear_cache()
            if n_base != n_ours:
                raise RuntimeError(f"token counts differ: mlx-lm {n_base}, parallm {n_ours}")
            gen_count = n_ours
        base, ours = gen_count / best_base, gen_count / best_ours
        row = Row(batch, round(base, 1), round(ours, 1), round(ours / base, 3), gen_count)
        print(f"batch {batch:4d}: mlx-lm {row.mlx_lm_tok_s:9.1f} tok/s   parallm {row.parallm_tok_s:9.1f} tok/s"
              f"   ratio {row.ratio:.2f}x", flush=True)
        rows.append(row)
    return rows


def run(args) -> int:
    import mlx.core as mx

    load_before = os.getloadavg()[0]  # other work on the machine moves CPU figures: keep it with them
    rows = measure(args)
    meta = dict(device=str(mx.default_device()), model=args.random_llama or args.model or "default",
                dtype=args.dtype if args.random_llama else "as loaded", gen=args.gen, gen_min=args.gen_min,
                prompt_len=[args.prompt_min, args.prompt_max], rounds=args.rounds,
                mlx=mx.__version__, cpu_count=os.cpu_count(),
                load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    print("\n| batch | mlx-lm BatchGenerator tok/s | parallm tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.batch} | {r.mlx_lm_tok_s} | {r.parallm_tok_s} | {r.ratio:.2f}x |")
    result = dict(meta=meta, rows=[asdict(r) for r in rows])
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import parallm  # noqa: F401  preloads OpenBLAS before mlx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
