"""The Python the adapter wrappers add to one decode forward, with the CUDA path emulated anywhere.

On a GPU a small model's decode step is host-bound, so the wrappers' own Python (MultiLoRALinear,
the sibling groups, the launch plans) counts directly against a mixed batch. This builds the decode
graph (never evaluated) of a SmolLM2-135M-shaped model with 8 adapters, for a batch with no adapter
and for a batch mixing all 8, with the LoRA kernel replaced by a no-op of the same contract (so the
fused-base groups and prepared launches are taken as on CUDA), and prints the median build time of
each and the difference per wrapped block. `--profile` adds a cProfile of the mixed build.

    python loadtests/profile_adapter_wrappers.py --batch 32 [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import parallm  # noqa: E402,F401
import mlx.core as mx  # noqa: E402

from parallm.models import lora  # noqa: E402


LORA_LAYERS = 16  # the adapters cover the last 16 blocks (mlx-lm's default num_layers)


class NoopKernel:
    """LoRADeltaKernel's contract (ensure_compiled, prepare -> launch(x, ys, slots)) doing nothing."""

    def ensure_compiled(self, dtype, rank) -> bool:
        return True

    def prepare(self, as_, bs, dtype, fused=False):
        widths = [int(b.shape[-1]) for b in bs]
        cuts = [sum(widths[: i + 1]) for i in range(len(widths) - 1)]
        if fused:  # one concatenated base output in, each member's columns out
            return lambda x, ys, slots: mx.split(ys[0], cuts, axis=-1)
        return lambda x, ys, slots: ys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    noop = NoopKernel()
    lora.shared_kernel = lambda: noop  # before any wrapper exists: linking then fuses as on CUDA

    import bench_adapters as ba
    from mlx_lm.models.cache import make_prompt_cache

    from parallm.engine.adapter_manager import AdapterManager

    model = ba.build_model(ba.SMOLLM2_135M, 30, mx.float32)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = ba.write_adapters(model, Path(tmp), 8, 8, LORA_LAYERS, None)
        manager = AdapterManager("base", model, adapters_dir=tmp)
        names = [manager.load(d.name, d.name).name for d in dirs]
        manager.apply_pending()
    rows = {"base": [None] * args.batch, "mixed": [names[i % len(names)] for i in range(args.batch)]}
    cache = make_prompt_cache(model)
    mx.eval(model(mx.zeros((args.batch, 4), mx.int32), cache=cache))
    tokens = mx.zeros((args.batch, 1), mx.int32)

    def build(kind: str):
        manager.bind_rows(rows[kind])
        return model(tokens, cache=cache)  # the graph only

    times = {k: [] for k in rows}
    for _ in range(args.iters):  # interleaved, so machine noise hits both alike
        for kind in rows:
            start = time.perf_counter()
            build(kind)
            times[kind].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"graph build ms per forward: base {med['base']:.3f}, mixed {med['mixed']:.3f}; extra "
          f"{med['mixed'] - med['base']:.3f} ms = {(med['mixed'] - med['base']) * 1e3 / LORA_LAYERS:.1f} us per wrapped block")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            build("mixed")
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
