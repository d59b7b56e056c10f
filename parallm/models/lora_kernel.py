"""LoRADeltaKernel: a whole per-row LoRA update of one linear in one CUDA kernel.

Why: on a GPU a decode step of a small model is bound by how many kernels it launches, not by
FLOPs. `MultiLoRALinear`'s portable path costs about five graph ops per wrapped linear (slot
clamp, two `gather_mm`, slice, add); on an H200 a batch mixing 8 adapters on the 112 linears of
a SmolLM2-shaped model ran at 0.53 of the base-only speed (BENCHMARKS.md). This kernel does

    out[t] = y[t] + (x[t] @ A[s]) @ B[s],   s = slots[t // L] (0 or out of range: out[t] = y[t])

in one launch: a block per (token, tile of outputs) first reduces x[t] @ A[s] (rank R, kept in
float) across its threads, then writes its tile of outputs. Each tile recomputes the small
x @ A (in * R multiply-adds) rather than launching a second kernel for it.

Only the rank is compiled in (a register array): in, out and tokens per row come from the array
shapes at run time, so a model compiles one variant per (dtype, rank), not one per linear shape.
Each variant is an NVRTC compile of about 1.5 s, paid once, when the first adapter of that rank
is installed (`ensure_compiled`), not inside a decode step.

Used for LoRA (not DoRA, not tensor-parallel layers) on CUDA only, and only for passes of at most
MAX_TOKENS tokens (decode; a long prefill keeps gather_mm, which uses the tensor cores).
"""
from __future__ import annotations

import logging
from typing import Optional

import mlx.core as mx

from parallm.models.device import computing_on_cuda

log = logging.getLogger(__name__)

MAX_TOKENS = 512  # above this a pass is a prefill: gather_mm's matmuls win
MAX_RANK = 128  # the per-thread register array; larger ranks keep gather_mm
# Each block recomputes its token's x @ A, so fewer, wider tiles mean less repeated work; measured
# per launch at Llama-1B shapes, batch 64, on an H200 (docs/bench-data/h200-lora-kernel-tiles.json):
# 2048 outputs over 128 threads cost 35 us of eval for a block's four launches, 1024 over 256 55 us.
THREADS = 128
TILE = 2048  # outputs per block (16 per thread)

