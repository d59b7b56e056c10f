"""A fake engine and a small FastAPI app that serves through it, for the ops tests.

The fake engine produces outputs with engine-side timestamps chosen by the test (offsets from a
fixed arrival), so histogram sums can be checked exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest
from fastapi import FastAPI, HTTPException

from parallm.engine.types import EngineRequest, EngineStats, RequestOutput, RequestTimes, SamplingParams, Usage
from parallm.server.http_metrics import install_observability
from parallm.server.metrics import MetricsSources, ServingMetrics
from parallm.server.request_observer import observe_stream
from parallm.server.request_context import note_prompt

MODEL = "tiny-test-model"
QUEUE_S, PREFILL_S, DECODE_S = 0.5, 0.25, 1.0  # engine-side phases of every fake request


@dataclass
class FakeEngine:
    """Generates `max_tokens` one-token deltas "x"; counts what it was asked, like a real engine's
    stats would. Prompt tokens: one per whitespace-separated word (set by the test app)."""

    stats_snapshot: EngineStats = field(default_factory=lambda: EngineStats(
        num_running=3, num_waiting=2, kv_cache_usage=0.25, kv_bytes_used=1024,
        kv_bytes_budget=4096, prefix_cache_queries=40, prefix_cache_hits=10, num_preemptions=1,
        steps=7, busy_seconds=2.5, idle_seconds=0.5, decode_rows=150, batched_tokens=400,
        prefill_steps=20, phase_seconds={"build": 1.25, "emit": 0.125}))
    requests: list = field(default_factory=list)

    def stats(self) -> EngineStats:
        return self.stats_snapshot

    def model_names(self) -> list[str]:
        return [MODEL]

    async def generate(self, request: EngineRequest):
        self.requests.append(request)
        n = request.sampling.max_tokens
        arrival = 1000.0
        for i in range(n):
            last = i == n - 1
            yield RequestOutput(
                request_id=request.request_id, index=0, text="x", token_ids=[7],
                finish_reason="length" if last else None, finished=last,
                usage=Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=n,
                            cached_tokens=1) if last else None,
                times=RequestTimes(arrival=arrival, first_scheduled=arrival + QUEUE_S,
                                   first_token=arrival + QUEUE_S + PREFILL_S,
                                   finished=arrival + QUEUE_S + PREFILL_S + DECODE_S) if last else None)


def build_app(engine: FakeEngine, *, with_metrics: bool = True, log_prompts: bool = False,
              fine_tuning_jobs=None, adapters_loaded=None):
    metrics = None
    if with_metrics:
        metrics = ServingMetrics(MetricsSources(model_name=lambda: engine.model_names()[0],
                                                engine_stats=engine.stats,
                                                adapters_loaded=adapters_loaded,
                                                fine_tuning_jobs=fine_tuning_jobs),
                                 max_model_len=2048)
    app = FastAPI()
    log = logging.getLogger("parallm.server.testapp")

    @app.post("/v1/completions")
    async def complete(body: dict):
        prompt = body["prompt"]
        note_prompt(prompt)
        request = EngineRequest(request_id="cmpl-1", prompt_token_ids=[1] * len(prompt.split()),
                                sampling=SamplingParams(max_tokens=body.get("max_tokens", 4)),
                                model=body.get("model", MODEL))
        text = "".join([out.text async for out in observe_stream(metrics, request.model, engine.generate(request))])
        log.info("completed a request")
        return {"text": text}

    @app.get("/v1/models/{model}")
    async def model(model: str):
        if model != MODEL:
            raise HTTPException(404, f"no model {model}")
        return {"id": model}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("boom")

    install_observability(app, metrics, log_prompts=log_prompts)
    return app, metrics


@pytest.fixture
def fake_engine():
    return FakeEngine()
