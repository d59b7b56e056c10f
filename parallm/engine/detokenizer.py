"""Incremental detokenization: token ids in, final text out, correct UTF-8 across tokens.

Two strategies, chosen once per tokenizer by `TokenDecoder`:
- byte table (byte-level BPE: GPT-2 / Llama-3 / SmolLM2 style): every token id maps to the
  exact bytes it contributes; a sequence feeds those bytes to an incremental UTF-8 decoder that
  holds an incomplete character back (at most 3 bytes). O(1) per token, no tokenizer call.
- window (anything else, e.g. SentencePiece): vLLM's prefix/read-offset scheme. Decode a short
  window of recent tokens with and without the new ones and emit the difference once it no longer
  ends in U+FFFD. Uses only `tokenizer.decode`, so it inherits the tokenizer's own rules
  (SentencePiece's leading-space handling, byte fallback, cleanup of spaces).

Build one `TokenDecoder` per tokenizer (it owns the byte table) and one `IncrementalDetokenizer`
per sequence. `IncrementalDetokenizer(tokenizer)` also works: it caches the TokenDecoder on the
tokenizer object, so the table is built once per tokenizer, not per sequence.
"""
from __future__ import annotations

import codecs
from typing import Optional

_CACHE_ATTR = "_parallm_token_decoder"


def _unwrap(tokenizer):
    """mlx-lm's TokenizerWrapper -> the Hugging Face tokenizer it wraps."""
    try:
        from mlx_lm.tokenizer_utils import TokenizerWrapper
    except ImportError:  # pragma: no cover - mlx_lm is a dependency
        return tokenizer
    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the other 68
    bytes to chr(256 + n) in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + n)] = b
            n += 1
    return table


def _is_byte_level(hf_tokenizer) -> bool:
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(hf_tokenizer, "clean_up_tokenization_spaces", False):
        return False  # cleanup rewrites text across tokens: only the window strategy matches it
    decoder = backend.decoder
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


def _special_ids(hf_tokenizer) -> frozenset[int]:
    """Ids that decode(skip_special_tokens=True) drops: the declared special tokens and every
    added token flagged special (a GGUF's control tokens are flagged, not declared)."""
    ids = set(getattr(hf_tokenizer, "all_special_ids", ()) or ())
    for token_id, added in (getattr(hf_tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(token_id)
    return frozenset(ids)


def render_bytes(data: bytes) -> str:
    """Text for a token's bytes; bytes that are not valid UTF-8 alone are written the way
    OpenAI writes them in logprobs: 'bytes:\\xe6\\x88'."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class TokenDecoder:
    """Per-tokenizer decoding data: the byte table when the tokenizer is byte-level BPE."""

    def __init__(self, tokenizer, strategy: str = "auto"):
        """strategy: "auto" (byte table when the tokenizer is byte-level BPE, else window) or
        "window" (always decode through the tokenizer)."""
        if strategy not in ("auto", "window"):
            raise ValueError(f"strategy must be 'auto' or 'window', got {strategy!r}")
        self.tokenizer = _unwrap(tokenizer)
        self.special_ids = _special_ids(self.tokenizer)
        self.token_bytes: Optional[list[bytes]] = None
        if strategy == "auto" and _is_byte_level(self.tokenizer):
            self.token_bytes = self._build_byte_table()

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "TokenDecoder":
        """The cached TokenDecoder of this tokenizer, built on first use."""
        if isinstance(tokenizer, TokenDecoder):
            return tokenizer
        target = _unwrap(tokenizer)
        cached = getattr(target, _CACHE_ATTR, None)
        if cached is None:
            cached = cls(target)
            try:
                setattr(target, _CACHE_ATTR, cached)
            except AttributeError:
                pass  # an object that refuses attributes: callers pay the build each time
        return cached

    def _build_byte_table(self) -> Optional[list[bytes]]:
        tok = self.tokenizer
        unicode_to_byte = _gpt2_unicode_to_byte()
        added = {i: t.content for i, t in getattr(tok, "added_tokens_decoder", {}).items()}
        size = len(tok)
        pieces = tok.convert_ids_to_tokens(list(range(size)))
        table: list[bytes] = []
        for token_id, piece in enumerate(pieces):
            if token_id in added:
                table.append(added[token_id].encode("utf-8"))
            elif piece is None:
                table.append(b"")
            else:
                try:
                    table.append(bytes(unicode_to_byte[c] for c in piece))
                except KeyError:
                    return None  # not pure byte-level after all: use the window strategy
        return table

    def token_text(self, token_id: int) -> str:
        """One token rendered alone (for logprobs): its text, or 'bytes:\\xNN' when its bytes are
        not valid UTF-8 by themselves."""
        return render_bytes(self.token_raw(token_id))

    def token_raw(self, token_id: int) -> bytes:
        """One token's own bytes: from the byte-level table, a SentencePiece byte piece
        ('<0xF0>'), or else the UTF-8 of its decoded text."""
        if self.token_bytes is not None and 0 <= token_id < len(self.token_bytes):
            return self.token_bytes[token_id]
        text = self.tokenizer.decode([token_id])
        if "\ufffd" in text:
            raw = self._sentencepiece_byte(token_id)
            if raw is not None:
                return raw
        return text.encode("utf-8", errors="replace")

    def _sentencepiece_byte(self, token_id: int) -> Optional[bytes]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return None


def token_text(tokenizer, token_id: int) -> str:
    """The decoded piece of one token id, for logprobs (see TokenDecoder.token_text)."""
    return TokenDecoder.for_tokenizer(tokenizer).token_text(token_id)


class IncrementalDetokenizer:
    """One sequence's detokenizer. The concatenation of every `add` and the final `flush`
    equals `tokenizer.decode(ids, skip_special_tokens=...)` of all the ids added."""

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self.decoder = TokenDecoder.for_tokenizer(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # window strategy: text of token_ids[prefix:read] has been emitted already
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that became final ('' while a character is incomplete)."""
        self.token_ids.append(token_id)
        table = self.decoder.token_bytes
        if table is not None:
            if self.skip_special_tokens and token_id in self.decoder.special_ids:
                return ""
            data = table[token_id] if 0 <= token_id < len(table) else b""
            return self._utf8.decode(data, final=False)
        return self._add_windowed()

    def flush(self) -> str:
        """Release whatever is held back at the end of the sequence (invalid bytes become U+FFFD,
        as tokenizer.decode writes them)."""
        if self.decoder.token_bytes is not None:
            return self._utf8.decode(b"", final=True)
        if self._read >= len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self._prefix:self._read])
        full_text = self._decode(self.token_ids[self._prefix:])
        self._prefix = self._read = len(self.token_ids)
        return full_text[len(prefix_text):]

    def _decode(self, ids: list[int]) -> str:
        return self.decoder.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _add_windowed(self) -> str:
        prefix_text = self._decode(self.token_ids[self._prefix:self._read])
        full_text = self._decode(self.token_ids[self._prefix:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            # The tokens just emitted stay as left context of the next decode, so it sees spaces
            # and merges the way a full decode would (SentencePiece drops a leading space at the
            # start of a decode).
            self._prefix, self._read = self._read, len(self.token_ids)
            return full_text[len(prefix_text):]
        return ""

