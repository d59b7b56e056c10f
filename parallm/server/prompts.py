"""Prompts -> token ids, through the model's own tokenizer and chat template (transformers)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from parallm.engine.errors import InvalidRequest
from parallm.server.protocol import ChatCompletionRequest


@dataclass
class Prompt:
    """One prompt, tokenized. `text` is the prompt as text (for `echo`), when known."""

    token_ids: list[int]
    text: Optional[str] = None


def vocab_size(tokenizer: Any) -> int:
    return len(tokenizer)


def has_chat_template(tokenizer: Any) -> bool:
    # mlx-lm's TokenizerWrapper knows (it also counts templates it supplies itself); a bare
    # transformers tokenizer carries the template string.
    known = getattr(tokenizer, "has_chat_template", None)
    if known is not None:
        return bool(known)
    return getattr(tokenizer, "chat_template", None) is not None


def chat_prompt(tokenizer: Any, request: ChatCompletionRequest, model: str) -> Prompt:
    if not has_chat_template(tokenizer):
        raise InvalidRequest(
            f"The model '{model}' has no chat template, so /v1/chat/completions cannot format messages "
            "for it. Use /v1/completions with a plain prompt instead.", param="messages")
    messages = []
    for m in request.messages:
        message: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = m.tool_calls
        messages.append(message)
    extra = dict(request.chat_template_kwargs or {})
    tools = request.template_tools()
    if tools is not None:
        extra["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=request.add_generation_prompt, **extra)
    except Exception as e:  # jinja's raise_exception and friends: the messages broke a template rule
        raise InvalidRequest(f"The chat template rejected the messages: {e}", param="messages") from None
    # The template already holds any BOS token; adding special tokens again would double it.
    return Prompt(token_ids=list(tokenizer.encode(text, add_special_tokens=False)), text=text)


def completion_prompt(tokenizer: Any, prompt: Union[str, list[int]]) -> Prompt:
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt))
        if not ids:
            raise InvalidRequest("The prompt is empty after tokenization.", param="prompt")
        return Prompt(token_ids=ids, text=prompt)
    check_token_ids(vocab_size(tokenizer), prompt, "prompt")
    return Prompt(token_ids=list(prompt), text=None)


def prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    if prompt.text is None:
        prompt.text = tokenizer.decode(prompt.token_ids)
    return prompt.text


def check_token_ids(size: int, ids, param: str) -> None:
    """A 400 naming the ids outside a vocabulary of `size` (prompt ids, stop_token_ids)."""
    bad = [t for t in ids if not 0 <= t < size]
    if bad:
        raise InvalidRequest(f"{param} holds token ids outside the vocabulary (0..{size - 1}): {bad[:5]}",
                             param=param)
