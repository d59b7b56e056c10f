"""Wires fine-tuning jobs into `parallm serve`: the job service, its routes, and the hand-over of a
finished adapter to the running engine's adapter manager (so `model=ft:...` works at once)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter

from parallm.finetune.service import FineTuning
from parallm.finetune.store import default_data_dir
from parallm.server.config import ServerSettings
from parallm.commands.data_dir_lock import DataDirLock, lock_data_dir
from parallm.server.routes_files import files_router
from parallm.server.routes_fine_tuning import fine_tuning_router, model_deletion_router

log = logging.getLogger("parallm.server")


@dataclass
class FineTuningMount:
    service: FineTuning
    routers: list[APIRouter]
    lock: Optional[DataDirLock] = None  # this process owns the data directory while it lives

    def job_counts(self) -> dict[str, int]:
        """Jobs by status, for the metrics gauge."""
        return self.service.store.count_jobs_by_status()


def lock_fine_tuning_data(settings: ServerSettings) -> Optional[DataDirLock]:
    """The data directory's lock, taken before anything else starts (DataDirInUse if another
    server holds it), or None when fine-tuning is off."""
    if not settings.fine_tuning:
        return None
    return lock_data_dir(Path(settings.data_dir).expanduser() if settings.data_dir else default_data_dir())


def mount_fine_tuning(engine: Any, settings: ServerSettings,
                      lock: Optional[DataDirLock] = None) -> Optional[FineTuningMount]:
    """The fine-tuning service for an engine built by build_engine, or None when turned off.

    Jobs train the served base model; the worker loads it from the same spec the server loaded
    (`settings.model`, or the default model). A finished job's adapter is hot-loaded into the
    engine's adapter manager; the server keeps priority while requests are running or waiting.

    Holds the data directory's lock (`lock`, or taken here: DataDirInUse if another server holds
    it), so that nothing here or in the job recovery at start touches another server's jobs.
    """
    if not settings.fine_tuning:
        return None
    data_dir = Path(settings.data_dir).expanduser() if settings.data_dir else default_data_dir()
    lock = lock or lock_data_dir(data_dir)
    managers = getattr(engine, "managers", None)  # MultiModelEngine: base name -> AdapterManager, live
    if managers is None:  # a single AsyncEngine
        manager = getattr(getattr(engine, "engine", None), "adapters", None)
        managers = {engine.model_names()[0]: manager} if manager is not None else {}
    specs = getattr(engine, "model_specs", None)
    if specs is not None:  # every served model can be fine-tuned, run-time loads included
        base_models = specs
    else:
        base_models = {engine.model_names()[0]: settings.model or ""}

    def on_adapter_ready(name: str, adapter_dir: Path, base_model: str) -> None:
        # The adapter goes on the model the job trained; if that model has been unloaded meanwhile
        # it is not served (its files stay in the data dir).
        manager = managers.get(base_model)
        if manager is None:
            log.warning("fine-tuned adapter %s is ready at %s, but its base model %s is not served (served: %s)",
                        name, adapter_dir, base_model, ", ".join(managers) or "none")
            return
        manager.load(name, str(adapter_dir), trusted=True)  # our own output: not under adapters_dir
        log.info("fine-tuned model %s is now served on %s (adapter %s)", name, base_model, adapter_dir)

    def serving_busy() -> bool:
        stats = engine.stats()
        return stats.num_running + stats.num_waiting > 0

    service = FineTuning.open(data_dir, base_models=base_models, on_adapter_ready=on_adapter_ready,
                              serving_busy=serving_busy, max_upload_bytes=settings.max_upload_bytes)
    return FineTuningMount(service, [files_router(service.files), fine_tuning_router(service.jobs),
                                     model_deletion_router(service, engine)], lock)
