"""DecodeAttention: one decode token per row attending its own slot, on CUDA, with no mask.

Why: rows of a decode pass sit at different positions, so MLX's attention needs an array mask, and
on CUDA a masked `scaled_dot_product_attention` leaves the fused vector kernel for a multi-kernel
fallback; and writing each row's new K/V at its own position is a Scatter that copies the whole
layer buffer when it cannot update it in place (a pending step still holds it). Measured on an
H200, 8B model, batch 128: 13 ms/step without mask and scatter, 20 ms with the mask, 29 ms with
mask and scatter.

Two kernels per layer instead:
- `write`: stores each row's new K and V at position lengths[b] of slot b, IN PLACE, through the
  buffer's pointer. MLX does not see this write, which is the point: the buffer stays the same
  array, so nothing is copied. It is safe because the buffer is owned by BatchedKVCache, every op
  on it runs on the engine thread's one stream in submission order, and the position written is
  never read by an op of the same step except this step's attention, which depends on the write's
  (dummy) output. A position past a row's length is never attended by any pass.
- `attend`: block per (row, kv head, split of the positions), all query heads of the kv head
  together (GQA: K/V are read once per kv head), online softmax over positions [0, lengths[b]];
  when the positions are split across blocks, a third small kernel combines the partial results.

Only used where it applies (CUDA, head dim a multiple of 32 up to 256, at most 8 query heads per kv
head, and a model whose attention calls mlx-lm's `scaled_dot_product_attention`); everything else
keeps the masked MLX path.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

import mlx.core as mx

from parallm.models.device import computing_on_cuda

log = logging.getLogger(__name__)

_WRITE = """
    unsigned int idx = blockIdx.x * blockDim.x + threadIdx.x;
    int B = k_new_shape[0];
    int C = kbuf_shape[2];
    if (idx < (unsigned int)(B * HKV * D)) {
        int d = idx % D;
        int bh = idx / D;
        int b = bh / HKV;
        size_t dst = ((size_t)bh * C + lengths[b]) * D + d;
        const_cast<T*>(kbuf)[dst] = k_new[idx];
        const_cast<T*>(vbuf)[dst] = v_new[idx];
    }
    if (idx == 0) {
        done[0] = 1;
    }
"""

_ATTEND_BODY = """
    constexpr int VPT = D / 32;
    int block = blockIdx.x;
    int split = block % SPLIT;
    int bh = block / SPLIT;
    int b = bh / HKV;
    int hk = bh % HKV;
    int lane = threadIdx.x % 32;
    int warp = threadIdx.x / 32;
    int C = kbuf_shape[2];
    int n = lengths[b] + 1 + 0 * done[0];
    int chunk = (n + SPLIT - 1) / SPLIT;
    int start = split * chunk;
    int end = min(n, start + chunk);
    const float scale = scale_arr[0] * 1.4426950408889634f;

    float q[G][VPT];
    float acc[G][VPT];
    float m[G];
    float l[G];
    for (int g = 0; g < G; g++) {
        const T* qp = queries + ((size_t)(b * HKV * G + hk * G + g)) * D + lane * VPT;
        for (int i = 0; i < VPT; i++) {
            q[g][i] = (float)qp[i] * scale;
            acc[g][i] = 0.f;
        }
        m[g] = __int_as_float(0xff800000);
        l[g] = 0.f;
    }
    const T* kb = kbuf + (size_t)bh * C * D + lane * VPT;
    const T* vb = vbuf + (size_t)bh * C * D + lane * VPT;
    for (int j = start + warp; j < end; j += NW) {
        float k[VPT];
        float v[VPT];
        for (int i = 0; i < VPT; i++) {
            k[i] = (float)kb[(size_t)j * D + i];
            v[i] = (float)vb[(size_t)j * D + i];
        }
        for (int g = 0; g < G; g++) {
            float s = 0.f;
            for (int i = 0; i < VPT; i++) {
                s += q[g][i] * k[i];
            }
            for (int off = 16; off > 0; off /= 2) {
                s += __shfl_xor_sync(0xffffffff, s, off);
            }
            float m_new = fmaxf(m[g], s);
            float corr = exp2f(m[g] - m_new);
            float p = exp2f(s - m_new);
            l[g] = l[g] * corr + p;
            for (int i = 0; i < VPT; i++) {
                acc[g][i] = acc[g][i] * corr + p * v[i];
            }
            m[g] = m_new;
        }
    }
    __shared__ float sm_m[NW][G];
    __shared__ float sm_l[NW][G];
    __shared__ float sm_acc[NW][G][D];
    for (int g = 0; g < G; g++) {
        if (lane == 0) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
        for (int i = 0; i < VPT; i++) {
            sm_acc[warp][g][lane * VPT + i] = acc[g][i];
        }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < G * D; t += blockDim.x) {
        int g = t / D;
        int d = t % D;
        float M = __int_as_float(0xff800000);
        for (int w = 0; w < NW; w++) {
            M = fmaxf(M, sm_m[w][g]);
        }
        float L = 0.f;
        float A = 0.f;
        if (M != __int_as_float(0xff800000)) {
            for (int w = 0; w < NW; w++) {
                float f = exp2f(sm_m[w][g] - M);
                L += sm_l[w][g] * f;
                A += sm_acc[w][g][d] * f;
            }
        }
        STORE
    }
