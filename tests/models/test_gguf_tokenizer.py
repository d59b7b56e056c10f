"""The tokenizer rebuilt from the default model's GGUF metadata tokenizes exactly like SmolLM2's
real tokenizer (tests/assets/tok), including special tokens and the chat template."""
from __future__ import annotations

import pytest

from conftest import TOKENIZER_DIR

TEXTS = [
    "Hello world!",
    "What is the capital of France?",
    "  two leading spaces\n\ttab, newline\r\n and 12345 digits 3.14159, 1,000,000",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>parallm<file_sep>main.py",
    "don't I'll WE'RE you've",
    "émojis 🤖🚀, 日本語のテキスト, Ελληνικά, русский",
    "def f(x):\n    return x ** 2  # comment\n",
    "",
    " ",
    "\n\n\n",
]


@pytest.fixture(scope="module")
def tokenizers():
    import mlx.core as mx
    from transformers import AutoTokenizer

    from parallm.models.gguf_tokenizer import tokenizer_from_gguf_metadata
    from parallm.models.loader import default_model_path

    _, metadata = mx.load(str(default_model_path()), return_metadata=True)
    return tokenizer_from_gguf_metadata(metadata), AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.mark.parametrize("text", TEXTS)
def test_encodes_and_decodes_like_the_real_tokenizer(text, tokenizers):
    ours, real = tokenizers
    ids = ours.encode(text)
    assert ids == real.encode(text)
    assert ours.decode(ids) == real.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == real.decode(ids, skip_special_tokens=True)


def test_special_tokens_and_chat_template_match(tokenizers):
    ours, real = tokenizers
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert ours.eos_token_id == real.eos_token_id == 2 and ours.eos_token_ids == {2}
    assert sorted(ours.all_special_ids) == sorted(real.all_special_ids)
    assert len(ours.get_vocab()) == len(real.get_vocab())
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == real.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "You are a helpful AI assistant named SmolLM" in text
    assert ours.encode(text) == real.encode(text)


def test_streaming_detokenizer_reassembles_text(tokenizers):
    ours, _ = tokenizers
    text = "Paris is the capital of France. 🇫🇷 Ça va ?"
    detok = ours.detokenizer
    detok.reset()
    for t in ours.encode(text):
        detok.add_token(t)
    detok.finalize()
    assert detok.text == text