def _source(members: int, fused: bool = False) -> str:
    """The kernel body for `members` linears that share one input x (q/k/v, gate/up): block i
    finds its linear by walking the members' (tokens x output tiles) ranges, so one launch
    updates them all. Inputs x, y0.. (or, `fused`, one y holding every member's base output
    side by side: the result of one concatenated matmul), a0.., b0.., slots; outputs out0..
    A member's output width comes from its B stack, so a fused y needs no extra arguments."""
    pick = "".join(f"""
    if (j < 0) {{
        int w = b{m}_shape[2];
        int t = (w + TILE - 1) / TILE;
        if (blk < TOKENS * t) {{
            j = {m}; tiles = t; OUT = w; S = a{m}_shape[0]; col = {"skip" if fused else "0"};
            yp = {"y" if fused else f"y{m}"}; op = out{m}; ap = a{m}; bp = b{m};
        }} else {{
            blk -= TOKENS * t; skip += w;
        }}
    }}""" for m in range(members))
    return """
    int IN = x_shape[2];
    int L = x_shape[1];
    int TOKENS = x_shape[0] * L;
    int blk = blockIdx.x;
    int j = -1;
    int tiles = 1;
    int OUT = 0;
    int S = 0;
    int skip = 0;  // output columns of the members before this one
    int col = 0;   // where this member's base output starts in a row of y
    const DT* yp = nullptr;
    DT* op = nullptr;
    const DT* ap = nullptr;
    const DT* bp = nullptr;""" + pick + f"""
    int YW = {"y_shape[2]" if fused else "OUT"};  // a row of y""" + """
    if (j < 0) {
        return;
    }
    int tok = blk / tiles;
    int o0 = (blk % tiles) * TILE;
    int o1 = min(OUT, o0 + TILE);
    unsigned int s = slots[tok / L];
    yp += (size_t)tok * YW + col;
    op += (size_t)tok * OUT;
    if (s == 0 || s >= (unsigned int)S) {
        for (int o = o0 + threadIdx.x; o < o1; o += NT) {
            op[o] = yp[o];
        }
        return;
    }
    float acc[R];
    for (int r = 0; r < R; r++) {
        acc[r] = 0.f;
    }
    const DT* xp = x + (size_t)tok * IN;
    ap += (size_t)s * IN * R;
    for (int i = threadIdx.x; i < IN; i += NT) {
        float xv = (float)xp[i];
        const DT* arow = ap + (size_t)i * R;
        for (int r = 0; r < R; r++) {
            acc[r] += xv * (float)arow[r];
        }
    }
    __shared__ float part[NT / 32][R];
    __shared__ float xa[R];
    int lane = threadIdx.x % 32;
    int warp = threadIdx.x / 32;
    for (int r = 0; r < R; r++) {
        float v = acc[r];
        for (int off = 16; off > 0; off /= 2) {
            v += __shfl_xor_sync(0xffffffff, v, off);
        }
        if (lane == 0) {
            part[warp][r] = v;
        }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < R; r += NT) {
        float v = 0.f;
        for (int w = 0; w < NT / 32; w++) {
            v += part[w][r];
        }
        xa[r] = v;
    }
    __syncthreads();
    bp += (size_t)s * R * OUT;
    for (int o = o0 + threadIdx.x; o < o1; o += NT) {
        float d = 0.f;
        for (int r = 0; r < R; r++) {
            d += xa[r] * (float)bp[(size_t)r * OUT + o];
        }
        op[o] = (DT)((float)yp[o] + d);
    }
"""


MAX_MEMBERS = 3  # q/k/v share an input; so do gate/up


class LoRADeltaKernel:
    """The compiled kernels (one per number of members); `apply` / `apply_group` are the update."""

    def __init__(self):
        self._kernels = {}
        for m in range(1, MAX_MEMBERS + 1):
            names = [f"{k}{i}" for k in ("y", "a", "b") for i in range(m)]
            self._kernels[m] = mx.fast.cuda_kernel(
                f"parallm_lora_delta_{m}", ["x", *names, "slots"], [f"out{i}" for i in range(m)], _source(m))
        self._fused_kernels = {}
        for m in range(2, MAX_MEMBERS + 1):
            names = [f"{k}{i}" for k in ("a", "b") for i in range(m)]
            self._fused_kernels[m] = mx.fast.cuda_kernel(
                f"parallm_lora_delta_fused_{m}", ["x", "y", *names, "slots"], [f"out{i}" for i in range(m)],
                _source(m, fused=True))
        self._compiled: set[tuple[mx.Dtype, int]] = set()
        self._failed: set[tuple[mx.Dtype, int]] = set()

    def apply(self, x: mx.array, y: mx.array, a: mx.array, b: mx.array, slots: mx.array) -> mx.array:
        """x [B, L, in], y [B, L, out] (the base output), a [S, in, R], b [S, R, out], slots [B]
        uint32 -> y + per-row LoRA delta, in y's dtype."""
        return self.prepare([a], [b], y.dtype)(x, [y], slots)[0]

    def apply_group(self, x: mx.array, ys: list, as_: list, bs: list, slots: mx.array) -> list:
        """`apply` for up to MAX_MEMBERS linears of the same input and rank, in one launch."""
        return self.prepare(as_, bs, ys[0].dtype)(x, ys, slots)

    def apply_fused(self, x: mx.array, y: mx.array, as_: list, bs: list, slots: mx.array) -> list:
        """`apply_group` where the members' base outputs come as one y [B, L, sum of outs] (one
        matmul against their concatenated weights): returns each member's own [B, L, out] output,
        so the split costs no extra launch either."""
        return self.prepare(as_, bs, y.dtype, fused=True)(x, [y], slots)

    def prepare(self, as_: list, bs: list, dtype: mx.Dtype, fused: bool = False) -> "PreparedLaunch":
        """The launch for these stacks with all that does not change per call worked out now
        (layers keep it until their adapters change): a decode step calls it for every wrapped
        linear, and on a GPU host that per-call Python is part of what a mixed batch pays."""
        template = [("DT", dtype), ("R", int(as_[0].shape[-1])), ("NT", THREADS), ("TILE", TILE)]
        fn = self._fused_kernels[len(bs)] if fused else self._kernels[len(bs)]
        return PreparedLaunch(fn, [*as_, *bs], template, [int(b.shape[-1]) for b in bs], dtype)

    def ensure_compiled(self, dtype: mx.Dtype, rank: int) -> bool:
        """Compile the (dtype, rank) variants now; False (and a warning, once) when they cannot be
        built, so that the caller keeps the gather_mm path."""
        key = (dtype, rank)
        if key in self._compiled:
            return True
        if key in self._failed:
            return False
        try:
            x = mx.zeros((1, 1, 32), dtype)
            a = mx.zeros((2, 32, rank), dtype)
            b = mx.zeros((2, rank, 32), dtype)
            one = mx.array([1], mx.uint32)
            for m in range(1, MAX_MEMBERS + 1):
                mx.eval(self.apply_group(x, [x] * m, [a] * m, [b] * m, one))
                if m > 1:
                    mx.eval(self.apply_fused(x, mx.zeros((1, 1, 32 * m), dtype), [a] * m, [b] * m, one))
        except Exception as e:  # a toolchain that cannot build it: gather_mm still works
            log.warning("LoRA kernel unavailable for %s rank %d (%s); adapters use gather_mm", dtype, rank, e)
            self._failed.add(key)
            return False
        self._compiled.add(key)
        return True