"""

_STORE_DIRECT = """
        out[((size_t)(b * HKV * G + hk * G + g)) * D + d] = (T)(A / L);
"""

_STORE_PARTIAL = """
        size_t p = ((size_t)bh * SPLIT + split) * G + g;
        part_acc[p * D + d] = A;
        if (d == 0) {
            part_m[p] = M;
            part_l[p] = L;
        }
"""

_COMBINE = """
    unsigned int idx = blockIdx.x * blockDim.x + threadIdx.x;
    int B = part_m_shape[0];
    if (idx >= (unsigned int)(B * HKV * G * D)) {
        return;
    }
    int d = idx % D;
    int h = (idx / D) % (HKV * G);
    int b = idx / (D * HKV * G);
    int hk = h / G;
    int g = h % G;
    size_t base = ((size_t)(b * HKV + hk) * SPLIT) * G + g;
    float M = __int_as_float(0xff800000);
    for (int s = 0; s < SPLIT; s++) {
        M = fmaxf(M, part_m[base + (size_t)s * G]);
    }
    float L = 0.f;
    float A = 0.f;
    for (int s = 0; s < SPLIT; s++) {
        size_t p = base + (size_t)s * G;
        float f = exp2f(part_m[p] - M);
        L += part_l[p] * f;
        A += part_acc[p * D + d] * f;
    }
    out[idx] = (T)(A / L);
