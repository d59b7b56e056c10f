"""Test helpers: turn a tiny mlx-lm Llama directory into GGUF files the way llama.cpp's converter
does (tensor names, llama.* metadata, q/k row permutation, tokenizer metadata), either with
mx.save_gguf (F32/F16) or with a small raw GGUF writer that also writes quantized blocks
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, and the K-quants Q4_K, Q5_K, Q6_K) and types parallm must refuse
(IQ2_XXS, TQ1_0). Written independently of parallm's loader so the tests compare two
implementations; the block encoders follow ggml's layouts (ggml-common.h) with simple, not
optimal, choices of scales."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGML_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12,
             "Q5_K": 13, "Q6_K": 14, "IQ2_XXS": 16, "TQ1_0": 34}
# general.file_type (llama.cpp's LLAMA_FTYPE); the K entries are the usual _M mixes
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 15,
             "Q5_K": 17, "Q6_K": 18, "IQ2_XXS": 19, "TQ1_0": 36}
# bytes per 256-element super-block of the types written only to be refused
_REFUSED_BLOCK_BYTES = {"IQ2_XXS": 66, "TQ1_0": 54}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permute: rotate-halves row order -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model_dir: Path, permute_qk: bool = True) -> tuple[dict, dict]:
    """(GGUF-named float32 numpy tensors, config) from an mlx-lm llama (or qwen2) directory.
    llama.cpp permutes q/k rows for llama only (permute_qk)."""
    import mlx.core as mx

    config = json.loads((model_dir / "config.json").read_text())
    weights = mx.load(str(model_dir / "model.safetensors"))
    out = {}
    for name, value in weights.items():
        v = np.array(value.astype(mx.float32))
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = v
        elif name == "model.norm.weight":
            out["output_norm.weight"] = v
        elif name == "lm_head.weight":
            out["output.weight"] = v
        else:
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            if permute_qk and module == "self_attn.q_proj":
                v = llama_cpp_permute(v, config["num_attention_heads"])
            elif permute_qk and module == "self_attn.k_proj":
                v = llama_cpp_permute(v, config["num_key_value_heads"])
            out[f"blk.{layer}.{LAYER_NAMES[module]}.{suffix}"] = v
    return out, config


def gguf_metadata(config: dict, tokenizer_dir: Path, *, arch: str = "llama", file_type: str = "F32",
                  tokenizer_only: bool = False) -> dict:
    """Python-valued GGUF metadata: llama.* hyperparameters and the tokenizer (only the tokenizer
    with `tokenizer_only`)."""
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tok_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    tokenizer = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": ("i32[]", [3 if i in special else 1 for i in range(len(tokens))]),
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": ("u32", ids[tok_config["bos_token"]]),
        "tokenizer.ggml.eos_token_id": ("u32", ids[tok_config["eos_token"]]),
        "tokenizer.ggml.unknown_token_id": ("u32", ids[tok_config["unk_token"]]),
        "tokenizer.ggml.padding_token_id": ("u32", ids[tok_config["eos_token"]]),
        "tokenizer.ggml.add_bos_token": ("bool", False),
        "tokenizer.chat_template": tok_config["chat_template"],
    }
    if tokenizer_only:
        return tokenizer
    return {
        "general.architecture": arch,
        "general.name": "tiny test llama",
        "general.file_type": ("u32", FILE_TYPE[file_type]),
        f"{arch}.block_count": ("u32", config["num_hidden_layers"]),
        f"{arch}.context_length": ("u32", config["max_position_embeddings"]),
        f"{arch}.embedding_length": ("u32", config["hidden_size"]),
        f"{arch}.feed_forward_length": ("u32", config["intermediate_size"]),
        f"{arch}.attention.head_count": ("u32", config["num_attention_heads"]),
        f"{arch}.attention.head_count_kv": ("u32", config["num_key_value_heads"]),
        f"{arch}.rope.freq_base": ("f32", config["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": ("f32", config["rms_norm_eps"]),
        f"{arch}.vocab_size": ("u32", config["vocab_size"]),
        **tokenizer,
    }


def save_with_mlx(path: Path, tensors: dict, metadata: dict, dtype: str = "F32") -> Path:
    """Write with mx.save_gguf (which handles F32/F16 only). Norms stay F32, as llama.cpp does."""
    import mlx.core as mx

    mx_dtype = {"F32": mx.float32, "F16": mx.float16}[dtype]
    arrays = {k: mx.array(v).astype(mx.float32 if v.ndim == 1 else mx_dtype) for k, v in tensors.items()}
    md = {}
    for k, v in metadata.items():
        if isinstance(v, tuple):
            kind, value = v
            md[k] = mx.array(value, dtype={"u32": mx.uint32, "f32": mx.float32, "bool": mx.bool_,
                                           "i32[]": mx.int32}[kind])
        else:
            md[k] = v
    mx.save_gguf(str(path), arrays, md)
    return path


# ---- a raw GGUF writer, for quantized types -----------------------------------------------------

def quantize_blocks(x: np.ndarray, kind: str) -> tuple[bytes, np.ndarray]:
    """(GGUF block bytes, what llama.cpp would dequantize them to) for a 2-D float array whose rows
    are a multiple of 32 long. Follows ggml's reference quantizers."""
    rows, cols = x.shape
    b = x.astype(np.float32).reshape(rows, cols // 32, 32)
    if kind == "Q8_0":
        d = (np.abs(b).max(-1, keepdims=True) / 127).astype(np.float16)
        q = np.round(b / np.where(d == 0, 1, d.astype(np.float32))).clip(-128, 127).astype(np.int8)
        raw = np.concatenate([d.view(np.uint8), q.view(np.uint8)], -1)
        return raw.tobytes(), (q.astype(np.float32) * d.astype(np.float32)).reshape(rows, cols)
    if kind == "Q4_0":
        idx = np.abs(b).argmax(-1)[..., None]
        d = (np.take_along_axis(b, idx, -1) / -8).astype(np.float16)
        inv = 1 / np.where(d == 0, 1, d.astype(np.float32))
        q = np.clip(np.trunc(b * inv + 8.5), 0, 15).astype(np.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
        raw = np.concatenate([d.view(np.uint8), packed], -1)
        return raw.tobytes(), ((q.astype(np.float32) - 8) * d.astype(np.float32)).reshape(rows, cols)
    if kind == "Q4_1":
        lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
        d = ((hi - lo) / 15).astype(np.float16)
        m = lo.astype(np.float16)
        inv = 1 / np.where(d == 0, 1, d.astype(np.float32))
        q = np.clip(np.trunc((b - m.astype(np.float32)) * inv + 0.5), 0, 15).astype(np.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
        raw = np.concatenate([d.view(np.uint8), m.view(np.uint8), packed], -1)
        return raw.tobytes(), (q.astype(np.float32) * d.astype(np.float32) + m.astype(np.float32)).reshape(rows, cols)
    if kind in ("Q5_0", "Q5_1"):
        return _q5_legacy(b, kind, rows, cols)
    if kind in ("Q4_K", "Q5_K"):
        return _q45_k(x.astype(np.float32).reshape(-1, 8, 32), 4 if kind == "Q4_K" else 5, rows, cols)
    if kind == "Q6_K":
        return _q6_k(x.astype(np.float32).reshape(-1, 16, 16), rows, cols)
    if kind in _REFUSED_BLOCK_BYTES:  # only the size matters: parallm must refuse it before reading
        return bytes(rows * cols // 256 * _REFUSED_BLOCK_BYTES[kind]), np.zeros_like(x)
    raise ValueError(kind)


def _safe(d: np.ndarray) -> np.ndarray:
    return np.where(d == 0, 1, d)


def _q5_legacy(b: np.ndarray, kind: str, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    """block_q5_0 {half d; u32 qh; u8 qs[16]} / block_q5_1 {half d, m; u32 qh; u8 qs[16]}: element
    j < 16 is the low nibble of qs[j] plus bit j of qh as its 5th bit, element j + 16 the high
    nibble plus bit j + 16. Q5_0 is (q - 16) * d, Q5_1 q * d + m."""
    if kind == "Q5_0":
        idx = np.abs(b).argmax(-1)[..., None]
        d = (np.take_along_axis(b, idx, -1) / -16).astype(np.float16)
        q = np.clip(np.trunc(b / _safe(d.astype(np.float32)) + 16.5), 0, 31).astype(np.uint8)
        head = [d.view(np.uint8)]
        values = (q.astype(np.float32) - 16) * d.astype(np.float32)
    else:
        lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
        d, m = ((hi - lo) / 31).astype(np.float16), lo.astype(np.float16)
        q = np.clip(np.rint((b - m.astype(np.float32)) / _safe(d.astype(np.float32))), 0, 31).astype(np.uint8)
        head = [d.view(np.uint8), m.view(np.uint8)]
        values = q.astype(np.float32) * d.astype(np.float32) + m.astype(np.float32)
    qh = ((q >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    qs = (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)
    raw = np.concatenate(head + [qh[..., None].astype("<u4").view(np.uint8), qs], -1)
    return raw.tobytes(), values.reshape(rows, cols)


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12 bytes holding 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4 reversed):
    bytes 0-3 scales 0-3 (+ top bits of scales 4-7), bytes 4-7 mins 0-3 (+ top bits of mins 4-7),
    bytes 8-11 the low nibbles of scales 4-7 and mins 4-7."""
    out = np.empty((*sc.shape[:-1], 12), np.uint8)
    out[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return out


def _q45_k(b: np.ndarray, bits: int, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    """block_q4_K {half d, dmin; u8 scales[12]; u8 qs[128]} and block_q5_K {half d, dmin;
    u8 scales[12]; u8 qh[32]; u8 qs[128]}: 8 sub-blocks of 32, each d*sc*q - dmin*m with 6-bit
    sc, m. qs[32i + l] holds sub-block 2i's element l (low nibble) and 2i+1's (high nibble); for
    Q5_K, bit 2i / 2i+1 of qh[l] is their 5th bit."""
    levels = (1 << bits) - 1
    lo = np.minimum(b.min(-1), 0)  # ggml's mins are never positive
    scale, mins = (b.max(-1) - lo) / levels, -lo  # per sub-block, (blocks, 8)
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(scale / _safe(d32)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(mins / _safe(dmin32)), 0, 63).astype(np.uint8)
    step, offset = (d32 * sc.astype(np.float32))[..., None], (dmin32 * m.astype(np.float32))[..., None]
    q = np.clip(np.rint((b + offset) / _safe(step)), 0, levels).astype(np.uint8)
    values = step * q.astype(np.float32) - offset
    pairs = q.reshape(-1, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 15) | ((pairs[:, :, 1] & 15) << 4)).reshape(-1, 128)
    parts = [d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), _pack_k_scales(sc, m)]
    if bits == 5:
        high = (q >> 4).astype(np.uint8)  # (blocks, 8, 32): sub-block j's 5th bits -> bit j of qh
        parts.append((high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8))
    raw = np.concatenate(parts + [qs], -1)
    return raw.tobytes(), values.reshape(rows, cols)


def _q6_k(b: np.ndarray, rows: int, cols: int) -> tuple[bytes, np.ndarray]:
    """block_q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; half d}: 16 sub-blocks of 16, each
    d*scale*(q - 32) with q 6 bits. Per 128-element half h, element 32k + l (k < 4, l < 32) keeps
    its low 4 bits in ql[64h + 32(k % 2) + l] (low nibble for k < 2, high for k >= 2) and its top
    2 bits in bits 2k..2k+1 of qh[32h + l]. Odd sub-blocks get negative scales, as ggml's own
    quantizer often writes, so that the int8 sign is exercised."""
    sign = np.where(np.arange(16) % 2, -1.0, 1.0).astype(np.float32)
    scale = np.abs(b).max(-1) / 31 * sign  # (blocks, 16)
    d = (np.abs(scale).max(-1) / 127).astype(np.float16)
    sc = np.clip(np.rint(scale / _safe(d.astype(np.float32))[:, None]), -128, 127).astype(np.int8)
    step = (d.astype(np.float32)[:, None] * sc.astype(np.float32))[..., None]
    q = (np.clip(np.rint(b / _safe(step)), -32, 31) + 32).astype(np.uint8)
    values = step * (q.astype(np.float32) - 32)
    q = q.reshape(-1, 2, 4, 32)  # (blocks, half, k, l)
    ql = np.concatenate([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4),
                         (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], -1).reshape(-1, 128)
    qh = ((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2, dtype=np.uint8).reshape(-1, 64)
    raw = np.concatenate([ql, qh, sc.view(np.uint8), d[:, None].view(np.uint8)], -1)
    return raw.tobytes(), values.reshape(rows, cols)


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, value) -> bytes:
    out = _string(key)
    if isinstance(value, str):
        return out + struct.pack("<I", 8) + _string(value)
    if isinstance(value, list):  # list of strings
        return out + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_string(v) for v in value)
    kind, v = value
    if kind == "i32[]":
        return out + struct.pack("<IIQ", 9, 5, len(v)) + np.asarray(v, "<i4").tobytes()
    fmt, type_id = {"u32": ("<I", 4), "f32": ("<f", 6), "bool": ("<?", 7)}[kind]
    return out + struct.pack("<I", type_id) + struct.pack(fmt, v)


def write_raw_gguf(path: Path, tensors: dict, metadata: dict, kind: str,
                   types: dict | None = None) -> tuple[Path, dict]:
    """Write GGUF v3 with 2-D weights as `kind` (or `types[name]`, for mixes like Q4_K_M) and 1-D
    tensors as F32. Returns the path and the float32 tensors a correct reader must recover (the
    dequantized values)."""
    infos, blobs, recovered, offset = [], [], {}, 0
    for name, x in tensors.items():
        this = (types or {}).get(name, kind)
        if x.ndim == 2 and this == "F16":
            data, recovered[name], type_id = x.astype("<f2").tobytes(), x.astype(np.float16).astype(np.float32), 1
        elif x.ndim == 2 and this == "BF16":  # the top 16 bits of float32, rounded to nearest even
            u = x.astype("<f4").view("<u4")
            bf16 = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
            data, type_id = bf16.tobytes(), 30
            recovered[name] = (bf16.astype("<u4") << 16).view("<f4")
        elif x.ndim == 2 and this != "F32":
            data, recovered[name] = quantize_blocks(x, this)
            type_id = GGML_TYPE[this]
        else:
            data, recovered[name], type_id = x.astype("<f4").tobytes(), x.astype(np.float32), 0
        infos.append(_string(name) + struct.pack("<I", x.ndim) + struct.pack(f"<{x.ndim}Q", *x.shape[::-1])
                     + struct.pack("<IQ", type_id, offset))
        pad = -len(data) % 32
        blobs.append(data + bytes(pad))
        offset += len(data) + pad
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    head += b"".join(_kv(k, v) for k, v in metadata.items()) + b"".join(infos)
    head += bytes(-len(head) % 32)
    path.write_bytes(head + b"".join(blobs))
    return path, recovered


def write_with_gguf_py(path: Path, arch: str, tensors: dict, hparams: dict, tokenizer_dir: Path,
                       types: dict | None = None) -> Path:
    """Write a GGUF file with gguf-py's GGUFWriter, the writer llama.cpp's convert_hf_to_gguf.py
    uses, so metadata keys are llama.cpp's own constants. `hparams` maps writer methods
    (add_block_count, ...) to their argument; tensors (float32 numpy, GGUF names) are written as
    F32, or as the block type `types[name]` (encoded by quantize_blocks)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for method, value in hparams.items():
        getattr(w, method)(value)
    for key, value in gguf_metadata({}, tokenizer_dir, tokenizer_only=True).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            kind, v = value
            {"u32": w.add_uint32, "bool": w.add_bool, "i32[]": w.add_array}[kind](key, v)
    for name, x in tensors.items():
        kind = (types or {}).get(name, "F32")
        if kind == "F32":
            w.add_tensor(name, x.astype(np.float32))
        else:
            data, _ = quantize_blocks(x, kind)
            w.add_tensor(name, np.frombuffer(data, np.uint8).reshape(x.shape[0], -1), raw_shape=x.shape,
                         raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
