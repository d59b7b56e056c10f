"""/v1/fine_tuning/jobs (OpenAI's shapes) and the legacy /v1/fine-tunes and /v1/fine_tunes
aliases (which answer with the same job objects; their events endpoint streams over SSE with
?stream=true). Mount with `app.include_router(fine_tuning_router(fine_tuning.jobs))`."""
from __future__ import annotations

import asyncio
import logging
import json
from typing import Any, Optional, Union

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, ConfigDict, StrictInt, model_validator
from sse_starlette.sse import EventSourceResponse

from parallm.engine.client import EngineClient
from parallm.engine.errors import InvalidRequest
from parallm.finetune.jobs import TERMINAL, JobRequest, JobService
from parallm.server.fine_tuning_http import list_page, openai_errors
from parallm.server.json_checks import find_json_problem, json_value_problem

log = logging.getLogger("parallm.server")
STREAM_POLL_S = 0.25
Auto = Union[str, int, float]


class CreateFineTuningJob(BaseModel):
    """The create body. Values ("auto", ranges, known ids) are checked by the JobService; here the
    shape, and that the body holds no lone surrogate, NaN or Infinity, or deep nesting anywhere."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # e.g. integrations, metadata: unused

    model: str
    training_file: str
    validation_file: Optional[str] = None
    suffix: Optional[str] = None
    seed: Optional[StrictInt] = None
    hyperparameters: Optional[dict[str, Any]] = None
    method: Optional[dict[str, Any]] = None
    # legacy /v1/fine-tunes top-level hyperparameters
    n_epochs: Optional[Auto] = None
    batch_size: Optional[Auto] = None
    learning_rate_multiplier: Optional[Auto] = None

    @model_validator(mode="before")
    @classmethod
    def _valid_json_values(cls, data):
        problem = json_value_problem(data)
        if problem is not None:
            raise ValueError(problem)
        return data

    def to_request(self) -> JobRequest:
        hyper = dict(self.hyperparameters or {})
        for name in ("n_epochs", "batch_size", "learning_rate_multiplier"):
            if getattr(self, name) is not None:
                hyper.setdefault(name, getattr(self, name))
        return JobRequest(model=self.model, training_file=self.training_file, validation_file=self.validation_file,
                          suffix=self.suffix, seed=self.seed, hyperparameters=hyper or None, method=self.method)


def fine_tuning_router(jobs: JobService) -> APIRouter:
    router = APIRouter(tags=["fine-tuning"])

    @openai_errors
    def create_job(body: dict = Body(...)):
        found = find_json_problem(body)  # first, so that the 400 can name the field
        if found is not None:
            raise InvalidRequest(f"{found[0] or 'The body'} {found[1]}", param=found[0] or None)
        return jobs.create(CreateFineTuningJob.model_validate(body).to_request()).as_openai()

    @openai_errors
    def list_jobs(after: Optional[str] = None, limit: int = Query(20)):
        page = jobs.list(after=after, limit=limit)
        return list_page(page.items, page.has_more)

    @openai_errors
    def retrieve_job(job_id: str):
        return jobs.get(job_id).as_openai()

    @openai_errors
    def cancel_job(job_id: str):
        return jobs.cancel(job_id).as_openai()

    @openai_errors
    async def list_events(job_id: str, after: Optional[str] = None, limit: int = Query(20), stream: bool = False):
        if stream:
            jobs.get(job_id)  # 404 before the stream starts
            return EventSourceResponse(_stream_events(jobs, job_id))
        page = await asyncio.to_thread(jobs.events, job_id, after, limit)
        return list_page(page.items, page.has_more)

    @openai_errors
    def list_checkpoints(job_id: str, after: Optional[str] = None, limit: int = Query(10)):
        page = jobs.checkpoints(job_id, after=after, limit=limit)
        return list_page(page.items, page.has_more)

    for prefix in ("/v1/fine_tuning/jobs", "/v1/fine-tunes", "/v1/fine_tunes"):
        router.add_api_route(prefix, create_job, methods=["POST"])
        router.add_api_route(prefix, list_jobs, methods=["GET"])
        router.add_api_route(prefix + "/{job_id}", retrieve_job, methods=["GET"])
        router.add_api_route(prefix + "/{job_id}/cancel", cancel_job, methods=["POST"])
        router.add_api_route(prefix + "/{job_id}/events", list_events, methods=["GET"])
        router.add_api_route(prefix + "/{job_id}/checkpoints", list_checkpoints, methods=["GET"])
    return router


async def _stream_events(jobs: JobService, job_id: str):
    """Every event of the job, oldest first, then new ones as they come; `[DONE]` once the job
    has finished and nothing is left to send. A client disconnect cancels this generator."""
    seq = 0
    finished_seen = False
    while True:
        events = await asyncio.to_thread(jobs.store.events_since, job_id, seq)
        for event in events:
            seq = event.seq
            yield {"data": json.dumps(event.as_openai())}
        if not events:
            if finished_seen:
                yield {"data": "[DONE]"}
                return
            # the final event is written just after the status flips: look once more before [DONE]
            finished_seen = (await asyncio.to_thread(jobs.get, job_id)).status in TERMINAL
            await asyncio.sleep(STREAM_POLL_S)


def model_deletion_router(service: Any, engine: EngineClient) -> APIRouter:
    """DELETE /v1/models/{model} (the SDK's models.delete), for the fine-tuned models this server's
    jobs made: it stops serving the model (requests in flight finish with it) and deletes its
    adapter files, so a restart does not serve it again. The job and its events stay. It changes
    what is served, so it is an admin route (middleware.is_admin_route): the admin key, or the
    rules that apply without one."""
    router = APIRouter()

    @router.delete("/v1/models/{model_id:path}")
    @openai_errors
    async def delete_model(model_id: str):
        job = service.jobs.succeeded_job_of(model_id)
        served_base = model_id in engine.model_names()
        served_adapter = engine.adapter_parent(model_id) is not None
        if job is None and (served_base or served_adapter):
            raise InvalidRequest(
                f"'{model_id}' is not a fine-tuned model of this server, so it cannot be deleted; to stop "
                "serving it use POST /v1/unload_lora_adapter (an adapter) or /v1/admin/models/unload (a base model).",
                param="model")
        if served_adapter:
            await engine.unload_adapter(model_id)
        await asyncio.to_thread(service.jobs.delete_model, model_id)  # UnknownModel (404) if unknown or gone
        log.info("fine-tuned model %s deleted", model_id)
        return {"id": model_id, "object": "model", "deleted": True}

    return router
