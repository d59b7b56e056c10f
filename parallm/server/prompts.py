"""Prompts -> token ids, through the model's own tokenizer and chat template (transformers).

A chat template sent by the client (`chat_template`, or `chat_template_kwargs["chat_template"]`)
never renders here: serving.py refuses it, or (with --allow-client-chat-template) has
template_sandbox.py render it in another process and hands the text to `text_prompt`.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

from parallm.engine.errors import EngineError, InvalidRequest
from parallm.server.api_models import ChatCompletionRequest


@dataclass
class Prompt:
    """One prompt, tokenized. `text` is the prompt as text (for `echo`), when known."""

    token_ids: list[int]
    text: Optional[str] = None


class PromptTooLarge(EngineError):
    """A prompt whose text is too long to fit the context whatever it tokenizes to: refused untokenized."""

    code = "context_length_exceeded"

    def __init__(self, size: int, limit: int, context_length: int, longest: int, param: str):
        super().__init__(
            f"The prompt is {size} bytes long; this model's context of {context_length} tokens holds at most "
            f"{limit} bytes of text ({context_length} tokens of at most {longest} bytes, its tokenizer's longest), "
            "so it could never fit. Shorten the prompt.", param=param)


def vocab_size(tokenizer: Any) -> int:
    return len(tokenizer)


_longest: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def longest_token_bytes(tokenizer: Any) -> Optional[int]:
    """The most bytes of text one token can stand for, or None if the tokenizer cannot say. Measured
    once per tokenizer as the UTF-8 length of its longest token string, which is never less than the
    text it covers (byte-level BPE writes one byte as a 1-2 byte character, SentencePiece a space as
    the 3-byte "▁", byte fallback one byte as "<0xAB>")."""
    try:
        return _longest[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        longest = max((len(t.encode("utf-8", "surrogatepass")) for t in tokenizer.get_vocab()), default=0) or None
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary to list: no size check
        longest = None
    try:
        _longest[tokenizer] = longest
    except TypeError:  # not weak-referenceable: measured again next time
        pass
    return longest


def check_prompt_size(tokenizer: Any, text: str, context_length: Optional[int], param: str) -> None:
    """PromptTooLarge, before any tokenizing, for text longer than the context could ever hold (the
    7.5 MB prompt that took the tokenizer 3.8 s and 285 MB only to be refused)."""
    longest = longest_token_bytes(tokenizer) if context_length else None
    if longest is None:
        return
    limit = context_length * longest
    if len(text) * 4 <= limit:  # at most 4 UTF-8 bytes a character: no need to count them
        return
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise PromptTooLarge(size, limit, context_length, longest, param)


def has_chat_template(tokenizer: Any) -> bool:
    # mlx-lm's TokenizerWrapper knows (it also counts templates it supplies itself); a bare
    # transformers tokenizer carries the template string.
    known = getattr(tokenizer, "has_chat_template", None)
    if known is not None:
        return bool(known)
    return getattr(tokenizer, "chat_template", None) is not None


def _named_templates(tokenizer: Any) -> dict:
    templates = getattr(tokenizer, "chat_template", None)
    return templates if isinstance(templates, dict) else {}


def client_template(tokenizer: Any, request: ChatCompletionRequest) -> Optional[str]:
    """The chat template the client sent, or None: none sent, or the name of one of the model's own
    (a tokenizer may carry several, e.g. "tool_use"), which renders in-process like the default."""
    sent = request.chat_template
    if sent is None:
        sent = (request.chat_template_kwargs or {}).get("chat_template")
    if sent is None:
        return None
    if not isinstance(sent, str) or not sent:
        raise InvalidRequest("chat_template must be a non-empty string.", param="chat_template")
    return None if sent in _named_templates(tokenizer) else sent


def template_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
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
    return messages


def template_kwargs(request: ChatCompletionRequest) -> dict[str, Any]:
    """What the template sees besides the messages: chat_template_kwargs and the tools."""
    extra = {k: v for k, v in (request.chat_template_kwargs or {}).items() if k != "chat_template"}
    tools = request.template_tools()
    if tools is not None:
        extra["tools"] = tools
    return extra


def sandbox_context(tokenizer: Any, request: ChatCompletionRequest) -> dict[str, Any]:
    """The variables a client's template renders with (those transformers gives a model's template)."""
    special = getattr(tokenizer, "special_tokens_map", None) or {}
    context = {k: v for k, v in special.items() if isinstance(v, str)}
    context.update(template_kwargs(request))
    context.update(messages=template_messages(request), add_generation_prompt=request.add_generation_prompt)
    return context


def chat_prompt(tokenizer: Any, request: ChatCompletionRequest, model: str,
                context_length: Optional[int] = None) -> Prompt:
    """The model's own template, rendered here (on the prompt thread), then tokenized."""
    if client_template(tokenizer, request) is not None:  # serving.py routes these to the sandbox
        raise InvalidRequest("A client's chat template never renders in the server process.", param="chat_template")
    if not has_chat_template(tokenizer):
        raise InvalidRequest(
            f"The model '{model}' has no chat template, so /v1/chat/completions cannot format messages "
            "for it. Use /v1/completions with a plain prompt instead.", param="messages")
    extra = template_kwargs(request)
    name = request.chat_template or (request.chat_template_kwargs or {}).get("chat_template")
    if name is not None:
        extra["chat_template"] = name  # one of the model's own, by name
    try:
        text = tokenizer.apply_chat_template(
            template_messages(request), tokenize=False, add_generation_prompt=request.add_generation_prompt, **extra)
    except Exception as e:  # jinja's raise_exception and friends: the messages broke a template rule
        raise InvalidRequest(f"The chat template rejected the messages: {e}", param="messages") from None
    return text_prompt(tokenizer, text, context_length)


def text_prompt(tokenizer: Any, text: str, context_length: Optional[int] = None) -> Prompt:
    """A rendered chat prompt, tokenized. The template already holds any BOS token; adding special
    tokens again would double it."""
    if not isinstance(text, str):
        raise InvalidRequest("The chat template did not produce text.", param="chat_template_kwargs")
    check_prompt_size(tokenizer, text, context_length, "messages")
    return Prompt(token_ids=list(tokenizer.encode(text, add_special_tokens=False)), text=text)


def completion_prompt(tokenizer: Any, prompt: Union[str, list[int]], context_length: Optional[int] = None) -> Prompt:
    if isinstance(prompt, str):
        check_prompt_size(tokenizer, prompt, context_length, "prompt")
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
