"""IncrementalDetokenizer: streamed text equals tokenizer.decode of all ids, UTF-8 kept whole."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from parallm.engine.detokenizer import IncrementalDetokenizer, TokenDecoder, render_bytes, token_text

TOK_DIR = Path(__file__).resolve().parent.parent / "assets" / "tok"

SAMPLES = [
    "Hello, world! Héllo wörld, naïve café, crème brûlée.",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 and math ∑∫√ ≤ ≥.",
    "  leading spaces,\ttabs\nnew lines\n\n  and   runs   of spaces  ",
    "Mixed: Ελληνικά, русский, עברית, العربية, हिन्दी 123 4567.",
    "<|im_start|>assistant\nSpecial tokens inside text<|im_end|>",
    " a leading space is kept, as decode keeps it",
    "control bytes \x00 \x01 \x7f survive",
]


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(TOK_DIR))


@pytest.fixture(scope="module")
def spm_like():
    """A small SentencePiece-style tokenizer (Metaspace '▁' + byte fallback), trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"]
                                  + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(SAMPLES[:3] * 10 + ["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def stream(tokenizer_or_decoder, ids, **kwargs) -> list[str]:
    det = IncrementalDetokenizer(tokenizer_or_decoder, **kwargs)
    return [det.add(i) for i in ids] + [det.flush()]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces = [w for s in SAMPLES for w in s.split(" ")] + ["😀", "日本", "é", "ü", " ", "\n", "🇫🇷", "👍🏽"]
    return ["".join(rng.choice(pieces) + rng.choice(["", " ", ""]) for _ in range(rng.randint(1, 30)))
            for _ in range(n)]


def test_smollm2_is_decoded_from_the_byte_table(smol):
    assert TokenDecoder(smol).token_bytes is not None


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_byte_level_stream_equals_decode_without_replacement_chars(smol, skip_special_tokens):
    for text in SAMPLES + random_texts(40, seed=1):
        ids = smol.encode(text, add_special_tokens=False)
        parts = stream(smol, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(parts) == smol.decode(ids, skip_special_tokens=skip_special_tokens), text
        assert not any("\ufffd" in p for p in parts), (text, parts)


def test_incomplete_characters_wait_for_their_last_byte(smol):
    ids = smol.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    parts = stream(smol, ids)
    assert parts[:-2] == [""] * (len(ids) - 1) and parts[-2] == "😀" and parts[-1] == ""


def test_random_ids_match_decode_even_when_invalid_utf8(smol):
    rng = random.Random(3)
    for _ in range(30):
        ids = [rng.randrange(len(smol)) for _ in range(rng.randint(1, 40))]
        assert "".join(stream(smol, ids)) == smol.decode(ids, skip_special_tokens=True)


def test_mlx_lm_tokenizer_wrapper_is_accepted(tiny_model_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    wrapper = load_tokenizer(tiny_model_dir)
    ids = wrapper.encode("Wrapped 😀 text", add_special_tokens=False)
    assert "".join(stream(wrapper, ids)) == "Wrapped 😀 text"


def test_window_strategy_matches_decode_for_sentencepiece_style(spm_like):
    decoder = TokenDecoder(spm_like)
    assert decoder.token_bytes is None  # not byte-level: the window strategy is used
    for text in SAMPLES + random_texts(40, seed=2):
        ids = spm_like.encode(text, add_special_tokens=False)
        parts = stream(decoder, ids, skip_special_tokens=False)
        assert "".join(parts) == spm_like.decode(ids, skip_special_tokens=False), text
        assert not any("\ufffd" in p for p in parts), (text, parts)


def test_window_strategy_on_byte_level_tokenizer_agrees(smol):
    forced = TokenDecoder(smol, strategy="window")
    for text in SAMPLES + random_texts(20, seed=4):
        ids = smol.encode(text, add_special_tokens=False)
        assert "".join(stream(forced, ids)) == smol.decode(ids, skip_special_tokens=True)


def test_token_text_renders_partial_utf8_as_bytes(smol, spm_like):
    ids = smol.encode("é😀", add_special_tokens=False)
    rendered = [token_text(smol, i) for i in ids]
    assert any(r.startswith("bytes:\\x") for r in rendered)
    for r in rendered:
        assert "\ufffd" not in r
    assert token_text(smol, smol.encode(" hello", add_special_tokens=False)[0]) == " hello"
    byte_id = spm_like.convert_tokens_to_ids("<0xF0>")
    assert token_text(spm_like, byte_id) == "bytes:\\xf0"
    assert render_bytes(b"\xe6\x88") == "bytes:\\xe6\\x88"
    assert render_bytes("ok".encode()) == "ok"


def test_added_special_tokens_not_declared_are_skipped_like_decode():
    """GGUF-built tokenizers flag control tokens special without declaring them (all_special_ids
    stays empty); decode(skip_special_tokens=True) still drops them, and so must we."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer.from_file(str(TOK_DIR / "tokenizer.json"))
    backend.add_special_tokens([AddedToken("<|ctl|>", special=True, normalized=False)])
    backend.add_tokens([AddedToken("<|user-def|>", special=False, normalized=False)])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
    assert TokenDecoder(hf).token_bytes is not None
    ids = hf.encode("a <|ctl|> b <|user-def|> c <|im_end|> é😀", add_special_tokens=False)
    for skip in (True, False):
        assert "".join(stream(hf, ids, skip_special_tokens=skip)) == hf.decode(ids, skip_special_tokens=skip)
