"""create_app: the FastAPI application. Routes are thin; OpenAIServing does the translating.

Seams for teammates: pass extra APIRouters (`routers`); they see the engine, settings, admission
and serving objects on `app.state`. Middleware order (outermost first): CORS (only with
--cors-origin), JSON Content-Type, body limit, draining gate, keys, HEAD-as-GET, then the app; so a
body that is not JSON, or too big, is refused before anything reads it.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import asynccontextmanager
from typing import Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from parallm.engine.client import EngineClient
from parallm.server.admission import Admission
from parallm.server.config import ServerSettings
from parallm.server.error_responses import install_error_handlers
from parallm.server.http_metrics import install_observability
from parallm.server.metrics import MetricsSources, ServingMetrics, primary_model_name
from parallm.server.middleware import (BodySizeLimit, Cors, DrainingGate, HeadAsGet, KeyAuth, RequireJson,
                                       binds_loopback)
from parallm.server.api_models import ChatCompletionRequest, CompletionRequest
from parallm.server.routes_adapters import create_adapter_router
from parallm.server.serving import OpenAIServing

openai_router = APIRouter()


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


@openai_router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await _serving(request).chat(body, request)


@openai_router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return await _serving(request).completions(body, request)


@openai_router.get("/v1/models")
async def list_models(request: Request):
    return _serving(request).models()


@openai_router.get("/v1/models/{model_id:path}")  # ':path': names such as 'org/model' or 'ft:...'
async def retrieve_model(model_id: str, request: Request):
    return _serving(request).model(model_id)


@openai_router.get("/health")
async def health(request: Request):
    """Answers from in-memory counters only, so it is fast however busy the engine is."""
    state = request.app.state
    admission: Admission = state.admission
    body = {
        "status": "draining" if admission.draining else "ok",
        "models": state.engine.model_names(),
        "uptime_s": round(time.monotonic() - state.started_at, 3),
        "server": {"in_flight": admission.in_flight, "max_in_flight": admission.max_in_flight,
                   "rejected_429": admission.rejected},
        "engine": dataclasses.asdict(state.engine.stats()),
    }
    # An engine may say why it cannot serve (e.g. a distributed group lost a rank).
    error = state.engine.health_error()
    if error:
        body["status"], body["error"] = "unhealthy", error
    elif not body["models"] and not admission.draining:
        # e.g. the last model was unloaded: up, but every generation would be a 404
        body["status"], body["error"] = "degraded", "no model is served"
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


def create_app(engine: EngineClient, settings: ServerSettings, routers: Sequence[APIRouter] = ()) -> FastAPI:
    admission = Admission(max_in_flight=settings.max_in_flight, max_queue=settings.max_queue,
                          retry_after=settings.retry_after)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            # After a drain this finds nothing left; on a plain stop it aborts what is running.
            admission.draining = True
            await engine.shutdown(drain_timeout=0.0)
            app.state.serving.prompts.shutdown()

    app = FastAPI(title="parallm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.settings = settings
    app.state.admission = admission
    # Metrics (ops): teammates may add sources later, e.g. app.state.metrics.sources.fine_tuning_jobs.
    app.state.metrics = ServingMetrics(MetricsSources(model_name=lambda: primary_model_name(engine),
                                                      engine_stats=engine.stats,
                                                      adapters_loaded=engine.adapters_loaded))
    app.state.serving = OpenAIServing(engine, admission, app.state.metrics)
    app.state.started_at = time.monotonic()
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(create_adapter_router(engine))  # the admin routes (middleware: admin key)
    for router in routers:
        app.include_router(router)
    # add_middleware wraps: the last added is the outermost.
    app.add_middleware(HeadAsGet)
    app.add_middleware(KeyAuth, api_key=settings.api_key, admin_key=settings.admin_key,
                       loopback=binds_loopback(settings.host))
    app.add_middleware(DrainingGate, is_draining=lambda: admission.draining)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       streamed_paths={"/v1/files": settings.max_upload_bytes})
    app.add_middleware(RequireJson, exempt=("/v1/files",))  # the upload is multipart
    origins = [o.strip() for o in (settings.cors_origin or "").split(",") if o.strip()]
    if origins:  # no CORS headers at all unless asked for
        app.add_middleware(Cors, allow_origins=origins, allow_methods=["GET", "HEAD", "POST", "DELETE"],
                           allow_headers=["*"], expose_headers=["Retry-After", "X-Request-Id"])
    # Outermost: request id + access log; plus /metrics (no API key, like vLLM's) and HTTP metrics.
    install_observability(app, app.state.metrics, log_prompts=settings.log_prompts)
    return app
