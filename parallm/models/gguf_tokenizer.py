"""Build a tokenizer from a GGUF file's metadata.

A GGUF file carries its tokenizer: `tokenizer.ggml.model` (the algorithm), `tokens`, `merges`,
`token_type`, the special token ids, `add_bos_token`, and the chat template. We rebuild it with the
`tokenizers` library, wrap it as a transformers PreTrainedTokenizerFast (so the chat template works
the usual way), and then as mlx-lm's TokenizerWrapper (streaming detokenizer, eos ids).

Supported: `gpt2` (byte-level BPE: SmolLM, Llama 3, Qwen2, GPT-2 style). Not yet: `llama`
(SentencePiece, used by Llama 2 / Mistral / TinyLlama GGUFs), which raises ModelLoadError.
"""
from __future__ import annotations

import logging

from parallm.models.load_errors import ModelLoadError

logger = logging.getLogger("parallm.models")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Regexes that split text before BPE, by `tokenizer.ggml.pre` (the names llama.cpp gives them).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_PRE_TOKENIZERS = ("gpt2", "default", "smollm", "llama-bpe", "llama3", "qwen2")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt2", "default"):
        return byte_level
    if pre == "smollm":  # GPT-2's regex, but every digit is its own pre-token
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    pattern = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if pattern is None:
        logger.warning("GGUF pre-tokenizer %r is not known to parallm (known: %s); using GPT-2's. "
                       "Tokenization may differ from the original model.", pre,
                       ", ".join(SUPPORTED_PRE_TOKENIZERS))
        return byte_level
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _as_int(value) -> int | None:
    """Metadata scalars come from mx.load as 0-d mx.arrays; from our header reader as ints."""
    if value is None:
        return None
    return int(value.item()) if hasattr(value, "item") else int(value)


def _as_list(value) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def tokenizer_from_gguf_metadata(metadata: dict, *, model_max_length: int | None = None,
                                 source: str = "GGUF file"):
    """A TokenizerWrapper equivalent to the one the GGUF was made from."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"{source}: tokenizer type {kind!r} is not supported yet. Accepted: 'gpt2' (byte-level "
            f"BPE, as in SmolLM2, Llama 3, Qwen2 GGUFs). For other models use an mlx-lm directory "
            f"or a Hugging Face repo id.")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    types = _as_list(metadata.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "gpt2")))
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> ...) are special: matched before BPE, skipped when asked to.
    # User-defined ones are matched whole but are ordinary text.
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])

    def token_at(key: str) -> str | None:
        i = _as_int(metadata.get(key))
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
    add_bos = bool(_as_int(metadata.get("tokenizer.ggml.add_bos_token", 0)))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos,
        unk_token=token_at("tokenizer.ggml.unknown_token_id"),
        pad_token=token_at("tokenizer.ggml.padding_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length or int(1e30),
    )
    return TokenizerWrapper(hf, detokenizer_class=BPEStreamingDetokenizer)
