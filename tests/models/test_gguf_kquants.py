"""GGUF K-quants and the other block types parallm converts itself (parallm/models/gguf_quants.py).

- The test encoders (models_gguf_helpers.py, written from ggml's block layouts) decode through
  gguf-py, llama.cpp's reference dequantizer, to exactly the values they claim.
- parallm's conversion of any valid blocks equals gguf-py's decoding: bit for bit where the codes
  are copied (Q4_0 ... Q5_K, up to float16 scales), within one MLX step where they are
  requantized (Q6_K, Q3_K, Q2_K).
- Whole files as Ollama / LM Studio users have them (Q4_K_M, Q5_K_M, Q6_K mixes of a tiny Llama
  256 wide, as K-quants need) give the logits of mlx-lm running on the weights the blocks decode
  to, and the same greedy tokens.
- Types parallm does not read are refused by name before anything is converted.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from models_gguf_helpers import LAYER_NAMES, gguf_metadata, gguf_tensors, quantize_blocks, write_raw_gguf
from tiny_models import TOKENIZER_DIR, write_tiny_llama

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 47, 2, 198, 1, 520]
ENCODED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# where the block header's float16 fields sit, to make random blocks with sane scales
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208], "Q3_K": [108], "Q2_K": [80, 82]}


def logits_of(model, tokens=PROMPT) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([tokens])).astype(mx.float32))


def greedy(model, n=8) -> list[int]:
    """n tokens of greedy decoding after PROMPT, with mlx-lm's KV cache."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache, out = make_prompt_cache(model), []
    logits = model(mx.array([PROMPT]), cache=cache)
    for _ in range(n):
        out.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([out[-1:]]), cache=cache)
    return out


def rms(a: np.ndarray) -> float:
    return float(np.sqrt((a.astype(np.float64) ** 2).mean()))


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid `kind` data: random bytes (every pattern is a valid block) with float16 scales
    drawn in a weight-like range."""
    from parallm.models.gguf_file import GGML_TYPES

    _, elems, size = next(v for v in GGML_TYPES.values() if v[0] == kind)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // elems, size), dtype=np.uint8)
    for at in F16_FIELDS[kind]:
        d = rng.uniform(1e-3, 1e-2, (rows, cols // elems)).astype(np.float16)
        raw[..., at:at + 2] = d[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", ENCODED)
def test_encoders_round_trip_through_gguf_py(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 512)) * 0.05).astype(np.float32)
    x[3] = 0  # an all-zero row: scales 0
    x[5, :256] = np.abs(x[5, :256])  # a super-block without negative values: mins 0
    raw, decoded = quantize_blocks(x, kind)
    got = dequantize(np.frombuffer(raw, np.uint8).reshape(16, -1), GGMLQuantizationType[kind])
    np.testing.assert_array_equal(got, decoded)
    assert 0 < np.abs(decoded - x).max() < 0.1  # a real quantization, not a copy or garbage


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"])
def test_copied_types_decode_like_gguf_py(kind):
    import mlx.core as mx

    from parallm.models.gguf_quants import COPIED_BITS, convert_tensor, dequantize

    raw = random_blocks(kind, 40, 512)
    out = convert_tensor(raw, kind, (40, 512))
    bits = COPIED_BITS[kind]
    assert out["weight"].shape == (40, 512 * bits // 32) and out["scales"].shape == (40, 16)
    got = np.array(mx.dequantize(out["weight"], out["scales"].astype(mx.float32),
                                 out["biases"].astype(mx.float32), group_size=32, bits=bits))
    want = dequantize(raw, kind)
    if kind.endswith("_K"):  # d * sc rounded to float16: ~2^-11 of a weight's magnitude
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
    else:  # the block's own float16 scale, copied
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["Q6_K", "Q3_K", "Q2_K"])
def test_requantized_types_stay_within_one_step(kind):
    import mlx.core as mx

    from parallm.models.gguf_quants import REQUANTIZED_BITS, convert_tensor, dequantize

    raw = random_blocks(kind, 40, 512)
    out = convert_tensor(raw, kind, (40, 512))
    bits = REQUANTIZED_BITS[kind]
    got = np.array(mx.dequantize(out["weight"], out["scales"].astype(mx.float32),
                                 out["biases"].astype(mx.float32), group_size=32, bits=bits))
    want = dequantize(raw, kind).reshape(40, 16, 32)
    step = (want.max(-1) - want.min(-1)) / (2 ** bits - 1)  # the grid of each run of 32
    # mx.quantize moves its grid so that 0 lies on it, which costs up to ~1 step at a run's far
    # end (measured 1.07 at most) where plain rounding would cost half; a misread block is off by
    # a good part of the run's range, 2^bits - 1 steps.
    assert (np.abs(got.reshape(40, 16, 32) - want).max(-1) <= step * 1.25).all()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "F16"])
def test_numpy_route_equals_mx_load(kind, tiny_model_dir, tmp_path):
    """For the types mx.load reads itself, parallm's own reader gives identical arrays, so which
    one a file goes through does not matter."""
    import mlx.core as mx

    from parallm.models.gguf import architecture_of, read_tensors
    from parallm.models.gguf_file import read_gguf_header

    tensors, config = gguf_tensors(tiny_model_dir)
    path, _ = write_raw_gguf(tmp_path / f"{kind}.gguf", tensors, gguf_metadata(config, TOKENIZER_DIR), kind)
    header = read_gguf_header(path)
    ours = read_tensors(header, architecture_of(header), use_mx_load=False)
    theirs = read_tensors(header, architecture_of(header), use_mx_load=True)
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        assert mx.array_equal(ours[name], value).item(), name


# ---- whole files ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny Llama 256 wide (K-quant rows are multiples of 256), with its own output head."""
    return write_tiny_llama(tmp_path_factory.mktemp("wide"), seed=5, hidden_size=256, num_heads=4,
                            num_kv_heads=2, intermediate_size=512)


