"""Where a decode step's time goes: host phases of parallm's Engine.step and raw forward variants.

Part 1 (engine): runs the engine on `batch` prompts and times, per step, the host phases of
Engine.step (schedule, launch = graph build + async_eval, complete = wait for the device and read
tokens back, update = scheduler bookkeeping + detokenizer + outputs). Steady-state decode steps
only (no prefill chunk in the step). If `complete` is near zero the device waits for the host.

Part 2 (forward): one decode forward of the model over a cache already holding `kv` positions per
row, in a pipelined loop (build step t+1, async_eval, then wait for step t), for several variants:
  mlxlm        mlx-lm KVCache per layer, all rows at one offset, no mask (mlx_lm.generate's path)
  mlxlm_mask   the same with an explicit bool mask [B,1,1,kv] (BatchGenerator passes one)
  parallm      parallm's BatchedKVCache, rows at different offsets (scatter + mask)
  parallm_same BatchedKVCache, all rows at one offset (slice update + mask)
  *_sync       the same, waiting for each step before building the next
Also: `build_ms`, the host time to build one step's graph (no evaluation).

    python loadtests/profile_engine.py --random-llama 1b --dtype bfloat16 --batches 64 128
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import parallm  # noqa: F401,E402  preloads OpenBLAS before mlx
import mlx.core as mx  # noqa: E402

import bench_engine  # noqa: E402


def _timed(obj, name, sink):
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            sink[name] = sink.get(name, 0.0) + time.perf_counter() - t0
    setattr(obj, name, wrapper)


def engine_breakdown(loaded, batch: int, gen: int, lo: int, hi: int, **config) -> dict:
    from parallm.engine.engine import Engine, EngineConfig
    from parallm.engine.types import EngineRequest, SamplingParams

    engine = Engine(loaded, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=2048,
                                         prefix_cache_bytes=0, **config))
    vocab = int(loaded.config.get("vocab_size", 32000))
    prompts = bench_engine._prompts(batch, lo, hi, vocab, seed=batch)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"p{i}", p, SamplingParams(max_tokens=gen, temperature=0.0,
                                                                   ignore_eos=True)))
    phases = {}
    _timed(engine.scheduler, "schedule", phases)
    _timed(engine.runner, "launch", phases)
    _timed(engine.runner, "complete", phases)
    _timed(engine, "_update", phases)
    steps = []
    t_start = time.perf_counter()
    while engine.has_unfinished():
        phases.clear()
        t0 = time.perf_counter()
        res = engine.step()
        total = time.perf_counter() - t0
        sched = engine._in_flight[0] if engine._in_flight else None
        decode_only = sched is not None and not sched.prefill and not sched.new_rows
        steps.append((decode_only, total, dict(phases)))
    wall = time.perf_counter() - t_start
    mx.synchronize()
    steady = [s for s in steps if s[0]][2:]
    out = {"steps": len(steps), "steady_steps": len(steady), "wall_s": round(wall, 3)}
    if steady:
        out["step_ms"] = round(1e3 * statistics.median(s[1] for s in steady), 3)
        for k in ("schedule", "launch", "complete", "_update"):
            out[k + "_ms"] = round(1e3 * statistics.median(s[2].get(k, 0.0) for s in steady), 3)
        out["tok_s_steady"] = round(batch / (out["step_ms"] / 1e3), 1)
    return out


class _MaskedKVCache:
    """mlx-lm's KVCache plus an explicit bool mask (what BatchGenerator's decode passes)."""

    def __init__(self, inner, B):
        self.inner, self.B = inner, B

    @property
    def offset(self):
        return self.inner.offset

    def update_and_fetch(self, k, v):
        return self.inner.update_and_fetch(k, v)

    def make_mask(self, N, **kw):
        kv = self.inner.offset + N
        return mx.broadcast_to(mx.arange(kv)[None, None, None] >= 0, (self.B, 1, N, kv))


class _FunctionalLayerCache:
    """A decode pass's view of one layer's slot buffers, for tracing under mx.compile."""

    def __init__(self, k, v, offsets, kv_len, mask):
        self.k, self.v, self.offset, self.kv_len, self.mask = k, v, offsets, kv_len, mask

    def update_and_fetch(self, keys, values):
        B = keys.shape[0]
        rows = mx.arange(B)
        self.k[rows, :, self.offset] = keys[:, :, 0]
        self.v[rows, :, self.offset] = values[:, :, 0]
        return self.k[:B, :, : self.kv_len], self.v[:B, :, : self.kv_len]

    def make_mask(self, N, **kw):
        return self.mask


def _compiled_decode(model, num_layers):
    def decode(tokens, offsets, kv_len, *bufs):
        mask = (mx.arange(kv_len)[None] <= offsets[:, None])[:, None, None, :]
        caches = [_FunctionalLayerCache(bufs[i], bufs[num_layers + i], offsets, kv_len, mask)
                  for i in range(num_layers)]
        logits = model(tokens[:, None], cache=caches)[:, -1, :]
        return [logits] + [c.k for c in caches] + [c.v for c in caches]
    return mx.compile(decode)


def forward_variants(loaded, B: int, kv: int, steps: int) -> dict:
    from mlx_lm.models.cache import KVCache

    from parallm.engine.kv_cache import BatchedKVCache, PassLayout, probe_kv_shape

    model = loaded.model
    shape = probe_kv_shape(model)
    results = {}

    def mlxlm_caches(masked):
        caches = []
        for _ in range(shape.num_layers):
            c = KVCache()
            k = mx.random.normal((B, shape.n_kv_heads, kv, shape.k_head_dim)).astype(shape.dtype) * 0.1
            c.update_and_fetch(k, k)
            caches.append(_MaskedKVCache(c, B) if masked else c)
        mx.eval([c.inner.keys if masked else c.keys for c in caches])
        return caches

    def parallm_cache(same):
        cache = BatchedKVCache(shape, B)
        for _ in range(B):
            cache.allocate_slot()
        cache.ensure(B, kv + steps + 32)
        base = [kv] * B if same else [kv - (i % 32) for i in range(B)]
        return cache, base

    def run(kind, sync):
        if kind == "compiled":
            cache, base = parallm_cache(False)
            fn = _compiled_decode(model, shape.num_layers)
            state = {"bufs": cache.keys[:] + cache.values[:]}

            def build(tok, i):
                offs = mx.array([o + i for o in base], dtype=mx.int32)
                kv_len = -(-(max(base) + i + 1) // 128) * 128
                logits, *bufs = fn(tok, offs, kv_len, *state["bufs"])
                state["bufs"] = bufs
                return mx.argmax(logits, axis=-1)
        elif kind.startswith("mlxlm"):
            caches = mlxlm_caches(kind == "mlxlm_mask")

            def build(tok, i):
                return mx.argmax(model(tok[:, None], cache=caches)[:, -1, :], axis=-1)
        else:
            cache, base = parallm_cache(kind == "parallm_same")

            def build(tok, i):
                offs = [o + i for o in base]
                layout = PassLayout(slots=list(range(B)), offsets=offs, num_new=1,
                                    kv_len=-(-(max(offs) + 1) // 32) * 32, contiguous=True)
                layers = cache.begin_pass(layout)
                out = mx.argmax(model(tok[:, None], cache=layers)[:, -1, :], axis=-1)
                cache.end_pass({})
                return out
        tok = mx.zeros((B,), mx.int32)
        mx.eval(tok)
        prev = None
        build_times = []
        for i in range(3):  # warm-up
            tok = build(tok, i)
            mx.eval(tok)
        mx.synchronize()
        t0 = time.perf_counter()
        for i in range(3, steps):
            tb = time.perf_counter()
            nxt = build(tok, i)
            build_times.append(time.perf_counter() - tb)
            mx.async_eval(nxt)
            if sync:
                mx.eval(nxt)
            elif prev is not None:
                mx.eval(prev)
            prev, tok = nxt, nxt
        mx.eval(tok)
        mx.synchronize()
        dt = (time.perf_counter() - t0) / (steps - 3)
        return {"step_ms": round(dt * 1e3, 3), "build_ms": round(1e3 * statistics.median(build_times), 3)}

    for kind in ("mlxlm", "mlxlm_mask", "parallm", "parallm_same", "compiled"):
        for sync in (False, True):
            try:
                results[kind + ("_sync" if sync else "")] = run(kind, sync)
            except Exception as e:  # a variant failing must not lose the others
                results[kind + ("_sync" if sync else "")] = {"error": repr(e)[:200]}
            mx.clear_cache()
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_engine.add_arguments(p)
    p.add_argument("--kv", type=int, default=256, help="positions already in the cache (part 2)")
    p.add_argument("--steps", type=int, default=40, help="decode steps per forward variant (part 2)")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-forward", action="store_true")
    args = p.parse_args(argv)
    loaded = bench_engine._load(args)
    report = {"model": args.random_llama or args.model, "device": str(mx.default_device()), "rows": []}
    for batch in args.batches:
        row = {"batch": batch}
        if not args.skip_engine:
            engine_breakdown(loaded, min(batch, 2), 4, args.prompt_min, args.prompt_max)  # warm-up
            row["engine"] = engine_breakdown(loaded, batch, args.gen, args.prompt_min, args.prompt_max)
            row["engine_no_kernels"] = engine_breakdown(loaded, batch, args.gen, args.prompt_min,
                                                        args.prompt_max, decode_kernels=False)
        if not args.skip_forward:
            row["forward"] = forward_variants(loaded, batch, args.kv, args.steps)
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
        mx.clear_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
