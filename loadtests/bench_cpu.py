"""CPU benchmarks for the models layer (not a test; prints ratios measured in one run).

(a) sgemm GFLOP/s with the mlx wheel's own BLAS vs an optimized BLAS preloaded by parallm. The
    preload must happen before `import mlx`, so each side runs in its own subprocess; the rounds
    alternate between the two so that load from other users hits both alike. Results are compared.
(b) decode tokens/s of the default model (SmolLM2-135M Q4_1 GGUF) with weights kept quantized vs
    dequantized to float32 (parallm's CPU default), at batch 1 and 32, with a plain batched greedy
    loop over mlx-lm's prompt cache (not the engine). Both variants live in one process and the
    measurements alternate.

    python loadtests/bench_cpu.py                 # both
    python loadtests/bench_cpu.py --only matmul   # or: --only decode
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def matmul_worker(size: int, repeats: int) -> None:
    """Runs in a subprocess: time `repeats` float32 size x size matmuls on the CPU, print JSON."""
    import parallm  # noqa: F401  (preloads the BLAS that PARALLM_BLAS selects)
    import mlx.core as mx

    from parallm._blas import blas_in_use

    mx.set_default_device(mx.cpu)
    mx.random.seed(0)
    a, b = mx.random.normal((size, size)), mx.random.normal((size, size))
    mx.eval(a @ b)  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        c = a @ b
        mx.eval(c)
    seconds = time.perf_counter() - start
    import numpy as np

    np.save(os.environ["BENCH_RESULT"], np.array(c))
    print(json.dumps({"blas": blas_in_use(), "gflops": 2 * size**3 * repeats / seconds / 1e9}))


def bench_matmul(size: int, repeats: int, rounds: int) -> dict:
    import numpy as np

    results = {"none": [], "auto": []}
    blas, outputs = {}, {}
    for _ in range(rounds):
        for setting in ("none", "auto"):
            out = f"/tmp/parallm-bench-{os.getpid()}-{setting}.npy"
            env = {**os.environ, "PARALLM_BLAS": setting, "BENCH_RESULT": out}
            proc = subprocess.run([sys.executable, __file__, "--matmul-worker", str(size), str(repeats)],
                                  env=env, capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results[setting].append(row["gflops"])
            blas[setting] = row["blas"]
            outputs[setting] = np.load(out)
            os.remove(out)
    diff = float(np.abs(outputs["none"] - outputs["auto"]).max())
    scale = float(np.abs(outputs["none"]).max())
    wheel, fast = statistics.median(results["none"]), statistics.median(results["auto"])
    print(f"\n(a) float32 matmul {size}x{size}, {repeats} per run, {rounds} alternating runs each (median)")
    print(f"  wheel BLAS      {wheel:7.1f} GFLOP/s   [{blas['none']}]")
    print(f"  preloaded BLAS  {fast:7.1f} GFLOP/s   [{blas['auto']}]")
    print(f"  speed-up        {fast / wheel:7.1f}x")
    print(f"  results: max |difference| {diff:.2e} (largest value {scale:.1f}; float32 summation order)")
    return {"wheel": wheel, "preloaded": fast, "max_diff": diff}


def decode_rate(lm, batch: int, steps: int) -> float:
    """Aggregate decode tokens/s of a batched greedy loop (prefill not timed)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    tok = lm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a story about a lighthouse."}],
                                     add_generation_prompt=True)
    cache = make_prompt_cache(lm.model)
    logits = lm.model(mx.array([prompt] * batch), cache=cache)
    tokens = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(tokens)
    start = time.perf_counter()
    for _ in range(steps):
        tokens = mx.argmax(lm.model(tokens, cache=cache)[:, -1:], axis=-1)
        mx.eval(tokens)
    return batch * steps / (time.perf_counter() - start)


def bench_decode(batches: list[int], steps: int, rounds: int) -> dict:
    from parallm.models import load

    variants = {"Q4_1 kept quantized": load(device="cpu", keep_quantized=True),
                "dequantized float32": load(device="cpu")}
    rates = {(v, b): [] for v in variants for b in batches}
    for _ in range(rounds):
        for b in batches:
            for name, lm in variants.items():
                rates[(name, b)].append(decode_rate(lm, b, steps))
                print(f"  ... {name}, batch {b}: {rates[(name, b)][-1]:.1f} tok/s", flush=True)
    print(f"\n(b) decode, default model, {steps} steps per run, {rounds} alternating runs (median tok/s)")
    print(f"  {'batch':>5}  " + "  ".join(f"{name:>22}" for name in variants) + "   ratio")
    out = {}
    for b in batches:
        q, f = (statistics.median(rates[(name, b)]) for name in variants)
        out[b] = (q, f)
        print(f"  {b:>5}  {q:>22.1f}  {f:>22.1f}   {f / q:5.1f}x")
    mem = {name: lm.memory.weight_bytes / 2**20 for name, lm in variants.items()}
    print("  weights in memory: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in mem.items()))
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--matmul-worker":
        matmul_worker(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("matmul", "decode"))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batches", default="1,32")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
          f"python {platform.python_version()}")
    if args.only in (None, "matmul"):
        bench_matmul(args.size, args.repeats, args.rounds)
    if args.only in (None, "decode"):
        import parallm  # noqa: F401  (BLAS preload before mlx)

        bench_decode([int(b) for b in args.batches.split(",")], args.steps, args.rounds)


if __name__ == "__main__":
    main()
