"""ModelRegistry: the base models served at once, loaded and unloaded at run time.

- `load(spec, name=...)` calls the loader (parallm.models.load by default) and registers the result.
- An optional memory budget (bytes of weights): after a load that goes over it, the least recently
  used *idle* models (no request in flight) are evicted until the total fits; if it still does not
  fit, the new model is dropped again and the load fails with code "over_budget". Peak memory
  during a load is therefore the budget plus the new model.
- `acquire(name)` / `release(name)` count requests in flight; a model in use is never evicted and
  `unload` of a busy model fails with "model_busy" unless force=True.
- `on_evict(name, loaded)` lets the serving layer stop the engine of a model that leaves.
- `cards(adapters)` lists models and adapters for /v1/models (adapters with parent and root, as vLLM).

Names are the registry's keys; an unknown name raises RegistryError("model_not_found") that lists
the known ones. Models here import nothing from engine/ or server/.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable, Iterable, Optional


class RegistryError(Exception):
    """`code`: model_not_found (404), model_exists, model_busy, over_budget, name_conflict (400)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message = message
        self.code = code

    @property
    def status(self) -> int:
        return 404 if self.code == "model_not_found" else 400


@dataclass
class _Slot:
    loaded: Any  # LoadedModel
    spec: Optional[str]
    loaded_at: int  # unix seconds
    last_used: float  # clock() of the last acquire/get, for LRU
    active_requests: int = 0


@dataclass(frozen=True)
class ModelCard:
    """One entry of /v1/models. Base models have parent None and root = what the weights are (the
    repo id, or the base name of their directory or file, "default" for the built-in model);
    adapters have parent = their base model and root = the base name of their directory. Never a
    full path: clients have no business with the server's file layout."""

    id: str
    created: int
    owned_by: str
    root: Optional[str]
    parent: Optional[str]
    kind: str  # "model" | "adapter"
    context_length: Optional[int]
    memory_bytes: Optional[int]  # weights (models) or adapter tensors (adapters)
    kv_bytes_per_token: Optional[int] = None
    notes: tuple[str, ...] = ()  # how the model is loaded and served (LoadedModel.notes)

    def to_openai(self) -> dict:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by,
                "root": self.root, "parent": self.parent,
                "parallm": {"kind": self.kind, "context_length": self.context_length,
                            "memory_bytes": self.memory_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
                            "notes": list(self.notes)}}


# a Hugging Face repo id, or one .gguf file of a repo (the loader's hub forms)
_HUB_SPEC = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+\.gguf)?$")


def model_root(spec: Optional[str], source: Optional[str]) -> str:
    """The `root` of a base model's card: the repo id it came from, else the base name of where its
    weights are (`source`, the loader's local path; a hub download's ends in a snapshot hash)."""
    if spec and _HUB_SPEC.match(spec) and source and PurePath(source).name != PurePath(spec).name:
        return spec
    return PurePath(source or spec or "").name or "default"


def adapter_card(adapter: Any, owned_by: str, context_length: Optional[int]) -> ModelCard:
    """An adapter's /v1/models entry (`adapter`: .name, .parent, .path, .created, .memory_bytes);
    root is its directory's name, never the server's path to it."""
    return ModelCard(id=adapter.name, created=adapter.created, owned_by=owned_by,
                     root=PurePath(str(adapter.path)).name, parent=adapter.parent, kind="adapter",
                     context_length=context_length, memory_bytes=adapter.memory_bytes)


def _default_loader(spec: Optional[str], *, name: Optional[str] = None, **kwargs):
    from parallm.models.loader import load

    return load(spec, name=name, **kwargs)


