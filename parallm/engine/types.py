"""Objects that cross the server -> engine boundary and come back.

The server builds an `EngineRequest` (already validated and tokenized) and reads back an
async stream of `RequestOutput`. Nothing here imports mlx, fastapi or pydantic.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional


CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")


@dataclass(frozen=True)
class Constraint:
    """What a row's output must match, enforced by masking the logits at every step (the engine
    compiles it with llguidance; engine/constraints.py). `spec` by kind: "json_schema" the schema
    as JSON text; "json_object" unused (any JSON object); "regex" the pattern; "grammar" a Lark
    grammar in llguidance's dialect (which may embed JSON schemas with %json); "choice" a JSON
    list of the allowed strings."""

    kind: str
    spec: str = ""
    # The constraint starts once the output so far ends with this text (a reasoning model's
    # "</think>"); None: from the first generated token.
    start_after: Optional[str] = None


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Defaults follow the OpenAI API where it has one."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # 1.0 is off
    top_k: int = 0  # 0 is off
    min_p: float = 0.0  # 0.0 is off
    repetition_penalty: float = 1.0  # 1.0 is off (multiplicative, as in vLLM/HF)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, bias) pairs
    stop: tuple[str, ...] = ()  # stop strings; never emitted, even in part
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids besides the model's EOS ids
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # how many alternatives per position (needs logprobs)
    n: int = 1  # choices that share the prompt's prefill
    seed: Optional[int] = None  # a seeded choice gives the same tokens whatever the batch holds
    constraint: Optional[Constraint] = None  # structured output / forced tool calls; None: free text


@dataclass
class EngineRequest:
    """A validated, tokenized request. `model` names a served base model; `adapter` a LoRA adapter."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    model: str = ""
    adapter: Optional[str] = None
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class TopLogprob:
    """`token` is the token's text alone, or 'bytes:\\xNN..' when its bytes are not UTF-8 by
    themselves (OpenAI's spelling); `raw` is its bytes (None: the UTF-8 of `token`)."""

    token_id: int
    token: str
    logprob: float
    raw: Optional[bytes] = None


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and, when asked for, the top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)
    raw: Optional[bytes] = None  # as TopLogprob.raw


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestTimes:
    """Engine-side timestamps (time.monotonic()) so metrics see real queue and prefill time."""

    arrival: float = 0.0
    first_scheduled: Optional[float] = None
    first_token: Optional[float] = None
    finished: Optional[float] = None


@dataclass
class RequestOutput:
    """One increment of one choice of a request.

    `text` and `token_ids` are the new pieces since the last output of this choice (deltas).
    `finish_reason` is set on the last output of a choice: "stop", "length" or "abort".
    `finished` is True on the very last output of the whole request (all n choices done);
    `usage` and `times` are filled on that one.
    """

    request_id: str
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None  # the stop string or stop token id that ended the choice
    finished: bool = False
    usage: Optional[Usage] = None
    times: Optional[RequestTimes] = None


# when AsyncEngine hands a step's outputs to the event loop (EngineConfig.output_handoff)
STEP_PHASES = ("schedule", "build", "dispatch", "wait", "update")


@dataclass
class EngineStats:
    """A snapshot for /health and /metrics."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1 of the KV budget
    kv_bytes_used: int = 0
    kv_bytes_budget: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # prompt tokens found
    num_preemptions: int = 0
    steps: int = 0
    # Where the engine's time goes, cumulative since start (warm-up excluded). busy: wall time
    # inside Engine.step; idle: the worker blocked with nothing to run. Between two snapshots,
    # decode_rows / steps is how full the batch ran and idle / wall how often it sat empty: with
    # throughput, these tell an engine that is slow from one that is starved of requests.
    busy_seconds: float = 0.0
    idle_seconds: float = 0.0
    decode_rows: int = 0  # decode rows run (one sampled token each)
    batched_tokens: int = 0  # prefill tokens plus decode rows, over all steps
    # steps that ran a prefill pass: each is a whole extra forward pass on top of the decode pass,
    # so requests admitted a few at a time, step after step, cost more than the same admitted at once
    prefill_steps: int = 0
    # busy_seconds split by phase of the step (STEP_PHASES), plus "emit": the worker handing a
    # step's outputs to the event loop. Read per step against a baseline, they say which part of a
    # step grew: "dispatch" is the time inside mx.async_eval (the backend encoding the step's
    # kernels, without the GIL, plus getting the GIL back), "wait" the read-back of a step's tokens.
    phase_seconds: dict = field(default_factory=dict)


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one choice as one. The inputs are not changed; one output is
    returned as it is."""
    if len(outputs) == 1:
        return outputs[0]
    first = outputs[0]
    logprobs = [lp for o in outputs for lp in (o.logprobs or ())]

    def latest(field: str):
        return next((v for o in reversed(outputs) if (v := getattr(o, field)) is not None), None)

    return RequestOutput(
        request_id=first.request_id, index=first.index, text="".join(o.text for o in outputs),
        token_ids=[t for o in outputs for t in o.token_ids],
        logprobs=logprobs if any(o.logprobs is not None for o in outputs) else None,
        finish_reason=latest("finish_reason"), stop_reason=latest("stop_reason"),
        finished=any(o.finished for o in outputs), usage=latest("usage"), times=latest("times"))


@dataclass(frozen=True)
class AdapterInfo:
    """What /v1/models and the admin API show for one adapter."""

    name: str
    parent: str  # the base model it runs on
    path: str
    fine_tune_type: str  # "lora" | "dora"
    rank: int
    scale: float
    num_layers: int
    memory_bytes: int
    created: int  # unix seconds
    slot: int
    active_requests: int
    unloading: bool  # unloaded; kept only for requests in flight