class PreparedLaunch:
    """One LoRADeltaKernel launch for fixed stacks: call it with (x, ys, slots), where ys is the
    members' base outputs (or, fused, the one concatenated output); returns the members' outputs."""

    __slots__ = ("_fn", "_tail", "_template", "_widths", "_tiles", "_dtypes", "_threads")

    def __init__(self, fn, tail: list, template: list, widths: list, dtype: mx.Dtype):
        self._fn, self._tail, self._template, self._widths = fn, tail, template, widths
        self._tiles = sum(-(-w // TILE) for w in widths)  # blocks per token
        self._dtypes = [dtype] * len(widths)
        self._threads = (THREADS, 1, 1)

    def __call__(self, x: mx.array, ys: list, slots: mx.array) -> list:
        rows, per_row = x.shape[0], x.shape[1]
        return self._fn(inputs=[x, *ys, *self._tail, slots], template=self._template,
                        grid=(rows * per_row * self._tiles * THREADS, 1, 1), threadgroup=self._threads,
                        output_shapes=[(rows, per_row, w) for w in self._widths], output_dtypes=self._dtypes)


_shared: Optional[LoRADeltaKernel] = None
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn the kernel off (or on again) for adapters installed from now on: benchmarks compare."""
    global _enabled
    _enabled = enabled


def kernel_available() -> bool:
    """True where the kernel can run: the default device is a CUDA GPU."""
    return computing_on_cuda()


def fits(shape: tuple) -> bool:
    """Whether an input of this shape is one the kernel takes: [rows, tokens per row, in], with
    at most MAX_TOKENS tokens in all."""
    return len(shape) == 3 and shape[0] * shape[1] <= MAX_TOKENS


def shared_kernel() -> Optional[LoRADeltaKernel]:
    """The process's kernel object (compiled variants are kept on it), or None off CUDA."""
    global _shared
    if not (_enabled and kernel_available()):
        return None
    if _shared is None:
        _shared = LoRADeltaKernel()
    return _shared
