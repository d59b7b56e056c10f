"""ChoiceOutput: turns one choice's sampled tokens into text deltas and decides when it stops.

Stops, in order of precedence for a token: the model's EOS ids (unless ignore_eos), the request's
stop_token_ids, a stop string appearing in the text (text from the stop string on is never sent,
not even in part: a tail that could still become a stop string is held back), max_tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from parallm.engine.types import SamplingParams


class _WindowDetokenizer:
    """Minimal incremental detokenizer (decode a sliding window, hold back an incomplete UTF-8
    tail). Used only until parallm.engine.detokenizer is available."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prev = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = max(self._read - 4, 0), len(self._ids)
        # re-base: the new window's already-emitted text is decode(ids[prefix:read])
        return text[len(prev):]

    def flush(self) -> str:
        return ""


def make_detokenizer(tokenizer):
    try:
        from parallm.engine.detokenizer import IncrementalDetokenizer  # the sampling teammate's
    except ImportError:
        return _WindowDetokenizer(tokenizer)
    return IncrementalDetokenizer(tokenizer)


@dataclass
class ChoiceDelta:
    text: str
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None


class ChoiceOutput:
    def __init__(self, params: SamplingParams, tokenizer, eos_ids: set[int]):
        self.params = params
        self._detok = make_detokenizer(tokenizer)
        self._stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self._held = ""  # text not sent yet because it may begin a stop string
        self.num_tokens = 0
        self.finish_reason: Optional[str] = None

    def add(self, token_id: int) -> ChoiceDelta:
        self.num_tokens += 1
        if token_id in self._stop_ids:
            return self._finish("stop", token_id, self._held + self._detok.flush())
        text = self._held + self._detok.add(token_id)
        self._held = ""
        for stop in self.params.stop:
            at = text.find(stop)
            if at >= 0:
                return self._finish("stop", stop, text[:at])
        if self.num_tokens >= self.params.max_tokens:
            return self._finish("length", None, text + self._detok.flush())
        keep = _partial_stop_len(text, self.params.stop)
        if keep:
            text, self._held = text[:-keep], text[-keep:]
        return ChoiceDelta(text)

    def _finish(self, reason: str, stop_reason, text: str) -> ChoiceDelta:
        self.finish_reason = reason
        return ChoiceDelta(text, reason, stop_reason)


def _partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