def k_mix(tensors: dict, mix: str) -> dict:
    """Tensor types as llama.cpp's llama-quantize picks them for `mix`, simplified: the output
    head Q6_K, attn_v and ffn_down Q6_K in the first layer only (llama.cpp: in some layers), the
    rest of the matrices Q4_K / Q5_K; Q5_K_M also carries a Q8_0 and an F16 matrix, as files with
    fallback types do. Norms stay F32."""
    base = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}[mix]
    types = {}
    for name, x in tensors.items():
        if x.ndim == 2:
            sensitive = name == "output.weight" or name in ("blk.0.attn_v.weight", "blk.0.ffn_down.weight")
            types[name] = "Q6_K" if sensitive else base
    if mix == "Q5_K_M":
        types.update({"blk.1.attn_k.weight": "Q8_0", "blk.1.attn_q.weight": "F16"})
    return types


def reference_dir(model_dir, types: dict, out):
    """mlx-lm's directory with each matrix replaced by what its blocks decode to (per-row
    quantization, so quantizing the HF-order q/k rows equals permuting first)."""
    import mlx.core as mx

    shutil.copytree(model_dir, out)
    hf = mx.load(str(model_dir / "model.safetensors"))
    decoded = {}
    for name, value in hf.items():
        gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}.get(name)
        if gguf_name is None and name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{LAYER_NAMES[module]}.{suffix}"
        kind = types.get(gguf_name, "F32")
        v = np.array(value)
        if kind == "F16":
            v = v.astype(np.float16).astype(np.float32)
        elif kind == "BF16":
            v = np.array(mx.array(v).astype(mx.bfloat16).astype(mx.float32))
        elif kind != "F32":
            v = quantize_blocks(v, kind)[1]
        decoded[name] = mx.array(v)
    mx.save_safetensors(str(out / "model.safetensors"), decoded)
    return out


