"""Per-launch cost of the LoRA kernel (CUDA) at one model's shapes, against the matmuls around it.

For each tile shape (outputs per block x threads) it builds 100 launches of each kind of update a
block makes (q/k/v against a fused base output, gate/up fused, o_proj, down_proj, and gate/up and
down with every row at slot 0, i.e. copy only), then evaluates them; best of 3. Prints JSON of
microseconds per launch, [build, eval]: build is the Python and graph construction on the host,
eval is MLX dispatching and the GPU running them. The decode step of a small model is bound by
these per-launch costs, not by FLOPs (BENCHMARKS.md, Adapters).

    python loadtests/bench_lora_kernel.py --tiles 1024x256,2048x128,4096x512
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parallm  # noqa: E402,F401
import mlx.core as mx  # noqa: E402

from parallm.models import lora_kernel  # noqa: E402


def use_tiles(spec: str) -> tuple[int, int]:
    """Set the LoRA kernel's tile shape from "TILExTHREADS" (read by prepare() and PreparedLaunch,
    so kernels prepared from now on use it); returns (tile, threads)."""
    tile, threads = (int(v) for v in spec.lower().split("x"))
    lora_kernel.TILE, lora_kernel.THREADS = tile, threads
    return tile, threads


def per_launch(make, n: int = 100, reps: int = 3) -> list[float]:
    best = None
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [make() for _ in range(n)]
        t1 = time.perf_counter()
        mx.eval(outs)
        t2 = time.perf_counter()
        r = ((t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6)
        best = r if best is None or sum(r) < sum(best) else best
    return [round(v, 2) for v in best]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="decode rows (one token each)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--kv-out", type=int, default=512, help="k_proj / v_proj outputs")
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tiles", default="1024x256,2048x128,4096x512", help="TILExTHREADS,...")
    args = p.parse_args(argv)
    if lora_kernel.shared_kernel() is None:
        print("the LoRA kernel runs on CUDA only", file=sys.stderr)
        return 2
    B, H, KV, I, S, R = args.batch, args.hidden, args.kv_out, args.intermediate, args.adapters + 1, args.rank
    dt = mx.bfloat16

    def rnd(*shape):
        return (mx.random.normal(shape) * 0.02).astype(dt)

    x, xd = rnd(B, 1, H), rnd(B, 1, I)
    w_qkv, w_gu, w_o, w_d = rnd(H + 2 * KV, H), rnd(2 * I, H), rnd(H, H), rnd(H, I)
    a_qkv, b_qkv = [rnd(S, H, R) for _ in range(3)], [rnd(S, R, H), rnd(S, R, KV), rnd(S, R, KV)]
    a_gu, b_gu = [rnd(S, H, R) for _ in range(2)], [rnd(S, R, I) for _ in range(2)]
    a_o, b_o, a_d, b_d = rnd(S, H, R), rnd(S, R, H), rnd(S, I, R), rnd(S, R, H)
    slots = mx.array([i % args.adapters + 1 for i in range(B)], mx.uint32)
    zero = mx.zeros((B,), mx.uint32)
    y_qkv, y_gu, y_o, y_d = x @ w_qkv.T, x @ w_gu.T, x @ w_o.T, xd @ w_d.T
    mx.eval(x, xd, w_qkv, w_gu, w_o, w_d, *a_qkv, *b_qkv, *a_gu, *b_gu, a_o, b_o, a_d, b_d, slots, zero,
            y_qkv, y_gu, y_o, y_d)
    result = {"args": vars(args), "matmul_qkv": per_launch(lambda: x @ w_qkv.T),
              "matmul_gate_up": per_launch(lambda: x @ w_gu.T), "matmul_o": per_launch(lambda: x @ w_o.T),
              "matmul_down": per_launch(lambda: xd @ w_d.T), "add": per_launch(lambda: x + 1)}
    for spec in args.tiles.split(","):
        tile, threads = use_tiles(spec)
        kernel = lora_kernel.LoRADeltaKernel()
        qkv = kernel.prepare(a_qkv, b_qkv, dt, fused=True)
        gu = kernel.prepare(a_gu, b_gu, dt, fused=True)
        o, d = kernel.prepare([a_o], [b_o], dt), kernel.prepare([a_d], [b_d], dt)
        mx.eval(qkv(x, [y_qkv], slots), gu(x, [y_gu], slots), o(x, [y_o], slots), d(xd, [y_d], slots))  # compile
        result[f"tile{tile}x{threads}"] = {
            "qkv": per_launch(lambda: qkv(x, [y_qkv], slots)), "gate_up": per_launch(lambda: gu(x, [y_gu], slots)),
            "o": per_launch(lambda: o(x, [y_o], slots)), "down": per_launch(lambda: d(xd, [y_d], slots)),
            "gate_up_slot0": per_launch(lambda: gu(x, [y_gu], zero)), "down_slot0": per_launch(lambda: d(xd, [y_d], zero))}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
