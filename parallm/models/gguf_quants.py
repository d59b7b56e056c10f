"""Turn one GGUF tensor's raw bytes into MLX arrays: a float array, or an MLX affine-quantized
triplet (`weight` uint32, `scales`, `biases`; group size 32) that nn.QuantizedLinear and
nn.QuantizedEmbedding take as they are, so a quantized file stays quantized on the GPU.

Three routes, by ggml type:
- F32, F16, BF16: copied as they are.
- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K ("copied"): every run of 32 weights is affine,
  `scale * q + bias` with q an integer of 4, 5 or 8 bits, which is exactly MLX's format. We copy
  the integer codes and compute each run's scale and bias from the block's header, so the result
  decodes to the same values as llama.cpp's dequantizer (up to the float16 rounding of K-quant
  scales). Requantizing the decoded floats with mx.quantize instead would not be exact: it picks
  its own grid from each run's min/max and moves it so that 0 is representable, which, measured on
  Gaussian Q4_K weights, raised the RMS error by ~40%.
- Q6_K, Q3_K, Q2_K ("requantized"): their sub-blocks of 16 have separate scales, which MLX's
  smallest group (32) cannot hold, so gguf-py (llama.cpp's own reference dequantizer) decodes them
  and mx.quantize re-encodes them, with more bits than the source so that the added error stays a
  few percent of the file's own (see REQUANTIZED_BITS).
A tensor that is not a matrix (norms, biases, RoPE factors) is always returned as float32.
"""
from __future__ import annotations

import numpy as np

GROUP_SIZE = 32
FLOAT_TYPES = ("F32", "F16", "BF16")
# ggml type -> MLX bits, for the types whose runs of 32 are affine with 2^bits levels.
COPIED_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
# ggml type -> MLX bits after dequantizing. Q6_K -> 8 bits: at 6 bits (MLX has no 7) the grid,
# being per 32 weights instead of per 16, added as much error as Q6_K itself has (RMS error
# 0.019 -> 0.027 on Gaussian weights), at 8 bits +3% (0.019 -> 0.020), for 9 instead of 7 bits a
# weight. Q3_K and Q2_K get one bit more than their levels for the same reason.
REQUANTIZED_BITS = {"Q6_K": 8, "Q3_K": 4, "Q2_K": 3}
# weights converted per step: ~1M keeps numpy's temporaries in cache (4096-row steps of a 4096-wide
# Q6_K matrix ran gguf-py 6x slower than 256-row ones)
_CHUNK_ELEMENTS = 1 << 20


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 field at byte `at` of every block, as float32 (blocks: (rows, n, bytes))."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles_packed(qs: np.ndarray) -> np.ndarray:
    """4-bit codes stored ggml's way (byte j of a run of L bytes: element j in the low nibble,
    element L + j in the high one) -> MLX's way (byte k: elements 2k and 2k + 1), byte-wise."""
    a, b = qs[..., 0::2], qs[..., 1::2]
    return np.concatenate([(a & 15) | (b << 4), (a >> 4) | (b & 0xF0)], axis=-1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """The same layout as one code per byte: elements 0..L-1 then L..2L-1."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the little-endian u32 qh is element j's 5th bit, as 0 or 16."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little") << 4


def _pack5(codes: np.ndarray) -> np.ndarray:
    """5-bit codes (rows, cols) -> MLX's packing, a little-endian bit stream: 8 codes, 5 bytes."""
    c = [codes[:, i::8] for i in range(8)]
    out = [c[0] | (c[1] << 5), (c[1] >> 3) | (c[2] << 2) | (c[3] << 7), (c[3] >> 1) | (c[4] << 4),
           (c[4] >> 4) | (c[5] << 1) | (c[6] << 6), (c[6] >> 2) | (c[7] << 3)]
    return np.stack(out, axis=-1).reshape(codes.shape[0], -1)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K block's 12 scale bytes (ggml's
    get_scale_min_k4): sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7, sub-blocks 4-7 from the
    nibbles of bytes 8-11 plus the top 2 bits of bytes 0-3 / 4-7."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mins.astype(np.float32)


def _k_qs(blocks: np.ndarray, at: int) -> np.ndarray:
    """Q4_K/Q5_K's qs[128], as 4 runs of 32 bytes: byte l of run i holds element l of sub-block
    2i (low nibble) and of sub-block 2i + 1 (high nibble)."""
    return blocks[..., at:at + 128].reshape(*blocks.shape[:-1], 4, 32)