"""

NUM_WARPS = 4
MIN_BLOCKS = 264  # ~2 blocks per multiprocessor on an H100/H200
MIN_POSITIONS_PER_SPLIT = 32
# Each variant is a separate NVRTC compile of 1.3-1.8 s on an H200 host (measured), paid by the
# first step that needs it, which stalls every stream: few variants, all compiled by warm_up().
SPLITS = (1, 4, 16)


class DecodeAttention:
    """The CUDA kernels; `supports(...)` says whether they apply to a model's shapes."""

    def __init__(self):
        self._write = mx.fast.cuda_kernel(
            "parallm_kv_write", ["k_new", "v_new", "kbuf", "vbuf", "lengths"], ["done"], _WRITE,
            ensure_row_contiguous=False)
        attend_in = ["queries", "kbuf", "vbuf", "lengths", "done", "scale_arr"]
        self._attend_direct = mx.fast.cuda_kernel(
            "parallm_decode_attend", attend_in, ["out"],
            _ATTEND_BODY.replace("STORE", _STORE_DIRECT), ensure_row_contiguous=False)
        self._attend_split = mx.fast.cuda_kernel(
            "parallm_decode_attend_split", attend_in, ["part_acc", "part_m", "part_l"],
            _ATTEND_BODY.replace("STORE", _STORE_PARTIAL), ensure_row_contiguous=False)
        self._combine = mx.fast.cuda_kernel(
            "parallm_decode_combine", ["part_acc", "part_m", "part_l"], ["out"], _COMBINE)

    @staticmethod
    def supports(n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
        return (computing_on_cuda() and head_dim % 32 == 0
                and head_dim <= 256 and n_heads % n_kv_heads == 0 and n_heads // n_kv_heads <= 8)

    def write(self, k_new: mx.array, v_new: mx.array, kbuf: mx.array, vbuf: mx.array,
              lengths: mx.array) -> mx.array:
        """k_new/v_new [B, Hkv, 1, D] into slots 0..B-1 at lengths[b]; returns the dummy output
        that orders this write before the attention reading it."""
        B, hkv, _, d = k_new.shape
        return self._write(
            inputs=[mx.contiguous(k_new), mx.contiguous(v_new), kbuf, vbuf, lengths],
            template=[("T", kbuf.dtype), ("HKV", hkv), ("D", d)],
            grid=(B * hkv * d, 1, 1), threadgroup=(256, 1, 1),
            output_shapes=[(1,)], output_dtypes=[mx.int32])[0]

    def attend(self, queries: mx.array, kbuf: mx.array, vbuf: mx.array, lengths: mx.array,
               done: mx.array, scale: float, max_length: int) -> mx.array:
        """queries [B, Hq, 1, D] -> [B, Hq, 1, D]: row b attends positions [0, lengths[b]] of slot b."""
        B, hq, _, d = queries.shape
        hkv = kbuf.shape[1]
        g = hq // hkv
        split = _split_for(B * hkv, max_length + 1)
        template = [("T", queries.dtype), ("HKV", hkv), ("G", g), ("D", d), ("NW", NUM_WARPS),
                    ("SPLIT", split)]
        inputs = [mx.contiguous(queries), kbuf, vbuf, lengths, done, mx.array([scale], mx.float32)]
        threads = (B * hkv * split * 32 * NUM_WARPS, 1, 1)
        if split == 1:
            return self._attend_direct(inputs=inputs, template=template, grid=threads,
                                       threadgroup=(32 * NUM_WARPS, 1, 1),
                                       output_shapes=[queries.shape], output_dtypes=[queries.dtype])[0]
        part_acc, part_m, part_l = self._attend_split(
            inputs=inputs, template=template, grid=threads, threadgroup=(32 * NUM_WARPS, 1, 1),
            output_shapes=[(B, hkv, split, g, d), (B, hkv, split, g), (B, hkv, split, g)],
            output_dtypes=[mx.float32] * 3)
        return self._combine(inputs=[part_acc, part_m, part_l], template=template,
                             grid=(B * hq * d, 1, 1), threadgroup=(128, 1, 1),
                             output_shapes=[queries.shape], output_dtypes=[queries.dtype])[0]


    def warm_up(self, dtype: mx.Dtype, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        """Compile every kernel variant this model can use now, not during the first requests."""
        for split in SPLITS:
            length = split * MIN_POSITIONS_PER_SPLIT * 2 - 1
            rows = 1 if split > 1 else -(-MIN_BLOCKS // n_kv_heads)
            if _split_for(rows * n_kv_heads, length + 1) != split:
                continue  # a variant no batch of this model can reach (very many kv heads)
            buf = mx.zeros((rows, n_kv_heads, length + 1, head_dim), dtype)
            k_new = mx.zeros((rows, n_kv_heads, 1, head_dim), dtype)
            lengths = mx.full((rows,), length, mx.int32)
            done = self.write(k_new, k_new, buf, buf, lengths)
            mx.eval(self.attend(mx.zeros((rows, n_heads, 1, head_dim), dtype), buf, buf, lengths, done,
                                1.0, length))


def _split_for(blocks: int, positions: int) -> int:
    """How many blocks share one row's positions: enough blocks to fill the chip, but at least
    MIN_POSITIONS_PER_SPLIT positions each."""
    split = SPLITS[0]
    for s in SPLITS[1:]:
        if blocks * split >= MIN_BLOCKS or positions / s < MIN_POSITIONS_PER_SPLIT:
            break
        split = s
    return split


def install_attention_hook(model) -> bool:
    """Route mlx-lm's `scaled_dot_product_attention` through caches that attend themselves.

    mlx-lm model files call the function they imported from `mlx_lm.models.base`; replacing that
    name in each model module with a wrapper lets a cache with `.attend` take the call (and every
    other cache, e.g. mlx-lm's own, go to the original). Returns False when some attention module
    of the model does not call it that way (then the kernels must not be used)."""
    found = False
    for module in model.modules():
        mod = sys.modules.get(type(module).__module__)
        original = getattr(mod, "scaled_dot_product_attention", None) if mod else None
        if original is None:
            continue
        found = True
        if getattr(original, "_parallm_hook", False):
            continue

        def hooked(queries, keys, values, cache, scale, mask, *args, _original=original, **kwargs):
            attend = getattr(cache, "attend", None)
            if attend is not None:
                out = attend(queries, scale, kwargs.get("sinks", args[0] if args else None))
                if out is not None:
                    return out
            return _original(queries, keys, values, cache, scale, mask, *args, **kwargs)

        hooked._parallm_hook = True
        mod.scaled_dot_product_attention = hooked
    return found


def kernels_for(model, layout) -> Optional[DecodeAttention]:
    """DecodeAttention for this model with its variants compiled, or None where the kernels do
    not apply or do not compile (then decode keeps MLX's masked attention). `layout` is the
    model's CacheLayout: the kernels attend every position of plain attention layers only, so any
    sliding window (however the config names it), recurrent state or attention sink sends the
    model to MLX's attention."""
    if not computing_on_cuda() or layout.has_state or layout.has_windows or not layout.attention:
        return None
    if any("sinks" in module for module in model.modules()):
        return None
    first = layout.attention[0]
    if any(layer != first for layer in layout.attention):
        return None  # one kernel shape for every layer
    shape = probe_attention_shape(model)
    if (shape is None or shape[1:] != (first.n_kv_heads, first.k_head_dim) or first.v_head_dim != first.k_head_dim
            or not DecodeAttention.supports(*shape)):
        return None
    dtype = first.dtype
    if not install_attention_hook(model):
        return None
    started = time.monotonic()
    try:
        kernels = DecodeAttention()
        kernels.warm_up(dtype, *shape)
    except Exception as e:  # a toolchain that cannot build them: MLX's attention still works
        log.warning("decode kernels unavailable (%s); decode uses MLX's masked attention", e)
        return None
    log.info("decode kernels compiled in %.1f s", time.monotonic() - started)
    return kernels


def probe_attention_shape(model) -> Optional[tuple[int, int, int]]:
    """(n_heads, n_kv_heads, head_dim) from the model's args, or None when unknown."""
    args: Any = getattr(model, "args", None)
    if args is None:
        return None
    heads = getattr(args, "num_attention_heads", None)
    kv = getattr(args, "num_key_value_heads", None) or heads
    dim = getattr(args, "head_dim", None) or (getattr(args, "hidden_size", 0) // heads if heads else None)
    if not heads or not dim:
        return None
    return int(heads), int(kv), int(dim)
