"""Test helpers: turn a tiny mlx-lm Llama directory into GGUF files the way llama.cpp's converter
does (tensor names, llama.* metadata, q/k row permutation, tokenizer metadata), either with
mx.save_gguf (F32/F16) or with a small raw GGUF writer that also writes quantized blocks
(Q8_0, Q4_0, Q4_1) and types parallm must refuse (Q4_K). Written independently of parallm's
loader so the tests compare two implementations."""
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
GGML_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12}
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K": 15}


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


def gguf_metadata(config: dict, tokenizer_dir: Path, *, arch: str = "llama", file_type: str = "F32") -> dict:
    """Python-valued GGUF metadata: llama.* hyperparameters and the tokenizer."""
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tok_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
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
    if kind == "Q4_K":  # only the size matters: parallm must refuse it before reading
        return bytes(rows * cols // 256 * 144), np.zeros_like(x)
    raise ValueError(kind)


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


def write_raw_gguf(path: Path, tensors: dict, metadata: dict, kind: str) -> tuple[Path, dict]:
    """Write GGUF v3 with 2-D weights as `kind` and 1-D tensors as F32. Returns the path and the
    float32 tensors a correct reader must recover (the dequantized values)."""
    infos, blobs, recovered, offset = [], [], {}, 0
    for name, x in tensors.items():
        if x.ndim == 2 and kind != "F32":
            data, recovered[name] = quantize_blocks(x, kind)
            type_id = GGML_TYPE[kind]
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