def _decode(blocks: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed MLX codes (rows, packed bytes), scales, biases (rows, runs of 32)) for one chunk of
    rows of blocks (rows, n, block bytes); every weight is scale * code + bias. Layouts: ggml's
    ggml-common.h."""
    rows = blocks.shape[0]
    if kind in ("Q4_0", "Q5_0", "Q8_0"):
        d = _f16(blocks, 0)[..., None]
        if kind == "Q4_0":
            return _nibbles_packed(blocks[..., 2:18]).reshape(rows, -1), d, -8 * d
        if kind == "Q5_0":
            codes = _nibbles(blocks[..., 6:22]) | _high_bits(blocks[..., 2:6])
            return _pack5(codes.reshape(rows, -1)), d, -16 * d
        return (blocks[..., 2:34] ^ np.uint8(0x80)).reshape(rows, -1), d, -128 * d  # int8 q + 128
    if kind in ("Q4_1", "Q5_1"):
        d, m = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]
        if kind == "Q4_1":
            return _nibbles_packed(blocks[..., 4:20]).reshape(rows, -1), d, m
        codes = _nibbles(blocks[..., 8:24]) | _high_bits(blocks[..., 4:8])
        return _pack5(codes.reshape(rows, -1)), d, m
    # Q4_K / Q5_K: 8 runs of 32, each d * sc * q - dmin * m
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]
    sc, mins = _k_scales(blocks[..., 4:16])
    if kind == "Q4_K":
        packed = _nibbles_packed(_k_qs(blocks, 16)).reshape(rows, -1)
    else:  # bit j of qh[l] is the 5th bit of element l of sub-block j
        qh = blocks[..., None, 16:48]
        high = ((qh >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4  # (rows, n, 8, 32)
        codes = _nibbles(_k_qs(blocks, 48)).reshape(high.shape) | high
        packed = _pack5(codes.reshape(rows, -1))
    return packed, d * sc, -(dmin * mins)


def _copied(raw: np.ndarray, kind: str, rows: int, cols: int) -> dict:
    import mlx.core as mx

    from parallm.models.gguf_file import GGML_TYPES

    _, block_elems, block_bytes = next(v for v in GGML_TYPES.values() if v[0] == kind)
    bits = COPIED_BITS[kind]
    weight = np.empty((rows, cols * bits // 8), np.uint8)
    # float16, as mx.load gave Q4_0/Q4_1/Q8_0 scales: the dtype the model then computes in
    scales = np.empty((rows, cols // GROUP_SIZE), np.float16)
    biases = np.empty_like(scales)
    step = max(1, _CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):  # in chunks: numpy's temporaries then stay in cache
        rows_here = slice(start, start + step)
        w, s, b = _decode(np.asarray(raw[rows_here]).reshape(-1, cols // block_elems, block_bytes), kind)
        weight[rows_here], scales[rows_here], biases[rows_here] = w, s.reshape(len(w), -1), b.reshape(len(w), -1)
    return {"weight": mx.array(weight.view("<u4")), "scales": mx.array(scales), "biases": mx.array(biases)}


def dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    """float32 values of a quantized tensor's rows, by gguf-py (llama.cpp's reference code)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(np.asarray(raw), GGMLQuantizationType[kind])


def _requantized(raw: np.ndarray, kind: str, rows: int, cols: int) -> dict:
    import mlx.core as mx

    bits, step = REQUANTIZED_BITS[kind], max(1, _CHUNK_ELEMENTS // cols)
    parts = []
    for start in range(0, rows, step):
        w, s, b = mx.quantize(mx.array(dequantize(raw[start:start + step], kind)), GROUP_SIZE, bits)
        parts.append((w, s.astype(mx.float16), b.astype(mx.float16)))
        mx.eval(*parts[-1])  # before the next chunk's float32 copy is made
    w, s, b = (mx.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(3))
    return {"weight": w, "scales": s, "biases": b}


def convert_tensor(raw: np.ndarray, kind: str, shape: tuple[int, ...]) -> dict:
    """{'weight': array} or {'weight', 'scales', 'biases'} for a tensor of ggml type `kind` and
    numpy `shape` (slowest dimension first), from its raw bytes (see gguf_file.tensor_bytes)."""
    import mlx.core as mx

    if kind == "F32":
        return {"weight": mx.array(raw.reshape(-1).view("<f4").reshape(shape))}
    if kind == "F16":
        return {"weight": mx.array(raw.reshape(-1).view("<f2").reshape(shape))}
    if kind == "BF16":  # numpy has no bfloat16: carry the bits over as uint16
        return {"weight": mx.array(raw.reshape(-1).view("<u2").reshape(shape)).view(mx.bfloat16)}
    if len(shape) != 2:
        return {"weight": mx.array(dequantize(raw, kind).reshape(shape))}
    rows, cols = shape
    if kind in COPIED_BITS:
        return _copied(raw, kind, rows, cols)
    return _requantized(raw, kind, rows, cols)
