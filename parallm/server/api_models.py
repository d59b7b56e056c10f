"""OpenAI-shaped request and response models, validated at the edge.

Requests ignore unknown fields, as the OpenAI API does; every known field is range-checked here so
that the serving layer only ever sees values the engine accepts. Response models are plain data
(the serving layer fills them; FastAPI serializes them).
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from parallm.server.error_responses import printable
from parallm.server.json_checks import json_value_problem

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 1000  # per stop string: the stop matcher holds back up to this much streamed text
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1
MAX_INT32 = 2**31 - 1  # token counts and ids: far past any context or vocabulary
MAX_MESSAGES = 2048  # OpenAI's own limit
MAX_TOOLS = 128  # OpenAI's own limit
MAX_LIST_ITEMS = 1024  # logit_bias entries, stop_token_ids


class _Request(BaseModel):
    # OpenAI ignores fields it does not know; so do we (clients send vendor extras all the time).
    # NaN and Infinity (which Python's json reads) are refused: no sampling math or response may see one.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """The fields chat and completions requests share."""

    model: str = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_INT32)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=MAX_LIST_ITEMS)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # vLLM extras
    top_k: int = Field(0, ge=-1, le=MAX_INT32)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = Field(None, max_length=MAX_LIST_ITEMS)

    @model_validator(mode="before")
    @classmethod
    def _valid_json_values(cls, data):
        rest = {k: v for k, v in data.items() if k != "prompt"} if isinstance(data, dict) else data
        problem = json_value_problem(rest)  # `prompt` has a validator of its own, faster
        if problem is not None:
            raise ValueError(problem)
        return data

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are accepted, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        longest = max((len(s) for s in stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"stop sequences may be at most {MAX_STOP_CHARS} characters long, got one of {longest}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v):
        for key, bias in (v or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids (integers as strings), got {key!r}") from None
            if token_id < 0:
                raise ValueError(f"logit_bias key {key!r} is not a valid token id (must be >= 0)")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias} for token {key}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, v):
        if v is not None and any(not 0 <= t <= MAX_INT32 for t in v):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# ---- chat ---------------------------------------------------------------------------------------

class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class FunctionSpec(_Request):
    name: str = Field(..., min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class ToolSpec(_Request):
    type: Literal["function"]
    function: FunctionSpec


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextContentPart]]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    # an earlier turn's calls, sent back by the client as history; the chat template renders them
    tool_calls: Optional[list[dict[str, Any]]] = None

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, v):
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part {i} has type {kind!r}; only 'text' parts are supported")
        return v

    @model_validator(mode="after")
    def _content_required(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM extra
    chat_template_kwargs: Optional[dict[str, Any]] = None  # vLLM extra
    # vLLM extra, as is chat_template_kwargs["chat_template"]: a client's own template runs only
    # with --allow-client-chat-template, in a sandbox process (template_sandbox.py)
    chat_template: Optional[str] = None
    # Tools reach the chat template (a template that knows them tells the model); what the model
    # writes comes back as message content: there is no tool-call parser, so nothing can be forced.
    tools: Optional[list[ToolSpec]] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    response_format: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("tool_choice")
    @classmethod
    def _no_forced_tool_calls(cls, v):
        if v is not None and v not in ("none", "auto"):
            shown = v if isinstance(v, str) else "a named function"
            raise ValueError(f"tool_choice {shown!r} is not supported: parallm does not parse or force tool "
                             "calls; use 'auto' or 'none' (the model's text comes back as content)")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        kind = v.get("type") if isinstance(v, dict) else None
        if v is not None and kind != "text":
            raise ValueError(f"response_format type {kind!r} is not supported: parallm has no constrained "
                             "decoding; only {'type': 'text'} is accepted (ask for JSON in the prompt instead)")
        return v

    def template_tools(self) -> Optional[list[dict[str, Any]]]:
        """The tools to hand the chat template: none when there are none or tool_choice is 'none'."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def requested_max_tokens(self) -> Optional[int]:
        # max_completion_tokens is the newer name; it wins when both are given.
        return self.max_completion_tokens or self.max_tokens


# ---- completions --------------------------------------------------------------------------------

class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)
    suffix: Optional[str] = None

    @field_validator("prompt", mode="plain", json_schema_input_type=Union[str, list[str], list[int], list[list[int]]])
    @classmethod
    def _prompt_shape(cls, v):
        # By hand, with C-speed passes (set, min, max, join): pydantic's union took 3-6 s of the event
        # loop over an 8 MB body of token ids. (The body walk skips `prompt`: strings are checked here.)
        if isinstance(v, str) or isinstance(v, list) and v and set(map(type, v)) == {str}:
            text = v if isinstance(v, str) else "".join(v)
            if text != printable(text):
                raise ValueError("the prompt holds a lone UTF-16 surrogate (such as \\ud800); "
                                 "text must be valid Unicode")
            return v
        nested = isinstance(v, list) and bool(v) and set(map(type, v)) == {list}
        ids = list(itertools.chain.from_iterable(v)) if nested else v
        if not isinstance(v, list) or not v or (nested and not all(v)) or set(map(type, ids)) != {int}:
            raise ValueError("prompt must be a string, a list of strings, a non-empty list of token ids, or a list "
                             "of such lists")
        if min(ids) < 0 or max(ids) > MAX_INT32:
            raise ValueError("prompt token ids must be non-negative and below 2^31")
        return v

    @model_validator(mode="after")
    def _check_unsupported(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


# ---- responses ----------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str = ""


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


class ChatDelta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[UsageInfo] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "parallm"
    root: Optional[str] = None  # base model: its name; adapter: its directory (vLLM)
    parent: Optional[str] = None  # adapter: the base model it runs on


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody
