"""AdapterManager: the LoRA/DoRA adapters served on top of one base model, hot-swapped between steps.

Two sides touch it:
- control (asyncio loop, admin routes): `load`, `unload`, `has_adapter`, `list`, and the request
  lifecycle `acquire` (when the engine admits a request) / `release` (when it finishes or aborts);
- the worker that owns the model: `bind_rows(names_per_row)` before every forward.

Invariants
- The model's layers change only inside `bind_rows`/`apply_pending`, i.e. on the worker thread
  and never during a forward. `load` reads and validates the files on the caller's thread (no model
  change), then queues the install; `unload` queues the uninstall once no request holds the adapter.
- A name is *servable* (has_adapter True, acquire succeeds) from `load` until `unload`. After
  `unload` the adapter answers UnknownModel (404) to new requests, but requests that acquired it
  keep it until their `release`; the last release frees its slot.
- Slot 0 means "no adapter". Freed slots are reused (the uninstall is queued before any install
  that reuses the slot, and the queue is applied in order).
- `acquire` returns a *key* unique to this load of the adapter ("name#n"). The engine keys rows
  (and its prefix cache: LoRA changes K/V) by it, so an adapter unloaded and loaded again under
  the same name never meets K/V computed with the old weights. `bind_rows` and `release` take
  keys or plain names.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import mlx.nn as nn

from parallm.engine.types import AdapterInfo
from parallm.engine.errors import InvalidRequest, UnknownModel
from parallm.models.adapters import (AdapterError, AdapterWeights, check_adapter, check_files_inside, read_adapter_files,
                                     resolve_under)
from parallm.models.lora import (NO_ADAPTER_SLOT, LoRARowBinding, install_adapter, multi_lora_layers,
                                 uninstall_adapter)

log = logging.getLogger("parallm.adapters")

# "/" is allowed (org/name ids) but not a ".." segment: a name is a label, never a path, and must
# not read like one that climbs out of a directory to a tool that maps names to folders.
NAME_PATTERN = re.compile(r"^(?!.*(?:^|/)\.\.(?:/|$))[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class AdapterLoadFailed(InvalidRequest):
    """400: the adapter files are missing, corrupt, not an adapter, or do not fit the base model."""

    def __init__(self, err: AdapterError):
        super().__init__(err.message, param="lora_path")
        self.code = err.code


class AdapterNameInvalid(InvalidRequest):
    """400: the name is malformed, taken by a base model, or taken by another adapter."""

    def __init__(self, message: str, code: str):
        super().__init__(message, param="lora_name")
        self.code = code


@dataclass
class _Entry:
    name: str
    key: str  # unique per load: "name#n"
    weights: AdapterWeights
    slot: int
    created: int
    refs: int = 0
    unloading: bool = False


@dataclass(frozen=True)
class _Install:
    slot: int
    key: str
    weights: AdapterWeights


@dataclass(frozen=True)
class _Uninstall:
    slot: int
    key: str


@dataclass(frozen=True)
class AdapterOp:
    """One install/uninstall as it travels to the other ranks of a tensor-parallel job (in the step
    plan): no tensors, only where every rank reads them (the same path on every host, like the
    model) and the slot and key rank 0 chose, so that every rank binds rows to the same slots."""

    kind: str  # "install" | "uninstall"
    slot: int
    key: str  # "name#n": the key rows carry (NewRow.adapter)
    path: Optional[str] = None  # install: the adapter directory, already resolved on rank 0


class AdapterManager:
    """Adapters of one base model. `reserved_names()` returns names the adapters must not take
    (the served base models, other models' adapters); `adapters_dir` confines run-time loads."""

    def __init__(self, base_name: str, model: nn.Module, *, adapters_dir: Optional[str | Path] = None,
                 reserved_names: Callable[[], Iterable[str]] = lambda: (), max_adapters: int = 64):
        self.base_name = base_name
        self._model = model
        self._adapters_dir = Path(adapters_dir).resolve() if adapters_dir is not None else None
        self._reserved_names = reserved_names
        self._max_adapters = max_adapters
        self._lock = threading.Lock()  # guards the books below; never held across model work
        self._model_lock = threading.Lock()  # held while layers are swapped in/out or inspected
        self._entries: dict[str, _Entry] = {}  # every adapter holding a slot, unloading ones included
        self._free_slots: list[int] = []
        self._next_slot = NO_ADAPTER_SLOT + 1
        self._loads = 0  # makes each load's key unique
        self._pending: deque[_Install | _Uninstall] = deque()  # applied in order by the worker
        self._binding: Optional[LoRARowBinding] = None
        # What the model holds now, name -> (key, slot); changed only where the ops are applied
        # (worker thread). Rows are bound through it, not through _entries (which the control side
        # changes at any time), so that the binding follows exactly the applied ops: on a
        # tensor-parallel job every rank applies the same ops at the same step and binds alike.
        self._applied: dict[str, tuple[str, int]] = {}
        # False on rank 0 of a tensor-parallel job: the LeaderRunner drains the queue (take_pending)
        # into the step plan and applies it (apply_ops) itself, at the same step as the other ranks.
        self.apply_on_bind = True

    # ---------------- control side ----------------
    def load(self, name: str, path: str | Path, *, trusted: bool = False) -> AdapterInfo:
        """Validate and queue an adapter. `trusted` (startup `--adapter NAME=PATH`) skips the
        adapters-directory confinement that applies to run-time loads. Raises AdapterNameInvalid
        or AdapterLoadFailed (400) and changes nothing on error."""
        self._check_name(name)
        try:
            if trusted:
                adapter_dir = Path(path).expanduser().resolve()
            elif self._adapters_dir is None:
                raise AdapterError("Loading adapters at run time is disabled: start the server with an "
                                   "adapters directory (--adapters-dir).", "path_not_allowed")
            else:
                adapter_dir = resolve_under(self._adapters_dir, str(path))
                check_files_inside(self._adapters_dir, adapter_dir, str(path))  # no file links out of the dir
            files = read_adapter_files(adapter_dir)  # slow file I/O: no lock held
            with self._model_lock:  # the worker may be swapping layers in right now
                weights = check_adapter(files, self._model)
        except AdapterError as e:
            raise AdapterLoadFailed(e) from None
        with self._lock:
            self._check_name(name)  # again: another load may have taken it meanwhile
            if len(self._entries) >= self._max_adapters:
                raise AdapterLoadFailed(AdapterError(
                    f"{self.base_name} already serves {len(self._entries)} adapters, the maximum; "
                    "unload one first.", "too_many_adapters"))
            slot = self._free_slots.pop(0) if self._free_slots else self._take_new_slot()
            self._loads += 1
            entry = _Entry(name=name, key=f"{name}#{self._loads}", weights=weights, slot=slot,
                           created=int(time.time()))
            self._entries[name] = entry
            self._pending.append(_Install(slot, entry.key, weights))
            return self._info(entry)

    def unload(self, name: str) -> None:
        """New requests for `name` get UnknownModel from now on; its slot is freed when its last
        in-flight request releases it. Unknown (or already unloading) names: UnknownModel."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.unloading:
                raise UnknownModel(name, self._servable_names())
            entry.unloading = True
            if entry.refs == 0:
                self._free(entry)

    def has_adapter(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and not entry.unloading

    def names(self) -> list[str]:
        with self._lock:
            return self._servable_names()

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info(e) for e in sorted(self._entries.values(), key=lambda e: e.created)]

    def acquire(self, name: str) -> str:
        """A request for `name` is admitted: keep the adapter until `release`. Returns the key of
        this load (use it for bind_rows, release and caches). UnknownModel when not servable."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.unloading:
                raise UnknownModel(name, self._servable_names())
            entry.refs += 1
            return entry.key

    def release(self, name_or_key: str) -> None:
        """The request that acquired the adapter finished or was aborted."""
        with self._lock:
            entry = self._lookup(name_or_key)
            if entry is None or entry.refs == 0:
                return  # tolerate a double release; never free twice
            entry.refs -= 1
            if entry.refs == 0 and entry.unloading:
                self._free(entry)

    @property
    def active_requests(self) -> int:
        with self._lock:
            return sum(e.refs for e in self._entries.values())

    # ---------------- worker side ----------------
    def apply_pending(self) -> None:
        """Install/uninstall queued adapters in the model. Worker thread, between forwards only."""
        self.apply_ops(self.take_pending())

    def take_pending(self) -> list:
        """Drain the queued installs/uninstalls, in order (to apply them, or ship them first)."""
        with self._lock:
            ops, self._pending = list(self._pending), deque()
        return ops

    def apply_ops(self, ops: Sequence) -> None:
        """Apply ops drained by take_pending, in order. Worker thread, between forwards only."""
        for op in ops:
            with self._model_lock:
                if isinstance(op, _Install):
                    self._binding = install_adapter(self._model, op.slot, op.weights.layers)
                    self._applied[op.key.split("#", 1)[0]] = (op.key, op.slot)
                else:
                    uninstall_adapter(self._model, op.slot)
                    name = op.key.split("#", 1)[0]
                    if self._applied.get(name, (None,))[0] == op.key:
                        del self._applied[name]

    @staticmethod
    def wire_ops(ops: Sequence) -> list[AdapterOp]:
        """The ops as they travel to the other ranks."""
        return [AdapterOp("install", op.slot, op.key, str(op.weights.path)) if isinstance(op, _Install)
                else AdapterOp("uninstall", op.slot, op.key) for op in ops]

    def apply_remote(self, ops: Sequence[AdapterOp]) -> None:
        """A rank > 0: apply rank 0's ops of this step, reading each adapter from its path and
        checking it against this rank's model (full shapes; each layer keeps its slice). Raises
        AdapterError when the files are missing or differ here: the ranks can no longer agree."""
        local = []
        for op in ops:
            if op.kind == "install":
                with self._model_lock:
                    weights = check_adapter(read_adapter_files(op.path), self._model)
                local.append(_Install(op.slot, op.key, weights))
            else:
                local.append(_Uninstall(op.slot, op.key))
        self.apply_ops(local)

    def fingerprint_items(self) -> list[tuple[str, str, int, AdapterWeights]]:
        """(name, key, slot, weights) of every loaded adapter, by slot (for the startup check)."""
        with self._lock:
            return [(e.name, e.key, e.slot, e.weights) for e in sorted(self._entries.values(), key=lambda e: e.slot)]

    def applied_state(self) -> tuple:
        """(name, key, slot) of every adapter the model holds, sorted (for cross-rank checks)."""
        return tuple(sorted((n, k, s) for n, (k, s) in self._applied.items()))

    def bind_rows(self, adapter_per_row: Sequence[Optional[str]]) -> None:
        """Before a forward: tell every adapted layer which adapter each batch row uses (a key from
        acquire or a name; None or "" = the base model). Applies queued loads/unloads first. A row
        naming an adapter that is no longer loaded runs without one (logged): the engine holds a
        reference for every live request, so only rows whose request has ended can hit this."""
        if self.apply_on_bind:
            self.apply_pending()
        if not any(adapter_per_row):
            if self._binding is not None:
                self._binding.clear()
            return
        with self._lock:
            slots = []
            for name in adapter_per_row:
                if not name:
                    slots.append(NO_ADAPTER_SLOT)
                    continue
                applied = self._applied.get(name.split("#", 1)[0])
                if applied is None or (name != applied[0] and "#" in name):
                    # Only a row of a request that already released its adapter (finished or
                    # aborted; its output is discarded) can get here. Failing would take the
                    # whole engine down, so it runs without an adapter instead.
                    log.warning("batch row bound to adapter %r, which is no longer loaded; the row runs "
                                "without it (its request has finished)", name)
                    slots.append(NO_ADAPTER_SLOT)
                    continue
                slots.append(applied[1])
        if self._binding is None:  # only possible if every adapter was unloaded before install
            return
        self._binding.bind(slots)

    # ---------------- internals (lock held) ----------------
    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise AdapterNameInvalid(
                f"Invalid adapter name {name!r}: use 1-128 characters from letters, digits and ._:/@+- "
                "starting with a letter or digit, with no '..' path segment.", "invalid_adapter_name")
        if name == self.base_name or name in set(self._reserved_names()):
            raise AdapterNameInvalid(f"The name '{name}' is already taken by a served model; choose "
                                     "another adapter name.", "name_conflict")
        if name in self._entries:
            state = " (unloading, waiting for its requests to finish)" if self._entries[name].unloading else ""
            raise AdapterNameInvalid(f"An adapter named '{name}' is already loaded{state}; unload it "
                                     "first or choose another name.", "adapter_already_loaded")

    def _lookup(self, name_or_key: str) -> Optional[_Entry]:
        """The entry for a name, or for a key of the *current* load of that name."""
        name = name_or_key.split("#", 1)[0]
        entry = self._entries.get(name)
        if entry is None or (name_or_key != name and entry.key != name_or_key):
            return None
        return entry

    def _take_new_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def _free(self, entry: _Entry) -> None:
        del self._entries[entry.name]
        self._pending.append(_Uninstall(entry.slot, entry.key))
        self._free_slots.append(entry.slot)
        self._free_slots.sort()

    def _servable_names(self) -> list[str]:
        return sorted(n for n, e in self._entries.items() if not e.unloading)

    def _info(self, e: _Entry) -> AdapterInfo:
        c = e.weights.config
        return AdapterInfo(name=e.name, parent=self.base_name, path=str(e.weights.path),
                           fine_tune_type=c.fine_tune_type, rank=c.rank, scale=c.scale,
                           num_layers=c.num_layers, memory_bytes=e.weights.nbytes, created=e.created,
                           slot=e.slot, active_requests=e.refs, unloading=e.unloading)

    def wrapped_layer_count(self) -> int:
        """How many linears of the model carry a MultiLoRALinear (for tests and `info`)."""
        with self._model_lock:
            return len(multi_lora_layers(self._model))


@dataclass(frozen=True)
class AdapterSpec:
    """One `--adapter NAME=PATH` from the command line or config file."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> "AdapterSpec":
        name, sep, path = text.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--adapter takes NAME=PATH (an mlx-lm adapter directory), got {text!r}")
        return cls(name.strip(), path.strip())


def build_adapter_manager(base_name: str, model: nn.Module, *, adapters_dir: Optional[str | Path] = None,
                          startup: Iterable[AdapterSpec] = (),
                          reserved_names: Callable[[], Iterable[str]] = lambda: ()) -> AdapterManager:
    """The manager `parallm serve` attaches to a model's engine: run-time loads confined to
    `adapters_dir` (None disables them), startup adapters loaded from anywhere (the operator
    chose them). Raises AdapterLoadFailed / AdapterNameInvalid for a bad startup adapter."""
    manager = AdapterManager(base_name, model, adapters_dir=adapters_dir, reserved_names=reserved_names)
    for spec in startup:
        manager.load(spec.name, spec.path, trusted=True)
    manager.apply_pending()  # nothing runs yet: install now so the first step pays nothing
    return manager
