"""Engine outputs -> OpenAI response objects: choices, logprobs, usage."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from parallm.engine.types import RequestOutput, TokenLogprob, Usage
from parallm.server.api_models import (ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs,
                                     PromptTokensDetails, UsageInfo)


def usage_info(usages: list[Usage]) -> UsageInfo:
    """Sum the usage of the engine requests behind one HTTP response (one per prompt)."""
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cached = sum(u.cached_tokens for u in usages)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


LOGPROB_FLOOR = -9999.0  # what OpenAI (and vLLM) send for a token of probability 0


def finite_logprob(x: float) -> float:
    """A logprob JSON can carry: -inf (and NaN, from a broken adapter's logits) become LOGPROB_FLOOR,
    +inf 0. Python's json would write NaN and Infinity, which no JSON parser reads."""
    if math.isfinite(x):
        return x
    return 0.0 if x > 0 else LOGPROB_FLOOR


def _bytes(t) -> list[int]:
    """A token's own bytes (a lone byte of an emoji stays that byte), else its text's UTF-8."""
    return list(t.raw) if t.raw is not None else list(t.token.encode("utf-8", errors="replace"))


def chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=t.token, logprob=finite_logprob(t.logprob), bytes=_bytes(t),
                         top_logprobs=[ChatTopLogprob(token=a.token, logprob=finite_logprob(a.logprob), bytes=_bytes(a))
                                       for a in t.top])
        for t in items])


def completion_logprobs(items: list[TokenLogprob], text_offset: int) -> CompletionLogprobs:
    """`text_offset` is where the first of these tokens starts in the choice's text."""
    out = CompletionLogprobs()
    for t in items:
        out.tokens.append(t.token)
        out.token_logprobs.append(finite_logprob(t.logprob))
        out.top_logprobs.append({a.token: finite_logprob(a.logprob) for a in t.top} or None)
        out.text_offset.append(text_offset)
        text_offset += len(t.token)
    return out


@dataclass
class ChoiceAccumulator:
    """Everything one choice produced, for a non-streaming response."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.text)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.finish_reason:
            self.finish_reason = out.finish_reason


@dataclass
class Collected:
    """The outputs of all engine requests behind one response, keyed by response choice index."""

    choices: dict[int, ChoiceAccumulator] = field(default_factory=dict)
    usages: list[Usage] = field(default_factory=list)

    def add(self, choice_index: int, out: RequestOutput) -> None:
        self.choices.setdefault(choice_index, ChoiceAccumulator()).add(out)
        if out.finished and out.usage is not None:
            self.usages.append(out.usage)
