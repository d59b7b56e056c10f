"""The HTTP side of metrics: an ASGI middleware counting requests by route template and status,
the `/metrics` route, and `install_observability()` that wires metrics and logging into an app."""
from __future__ import annotations

import time
from typing import Any, Optional

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from parallm.server.metrics import ServingMetrics
from parallm.server.request_context import RequestContextMiddleware, route_template

METRICS_PATH = "/metrics"


class HttpMetricsMiddleware:
    """Counts every HTTP request under its route template (never the raw path: that would make a
    series per URL) and observes its latency until the last body chunk is sent. Requests that
    match no route share the label `<unmatched>`."""

    def __init__(self, app: Any, *, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before starting a response
        started = time.perf_counter()

        async def send_and_watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.metrics.on_http_request(scope.get("method", ""), route_template(scope), status,
                                         time.perf_counter() - started)


def metrics_router(metrics: ServingMetrics) -> APIRouter:
    """`GET /metrics` in Prometheus' text format. Left outside API-key auth on purpose, like
    vLLM's: scrapers rarely carry keys, and nothing in it names a prompt or a user."""
    router = APIRouter()

    @router.get(METRICS_PATH, include_in_schema=False)
    def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def install_observability(app: FastAPI, metrics: Optional[ServingMetrics], *,
                          log_prompts: bool = False) -> None:
    """Add the request-id/access-log middleware, and when `metrics` is given the HTTP metrics
    middleware and the /metrics route. The request-context middleware is added last so it is
    the outermost: the request id is set before anything else runs and echoed on every response."""
    if metrics is not None:
        app.include_router(metrics_router(metrics))
        app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestContextMiddleware, log_prompts=log_prompts)