class ModelRegistry:
    def __init__(self, loader: Callable[..., Any] = _default_loader, *,
                 memory_budget_bytes: Optional[int] = None,
                 on_evict: Callable[[str, Any], None] = lambda name, loaded: None,
                 reserved_names: Callable[[], Iterable[str]] = lambda: (),
                 clock: Callable[[], float] = time.monotonic, owned_by: str = "parallm"):
        self._loader = loader
        self.memory_budget_bytes = memory_budget_bytes
        self._on_evict = on_evict
        self._reserved_names = reserved_names  # e.g. adapter names, which models must not shadow
        self._clock = clock
        self._owned_by = owned_by
        self._lock = threading.Lock()  # guards _slots; held briefly, never during a load
        self._load_lock = threading.Lock()  # one load at a time, so budget checks do not race
        self._slots: dict[str, _Slot] = {}

    # ---------------- loading ----------------
    def load(self, spec: Optional[str] = None, *, name: Optional[str] = None, **loader_kwargs) -> Any:
        """Load and register a model; returns its LoadedModel. Slow (reads weights): call it off the
        event loop. Raises RegistryError (model_exists, name_conflict, over_budget) or the loader's
        own error (ModelLoadError) and leaves the registry as it was."""
        with self._load_lock:
            if name is not None:
                self._check_free(name)
            loaded = self._loader(spec, name=name, **loader_kwargs)
            final_name = name or loaded.name
            if name is None:
                self._check_free(final_name)
            if final_name != loaded.name:
                loaded.name = final_name
            evicted = self._make_room(final_name, self._weight_bytes(loaded))
            with self._lock:
                self._slots[final_name] = _Slot(loaded, spec, int(time.time()), self._clock())
        for victim_name, victim in evicted:
            self._on_evict(victim_name, victim)
        return loaded

    def add(self, loaded: Any, *, spec: Optional[str] = None) -> None:
        """Register an already loaded model (startup, tests). Same budget rules as load()."""
        with self._load_lock:
            self._check_free(loaded.name)
            evicted = self._make_room(loaded.name, self._weight_bytes(loaded))
            with self._lock:
                self._slots[loaded.name] = _Slot(loaded, spec, int(time.time()), self._clock())
        for victim_name, victim in evicted:
            self._on_evict(victim_name, victim)

    def unload(self, name: str, *, force: bool = False) -> Any:
        """Remove a model. A model with requests in flight is refused (model_busy) unless force."""
        with self._lock:
            slot = self._get_slot(name)
            if slot.active_requests and not force:
                raise RegistryError(f"The model '{name}' has {slot.active_requests} requests in flight; "
                                    "retry when they finish (or force the unload).", "model_busy")
            del self._slots[name]
        self._on_evict(name, slot.loaded)
        return slot.loaded

    # ---------------- serving ----------------
    def get(self, name: str) -> Any:
        with self._lock:
            slot = self._get_slot(name)
            slot.last_used = self._clock()
            return slot.loaded

    def acquire(self, name: str) -> Any:
        """A request for `name` starts: the model is busy (not evictable) until release()."""
        with self._lock:
            slot = self._get_slot(name)
            slot.active_requests += 1
            slot.last_used = self._clock()
            return slot.loaded

    def release(self, name: str) -> None:
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None and slot.active_requests > 0:
                slot.active_requests -= 1
                slot.last_used = self._clock()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._slots)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._slots

    def total_weight_bytes(self) -> int:
        with self._lock:
            return sum(self._weight_bytes(s.loaded) for s in self._slots.values())

    def cards(self, adapters: Iterable[Any] = ()) -> list[ModelCard]:
        """Base models, then adapters. `adapters` items need .name, .parent, .path, .created and
        .memory_bytes (parallm.engine.adapter_manager.AdapterInfo has them)."""
        with self._lock:
            slots = dict(self._slots)
        cards = []
        for name, slot in sorted(slots.items()):
            mem = getattr(slot.loaded, "memory", None)
            cards.append(ModelCard(
                id=name, created=slot.loaded_at, owned_by=self._owned_by,
                root=model_root(slot.spec, getattr(slot.loaded, "source", None)), parent=None,
                kind="model", context_length=getattr(slot.loaded, "context_length", None),
                memory_bytes=self._weight_bytes(slot.loaded),
                kv_bytes_per_token=getattr(mem, "kv_bytes_per_token", None),
                notes=tuple(getattr(slot.loaded, "notes", None) or ())))
        for a in adapters:
            parent = slots.get(a.parent)
            cards.append(adapter_card(a, self._owned_by,
                                      getattr(parent.loaded, "context_length", None) if parent else None))
        return cards

    # ---------------- internals ----------------
    @staticmethod
    def _weight_bytes(loaded: Any) -> int:
        mem = getattr(loaded, "memory", None)
        return int(getattr(mem, "weight_bytes", 0) or 0)

    def _get_slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise RegistryError(f"The model '{name}' does not exist. Served models: "
                                f"{', '.join(sorted(self._slots)) or '(none)'}.", "model_not_found")
        return slot

    def _check_free(self, name: str) -> None:
        if not name or not isinstance(name, str):
            raise RegistryError("A model name must be a non-empty string.", "name_conflict")
        with self._lock:
            if name in self._slots:
                raise RegistryError(f"A model named '{name}' is already loaded; unload it first or "
                                    "choose another name.", "model_exists")
        if name in set(self._reserved_names()):
            raise RegistryError(f"The name '{name}' is taken by a LoRA adapter; choose another model name.",
                                "name_conflict")

    def _make_room(self, new_name: str, new_bytes: int) -> list[tuple[str, Any]]:
        """Evict idle LRU models until `new_bytes` more fit the budget. Returns the evicted ones
        (callbacks run outside the lock). Raises over_budget, evicting nothing, if even evicting
        every idle model would not make room."""
        budget = self.memory_budget_bytes
        if budget is None:
            return []
        with self._lock:
            used = sum(self._weight_bytes(s.loaded) for s in self._slots.values())
            idle = sorted((s.last_used, n) for n, s in self._slots.items() if s.active_requests == 0)
            freeable = sum(self._weight_bytes(self._slots[n].loaded) for _, n in idle)
            if used + new_bytes - freeable > budget:
                busy = sorted(n for n, s in self._slots.items() if s.active_requests)
                raise RegistryError(
                    f"The model '{new_name}' needs {new_bytes / 2**20:.1f} MiB of weights; with the memory "
                    f"budget of {budget / 2**20:.1f} MiB and {used / 2**20:.1f} MiB in use "
                    f"(busy: {', '.join(busy) or 'none'}), it does not fit even after evicting every idle "
                    "model.", "over_budget")
            evicted = []
            for _, n in idle:
                if used + new_bytes <= budget:
                    break
                slot = self._slots.pop(n)
                used -= self._weight_bytes(slot.loaded)
                evicted.append((n, slot.loaded))
            return evicted
