"""ChoiceOutput: turns one choice's sampled tokens into text deltas and decides when it stops.

Stops, in order of precedence for a token: the model's EOS ids (unless ignore_eos), the request's
stop_token_ids, a stop string appearing in the text (text from the stop string on is never sent,
not even in part: a tail that could still become a stop string is held back), max_tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from parallm.engine.detokenizer import IncrementalDetokenizer
from parallm.engine.stop import StopMatcher
from parallm.engine.types import SamplingParams


@dataclass
class ChoiceDelta:
    text: str
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None


class ChoiceOutput:
    def __init__(self, params: SamplingParams, tokenizer, eos_ids: set[int]):
        self.params = params
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(params.stop)
        self._stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self.num_tokens = 0
        self.finish_reason: Optional[str] = None

    def add(self, token_id: int) -> ChoiceDelta:
        self.num_tokens += 1
        if token_id in self._stop_ids:  # the stop token's own text is not part of the answer
            return self._end("stop", token_id, "")
        result = self._stops.feed(self._detok.add(token_id))
        if result.stopped:
            return self._finish("stop", result.stop, result.emit)
        if self.num_tokens >= self.params.max_tokens:
            return self._end("length", None, result.emit)
        return ChoiceDelta(result.emit)

    def _end(self, reason: str, stop_reason, text: str) -> ChoiceDelta:
        """Finish, releasing what the detokenizer and the stop matcher still hold (unless the
        held tail turns out to complete a stop string)."""
        tail = self._stops.feed(self._detok.flush())
        if tail.stopped:
            return self._finish("stop", tail.stop, text + tail.emit)
        return self._finish(reason, stop_reason, text + tail.emit + self._stops.flush())

    def _finish(self, reason: str, stop_reason, text: str) -> ChoiceDelta:
        self.finish_reason = reason
        return ChoiceDelta(text, reason, stop_reason)
