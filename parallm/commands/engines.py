"""Several base models in `parallm serve`: which models to load under which names, which startup
adapter goes on which model, and the MultiModelEngine that serves them.

- `--model` may be repeated (or `model = ["a", "b"]` in the TOML file); `--served-model-name`
  likewise, paired with the models by position (fewer names than models: the rest keep the
  loader's name; more names than models is an error).
- `--adapter NAME=PATH` attaches to the first model; `--adapter NAME=PATH@MODEL` to the served
  model named MODEL (the text after the last '@'; a path with an '@' in it therefore needs the
  explicit `@MODEL` suffix).
- `--memory-budget-bytes N` bounds the weights of all base models; a run-time load past it evicts
  the least recently used idle models. The startup models alone must fit.
- Run-time loads (the admin route) are confined (`confine_model_spec`): a model under
  `--models-dir`, every file of it inside too, or a repo id matching `--allowed-hub-models`.
  Startup models are the operator's choice and load from anywhere.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Optional

from parallm.engine.errors import InvalidRequest
from parallm.server.config import ConfigError, ServerSettings

log = logging.getLogger("parallm.server")

# The loader's hub forms, "org/name" and "org/name/file.gguf", with no segment that climbs.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
                     r"(?:/(?P<file>[\w-][\w.-]*(?:/[\w-][\w.-]*)*\.gguf))?$")


@dataclass(frozen=True)
class ModelSpec:
    spec: Optional[str]  # for parallm.models.load; None is the built-in default model
    served_name: Optional[str]  # None: the loader's name


@dataclass(frozen=True)
class StartupAdapter:
    name: str
    path: str
    model: Optional[str]  # the served model it attaches to; None: the first one


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def model_specs(settings: ServerSettings) -> list[ModelSpec]:
    specs = _as_list(settings.model) or [None]
    names = _as_list(settings.served_model_name)
    if len(names) > len(specs):
        raise ConfigError(f"{len(names)} served model names for {len(specs)} models: give --served-model-name "
                          "at most once per --model (they pair by position)")
    names += [None] * (len(specs) - len(names))
    out = [ModelSpec(s, n) for s, n in zip(specs, names)]
    given = [n for n in names if n]
    if len(set(given)) != len(given):
        raise ConfigError(f"served model names must differ, got {given}")
    return out


def startup_adapters(settings: ServerSettings) -> list[StartupAdapter]:
    """`settings.adapters` ("NAME=PATH[@MODEL][,...]"); ConfigError if malformed."""
    out = []
    for text in (settings.adapters or "").split(","):
        if not text.strip():
            continue
        name, sep, path = text.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--adapter takes NAME=PATH or NAME=PATH@MODEL (an mlx-lm adapter directory), "
                              f"got {text!r}")
        path, at, model = path.strip().rpartition("@")
        if not at:
            path, model = model, ""
        if at and not model.strip():
            raise ConfigError(f"--adapter {text!r}: the model after '@' is empty")
        out.append(StartupAdapter(name.strip(), path.strip(), model.strip() or None))
    return out


class ModelNotAllowed(InvalidRequest):
    """400: a run-time load of something outside --models-dir and --allowed-hub-models. One message
    whatever is on disk, so the route cannot be used to learn which paths exist."""

    def __init__(self, spec: str, settings: ServerSettings):
        allowed = []
        if settings.models_dir:
            allowed.append("model directories and .gguf files that exist under its models directory (--models-dir)")
        if settings.allowed_hub_models:
            allowed.append("Hugging Face repos matching --allowed-hub-models")
        what = (" and ".join(allowed) if allowed else
                "no models at run time (start it with --models-dir or --allowed-hub-models to allow some)")
        super().__init__(f"The model {str(spec)[:200]!r} cannot be loaded: this server loads {what}.", param="model")
        self.code = "model_not_allowed"


def confine_model_spec(spec: Optional[str], settings: ServerSettings) -> str:
    """What a run-time load of `spec` may hand to the loader: the real path of a model under
    --models-dir (relative to it, or absolute inside it; symlinks followed, and no file of the
    model may lead outside), or a repo id matching a pattern of --allowed-hub-models. Anything else
    raises ModelNotAllowed."""
    from parallm.models.adapters import AdapterError, first_outside, resolve_under

    if not isinstance(spec, str) or not spec.strip():
        raise ModelNotAllowed(str(spec), settings)
    if settings.models_dir:
        models_dir = os.path.expanduser(settings.models_dir)
        try:
            real = resolve_under(models_dir, spec)  # refuses '..', NUL, URL-encoding, anything outside
        except AdapterError:
            real = None
        if real is not None and real.exists():
            escape = first_outside(models_dir, real)
            if escape is None:
                return str(real)
            log.warning("refused a run-time load of %s: %s leads outside the models directory", real, escape)
    hub = _HUB_ID.match(spec)
    patterns = [p.strip() for p in (settings.allowed_hub_models or "").split(",") if p.strip()]
    # The loader tries a spec as a local path first, so a repo id that names something in the
    # working directory would load that instead of the repo.
    if hub and any(fnmatchcase(hub["repo"], p) for p in patterns) and not os.path.lexists(spec):
        return spec
    raise ModelNotAllowed(spec, settings)


def build_multi_engine(settings: ServerSettings):
    """Load every configured model and wrap each in its own AsyncEngine (with its AdapterManager)
    behind one MultiModelEngine. Raises ModelLoadError, AdapterLoadFailed/AdapterNameInvalid or
    ConfigError with a readable message."""
    from parallm.engine.adapter_manager import AdapterSpec, build_adapter_manager
    from parallm.engine.async_engine import AsyncEngine
    from parallm.engine.engine import EngineConfig
    from parallm.engine.multi_model_engine import MultiModelEngine
    from parallm.models import load
    from parallm.commands.serve import engine_config

    specs = model_specs(settings)
    adapters = startup_adapters(settings)
    pending: dict[Optional[str], list[AdapterSpec]] = {}
    for a in adapters:
        pending.setdefault(a.model, []).append(AdapterSpec(a.name, a.path))
    config = engine_config(settings, EngineConfig)
    multi: Optional[MultiModelEngine] = None

    def engine_factory(loaded):
        startup = pending.pop(loaded.name, [])
        if multi is not None and not multi.model_names():  # the first model takes the unnamed ones
            startup = pending.pop(None, []) + startup
        manager = build_adapter_manager(loaded.name, loaded.model, adapters_dir=settings.adapters_dir,
                                        startup=startup, reserved_names=lambda: _taken_names(multi, loaded.name))
        return AsyncEngine(loaded, config, adapters=manager)

    def loader(spec, *, name=None, **kwargs):  # the registry's: run-time loads only, so confined
        return load(confine_model_spec(spec, settings), device=settings.device, name=name, **kwargs)

    multi = MultiModelEngine(engine_factory, unload_drain_timeout=settings.drain_timeout, loader=loader)
    for s in specs:
        loaded = load(s.spec, device=settings.device, name=s.served_name)
        multi.add_model(loaded, spec=s.spec)
    if pending:
        unknown = sorted(m for m in pending if m)
        raise ConfigError(f"--adapter ...@MODEL names models that are not served: {unknown}; "
                          f"served: {multi.model_names()}")
    budget = settings.memory_budget_bytes
    if budget is not None:
        used = multi.registry.total_weight_bytes()
        if used > budget:
            raise ConfigError(f"memory_budget_bytes={budget} is smaller than the startup models' weights "
                              f"({used} bytes)")
        multi.registry.memory_budget_bytes = budget  # set after startup, so startup models never evict each other
    return multi


def _taken_names(multi, own_base: str) -> list[str]:
    """Names an adapter of `own_base` may not take: other base models and other models' adapters."""
    if multi is None:
        return []
    names = [n for n in multi.model_names() if n != own_base]
    for base, manager in list(multi.managers.items()):
        if base != own_base:
            names += manager.names()
    return names
