"""Tiny random-weight models written inside the tests (nothing is downloaded).

The tokenizer is SmolLM2's byte-level BPE (Apache-2.0), kept in tests/assets/tok so that tests
exercise a real tokenizer and chat template."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR = ASSETS / "tok"
VOCAB_SIZE = 49152


def write_tiny_llama(out: Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                     num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                     max_position_embeddings: int = 2048, dtype: str = "float32", tied: bool = False) -> Path:
    """Write an mlx-lm model directory holding a tiny random Llama with SmolLM2's tokenizer (with
    `tied`, its output head is the embedding matrix, as in SmolLM2 itself)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    config = dict(
        model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=hidden_size,
        num_hidden_layers=num_layers, intermediate_size=intermediate_size,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
        max_position_embeddings=max_position_embeddings, bos_token_id=1, eos_token_id=2,
        torch_dtype=dtype,
    )
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Scale the embeddings and the output head up so random logits are well separated: greedy
    # comparisons between implementations then do not flip on float rounding. The head is its own
    # matrix, not the embeddings: tied, the logits were dominated by the input token's own
    # embedding and greedy decoding repeated the last prompt token whatever came before it, so
    # tests comparing tokens could not see attention or the KV cache at all.
    params = nn.utils.tree_map(lambda p: p.astype(getattr(mx, dtype)), model.parameters())
    model.update(params)
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 4.0
    if not tied:
        model.lm_head.weight = model.lm_head.weight * 4.0
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(nn.utils.tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, out / f.name)
    return out


@dataclass
class TinyLoaded:
    """The fields of parallm.models.LoadedModel that the engine reads, for a model loaded by mlx-lm."""

    model: Any
    tokenizer: Any
    context_length: int = 2048
    name: str = "tiny"
    config: dict = field(default_factory=dict)


def load_tiny(model_dir: Path) -> TinyLoaded:
    """A tiny model dir loaded with mlx-lm's own loader (not parallm's), as the engine tests use it."""
    from mlx_lm import load

    model, tokenizer = load(str(model_dir))
    return TinyLoaded(model, tokenizer, config={"vocab_size": VOCAB_SIZE})