EXPECTED_BITS = {"Q4_K_M": {4, 8}, "Q5_K_M": {5, 8}, "Q6_K": {8}}
# The logit error parallm adds (8-bit requantization of Q6_K, float16 K-quant scales), as a share
# of the error the file's own quantization already has (RMS over the prompt's logits). Measured:
# Q4_K_M 0.04, Q5_K_M 0.08, Q6_K 0.27. For scale: requantizing Q6_K to 6 bits instead gave ~1.0
# for the Q6_K file, and requantizing Q4_K's decoded floats with mx.quantize (rather than copying
# its codes) gave ~1.0 for Q4_K_M: each doubles the file's own error variance.
ADDED_ERROR_SHARE = {"Q4_K_M": 0.1, "Q5_K_M": 0.15, "Q6_K": 0.4}


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q5_K_M", "Q6_K"])
def test_k_quant_file_matches_its_decoded_weights(mix, wide_llama, tmp_path):
    import mlx.nn as nn
    import mlx_lm

    from parallm.models import load

    tensors, config = gguf_tensors(wide_llama)
    types = k_mix(tensors, mix)
    path, _ = write_raw_gguf(tmp_path / f"wide-{mix}.gguf", tensors,
                             gguf_metadata(config, TOKENIZER_DIR, file_type=mix[:4]), "F32", types=types)
    reference, _ = mlx_lm.load(str(reference_dir(wide_llama, types, tmp_path / "reference")))
    want = logits_of(reference)
    own = want - logits_of(mlx_lm.load(str(wide_llama))[0])  # what quantizing did to the logits

    lm = load(str(path), device="cpu")  # CPU default: dequantized to float32
    added = logits_of(lm.model) - want
    print(f"\n{mix}: logit error added {np.abs(added).max():.3f} max / {rms(added):.4f} RMS; the "
          f"file's own {np.abs(own).max():.3f} / {rms(own):.4f}; logits up to {np.abs(want).max():.1f}")
    assert rms(added) < ADDED_ERROR_SHARE[mix] * rms(own)
    assert np.abs(added).max() < 2e-2 * np.abs(want).max()
    assert greedy(lm.model) == greedy(reference)

    kept = load(str(path), device="cpu", keep_quantized=True)
    bits = {m.bits for _, m in kept.model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    assert bits == EXPECTED_BITS[mix]
    assert kept.memory.weight_bytes < lm.memory.weight_bytes / 2.5
    assert rms(logits_of(kept.model) - want) < ADDED_ERROR_SHARE[mix] * rms(own)


def test_types_still_unsupported_are_refused_by_name(tiny_model_dir, wide_llama, tmp_path):
    from parallm.models import ModelLoadError, load

    tensors, config = gguf_tensors(tiny_model_dir)
    whole = write_raw_gguf(tmp_path / "iq2.gguf", tensors, gguf_metadata(config, TOKENIZER_DIR, file_type="IQ2_XXS"),
                           "IQ2_XXS")[0]
    with pytest.raises(ModelLoadError, match=r"file type IQ2_XXS.*tensors are IQ2_XXS.*Q4_K, Q5_K, Q6_K"):
        load(str(whole), device="cpu")

    tensors, config = gguf_tensors(wide_llama)  # a mixed file with one ternary tensor (the rest
    types = {"blk.0.attn_q.weight": "Q4_K", "blk.1.ffn_up.weight": "TQ1_0"}  # F32: quick to write)
    mixed = write_raw_gguf(tmp_path / "tq.gguf", tensors, gguf_metadata(config, TOKENIZER_DIR, file_type="Q4_K"),
                           "F32", types=types)[0]
    with pytest.raises(ModelLoadError, match=r"1 tensors are TQ1_0 \(e\.g\. blk\.1\.ffn_up\.weight\)"):
        load(str(mixed), device="cpu")


def test_every_supported_type_has_a_route():
    from parallm.models.gguf_file import SUPPORTED_TYPES
    from parallm.models.gguf_quants import COPIED_BITS, FLOAT_TYPES, REQUANTIZED_BITS

    assert sorted(SUPPORTED_TYPES) == sorted([*FLOAT_TYPES, *COPIED_BITS, *REQUANTIZED_BITS])


def test_k_quant_rows_must_be_whole_blocks(tiny_model_dir, tmp_path):
    """A Q4_K matrix 64 wide cannot be valid GGUF (llama.cpp refuses it too)."""
    from parallm.models import ModelLoadError, load

    tensors, config = gguf_tensors(tiny_model_dir)
    path = write_raw_gguf(tmp_path / "ragged.gguf", tensors, gguf_metadata(config, TOKENIZER_DIR), "Q4_K")[0]
    with pytest.raises(ModelLoadError, match=r"malformed GGUF.*Q4_K, rows of 64 values in blocks of 256"):
        load(str(path), device="cpu")


def test_bf16_file_loads(tiny_model_dir, tmp_path):
    """BF16 matrices (llama.cpp's --outtype bf16; mx.load cannot read them) load as bfloat16."""
    import mlx.core as mx
    import mlx_lm

    from parallm.models import load

    tensors, config = gguf_tensors(tiny_model_dir)
    path, _ = write_raw_gguf(tmp_path / "bf16.gguf", tensors, gguf_metadata(config, TOKENIZER_DIR), "BF16")
    types = {name: "BF16" for name, x in tensors.items() if x.ndim == 2}
    reference, _ = mlx_lm.load(str(reference_dir(tiny_model_dir, types, tmp_path / "reference")))
    kept = load(str(path), device="cpu", keep_quantized=True)
    assert kept.model.model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    lm = load(str(path), device="cpu")  # CPU: cast to float32, so exactly the bfloat16 values
    np.testing.assert_allclose(logits_of(lm.model), logits_of(reference), rtol=1e-4, atol=1e-4)
