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

log = logging.getLogger(__name__)

MAX_TOKENS = 512  # above this a pass is a prefill: gather_mm's matmuls win
MAX_RANK = 128  # the per-thread register array; larger ranks keep gather_mm
THREADS = 256
TILE = 1024  # outputs per block (4 per thread)

_SOURCE = """
    int IN = x_shape[2];
    int L = x_shape[1];
    int OUT = y_shape[2];
    int S = a_shape[0];
    int tiles = (OUT + TILE - 1) / TILE;
    int tok = blockIdx.x / tiles;
    int o0 = (blockIdx.x % tiles) * TILE;
    int o1 = min(OUT, o0 + TILE);
    unsigned int s = slots[tok / L];
    const DT* yp = y + (size_t)tok * OUT;
    DT* op = out + (size_t)tok * OUT;
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
    const DT* ap = a + (size_t)s * IN * R;
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
    const DT* bp = b + (size_t)s * R * OUT;
    for (int o = o0 + threadIdx.x; o < o1; o += NT) {
        float d = 0.f;
        for (int r = 0; r < R; r++) {
            d += xa[r] * (float)bp[(size_t)r * OUT + o];
        }
        op[o] = (DT)((float)yp[o] + d);
    }
"""


class LoRADeltaKernel:
    """The compiled kernel; `apply(...)` is the update, `usable(...)` says when it applies."""

    def __init__(self):
        self._kernel = mx.fast.cuda_kernel(
            "parallm_lora_delta", ["x", "y", "a", "b", "slots"], ["out"], _SOURCE)
        self._compiled: set[tuple[mx.Dtype, int]] = set()
        self._failed: set[tuple[mx.Dtype, int]] = set()

    def apply(self, x: mx.array, y: mx.array, a: mx.array, b: mx.array, slots: mx.array) -> mx.array:
        """x [B, L, in], y [B, L, out] (the base output), a [S, in, R], b [S, R, out], slots [B]
        uint32 -> y + per-row LoRA delta, in y's dtype."""
        tokens, out_dims = x.shape[0] * x.shape[1], y.shape[-1]
        tiles = -(-out_dims // TILE)
        return self._kernel(
            inputs=[x, y, a, b, slots],
            template=[("DT", y.dtype), ("R", int(a.shape[-1])), ("NT", THREADS), ("TILE", TILE)],
            grid=(tokens * tiles * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
            output_shapes=[y.shape], output_dtypes=[y.dtype])[0]

    def ensure_compiled(self, dtype: mx.Dtype, rank: int) -> bool:
        """Compile the (dtype, rank) variant now; False (and a warning, once) when it cannot be
        built, so that the caller keeps the gather_mm path."""
        key = (dtype, rank)
        if key in self._compiled:
            return True
        if key in self._failed:
            return False
        try:
            x = mx.zeros((1, 1, 32), dtype)
            y = mx.zeros((1, 1, 32), dtype)
            a = mx.zeros((2, 32, rank), dtype)
            b = mx.zeros((2, rank, 32), dtype)
            mx.eval(self.apply(x, y, a, b, mx.array([1], mx.uint32)))
        except Exception as e:  # a toolchain that cannot build it: gather_mm still works
            log.warning("LoRA kernel unavailable for %s rank %d (%s); adapters use gather_mm", dtype, rank, e)
            self._failed.add(key)
            return False
        self._compiled.add(key)
        return True


_shared: Optional[LoRADeltaKernel] = None
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn the kernel off (or on again) for adapters installed from now on: benchmarks compare."""
    global _enabled
    _enabled = enabled


def kernel_available() -> bool:
    """True where the kernel can run: the default device is a CUDA GPU."""
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available() and mx.default_device() == mx.gpu)


def shared_kernel() -> Optional[LoRADeltaKernel]:
    """The process's kernel object (compiled variants are kept on it), or None off CUDA."""
    global _shared
    if not (_enabled and kernel_available()):
        return None
    if _shared is None:
        _shared = LoRADeltaKernel()
    return _shared
