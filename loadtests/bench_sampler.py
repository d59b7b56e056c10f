"""Micro-benchmark: parallm's BatchSampler vs mlx-lm's sampler applied row by row.

A per-row approach is what honouring per-request parameters costs with mlx-lm's sample_utils:
one make_sampler + logits processors per row, B small graphs per step. BatchSampler does the same
work for the whole batch in one graph. Both run in this process, interleaved, on the same logits.

    python loadtests/bench_sampler.py [--vocab 49152] [--batches 1,32,128] [--repeats 20]

Prints the median milliseconds per step for each and the ratio (mlx-lm / parallm, >1 = faster),
for the default exact top_p and for the opt-in top_p_candidates=1024 lookup.
Also prints mlx-lm's sampler on the whole batch with ONE parameter set (what batching costs when
every row must share its parameters) as a second reference.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from parallm.engine.sampler import BatchSampler
from parallm.engine.types import SamplingParams

TOP_P_CANDIDATES = 1024  # the opt-in nucleus lookup (BatchSampler(top_p_candidates=...))

# A realistic mix of what clients send; rows cycle through it.
PARAM_MIX = [
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0, top_k=40),
    SamplingParams(temperature=0.8, min_p=0.05),
    SamplingParams(temperature=0.7, top_p=0.95, repetition_penalty=1.1),
    SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3, logprobs=True, top_logprobs=5),
    SamplingParams(temperature=0.6, top_p=0.8, top_k=50, logit_bias=((11, -5.0), (42, 2.0))),
    SamplingParams(temperature=0.0, logprobs=True),
]


@dataclass
class MlxLmRow:
    sampler: object
    processors: list
    tokens: mx.array
    wants_logprobs: bool
    top_logprobs: int


def mlx_lm_row(p: SamplingParams, prompt: list[int]) -> MlxLmRow:
    sampler = make_sampler(temp=p.temperature, top_p=p.top_p if p.top_p < 1 else 0.0,
                           min_p=p.min_p, top_k=p.top_k)
    processors = make_logits_processors(
        logit_bias=dict(p.logit_bias) or None,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty != 1.0 else None,
        presence_penalty=p.presence_penalty or None, frequency_penalty=p.frequency_penalty or None)
    return MlxLmRow(sampler, processors, mx.array(prompt), p.logprobs, p.top_logprobs)


def mlx_lm_step(rows: list[MlxLmRow], logits: mx.array) -> list[mx.array]:
    """mlx-lm's per-row path: processors, log-softmax, sampler, logprobs, one row at a time."""
    outs = []
    for b, row in enumerate(rows):
        x = logits[b:b + 1]
        for proc in row.processors:
            x = proc(row.tokens, x)
        logprobs = x - mx.logsumexp(x, axis=-1, keepdims=True)
        token = row.sampler(logprobs)
        outs.append(token)
        if row.wants_logprobs:
            outs.append(logprobs[0, token])
        if row.top_logprobs:
            outs.append(mx.argpartition(-logprobs, kth=row.top_logprobs - 1, axis=-1)[:, :row.top_logprobs])
        row.tokens = mx.concatenate([row.tokens, token])
    return outs


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def bench(batch: int, vocab: int, repeats: int) -> dict:
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, vocab, 64).tolist() for _ in range(batch)]
    params = [PARAM_MIX[i % len(PARAM_MIX)] for i in range(batch)]
    ours = BatchSampler(max_slots=max(batch, 8), vocab_size=vocab)
    ours_cand = BatchSampler(max_slots=max(batch, 8), vocab_size=vocab, top_p_candidates=TOP_P_CANDIDATES)
    for slot, (p, prompt) in enumerate(zip(params, prompts)):
        ours.add_row(slot, p, prompt, seed=slot)
        ours_cand.add_row(slot, p, prompt, seed=slot)
    slots = list(range(batch))
    theirs = [mlx_lm_row(p, prompt) for p, prompt in zip(params, prompts)]
    uniform = make_sampler(temp=0.7, top_p=0.9)
    logit_sets = [mx.array(rng.standard_normal((batch, vocab)).astype(np.float32) * 3) for _ in range(4)]
    mx.eval(*logit_sets)

    def run_ours(logits, sampler=ours):
        out = sampler.sample(logits, slots)
        mx.eval([a for a in (out.token_ids, out.logprobs, out.top_ids, out.top_logprobs) if a is not None])

    def run_ours_cand(logits):
        run_ours(logits, ours_cand)

    def run_theirs(logits):
        mx.eval(mlx_lm_step(theirs, logits))

    def run_uniform(logits):
        mx.eval(uniform(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))

    for i in range(3):  # warm up: compile and allocate
        for fn in (run_ours, run_ours_cand, run_theirs, run_uniform):
            fn(logit_sets[i % 4])
    times = {"parallm": [], "parallm_cand": [], "mlx_lm_per_row": [], "mlx_lm_uniform": []}
    for i in range(repeats):  # interleaved so that machine noise hits all alike
        logits = logit_sets[i % 4]
        times["parallm"].append(timed(lambda: run_ours(logits)))
        times["parallm_cand"].append(timed(lambda: run_ours_cand(logits)))
        times["mlx_lm_per_row"].append(timed(lambda: run_theirs(logits)))
        times["mlx_lm_uniform"].append(timed(lambda: run_uniform(logits)))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_top_p_kernels(vocab: int, repeats: int) -> None:
    """The three nucleus-threshold kernels alone, for 1..32 top_p rows."""
    from parallm.engine import sampling_ops as ops
    bisect = mx.compile(ops.top_p_threshold)
    by_sort = mx.compile(ops.top_p_threshold_by_sort)
    print(f"top-p kernels, ms per call: {'rows':>5} {'bisection':>10} {'sort':>8} {'candidates 1024':>16}")
    for rows in (1, 4, 12, 32):
        rng = np.random.default_rng(rows)
        x = mx.array(rng.standard_normal((rows, vocab)).astype(np.float32) * 3)
        args = (x, mx.full((rows, 1), 1.0 / 0.7), mx.full((rows, 1), float("-inf")), mx.full((rows, 1), 0.9))
        kernels = {"bisection": lambda: bisect(*args), "sort": lambda: by_sort(*args),
                   "candidates": lambda: ops.top_p_threshold_in_candidates(*args, TOP_P_CANDIDATES)}
        times = {name: [] for name in kernels}
        for fn in kernels.values():
            mx.eval(fn())
        for _ in range(repeats):
            for name, fn in kernels.items():
                times[name].append(timed(lambda: mx.eval(fn())))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{'':28s}{rows:>5} {med['bisection']:>10.1f} {med['sort']:>8.1f} {med['candidates']:>16.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--top-p-kernels", action="store_true", help="time the nucleus kernels alone instead")
    args = ap.parse_args()
    if args.top_p_kernels:
        bench_top_p_kernels(args.vocab, args.repeats)
        return
    print(f"device={mx.default_device()} mlx={mx.__version__} vocab={args.vocab} "
          f"param mix={len(PARAM_MIX)} kinds, median of {args.repeats} interleaved steps")
    print(f"{'B':>5} {'parallm ms':>11} {'mlx-lm per-row ms':>18} {'ratio':>7} "
          f"{'parallm top_p_cand ms':>22} {'ratio':>7} {'mlx-lm 1-param batch ms':>24}")
    for batch in [int(b) for b in args.batches.split(",")]:
        r = bench(batch, args.vocab, args.repeats)
        base = r["mlx_lm_per_row"]
        print(f"{batch:>5} {r['parallm']:>11.2f} {base:>18.2f} {base / r['parallm']:>6.2f}x "
              f"{r['parallm_cand']:>22.2f} {base / r['parallm_cand']:>6.2f}x {r['mlx_lm_uniform']:>24.2f}",
              flush=True)


if __name__ == "__main__":
    main()
