"""BatchedStateCache: the recurrent state of hybrid and state-space layers, one row per slot.

A state layer (Mamba's conv + SSM state, a gated-delta layer's conv + recurrent state, a short-conv
layer's window) keeps a few fixed-size arrays per sequence. Here each array is one buffer shaped
[slot_capacity, *shape]; a sequence's state lives in its slot's row from admission to finish, so
joining and leaving copy no other row, as with the K/V buffers.

Invariants
- A slot's row holds the state after exactly the tokens its length counts: an admitted slot starts
  at zero (the state before any token, which is what mlx-lm's models build when a cache is empty),
  and a pass writes a row back only if that row computed real tokens (`PassLayout.num_real`).
  Rows that only ride along in a pass (holes and idle rows of the decode range) keep their state,
  whatever the model computed for them.
- A pass hands the model its rows with no padding: the runner groups a state model's prefill
  chunks by exact length, so every state layer runs mlx-lm's own single-sequence code (no
  `lengths`, no mask), batched.
"""
from __future__ import annotations

from typing import Optional

import mlx.core as mx

from parallm.models.cache_layout import StateLayer


class BatchedStateCache:
    def __init__(self, layers: list[StateLayer]):
        self.layers = layers
        self.buffers: list[list[Optional[mx.array]]] = [[None] * len(layer.shapes) for layer in layers]
        self.slot_capacity = 0
        self._views: list[StateLayerCache] = [StateLayerCache(self, i) for i in range(len(layers))]
        self._rows: Optional[mx.array] = None  # the pass's slots (None: slots 0..B-1)
        self._batch = 0
        self._real: Optional[mx.array] = None  # [B] bool: the row computed real tokens

    @property
    def nbytes(self) -> int:
        return sum(layer.bytes_per_sequence for layer in self.layers) * self.slot_capacity

    def ensure(self, slots: int) -> None:
        if slots <= self.slot_capacity:
            return
        for layer, buffers in zip(self.layers, self.buffers):
            for j, (shape, dtype) in enumerate(zip(layer.shapes, layer.dtypes)):
                grown = mx.zeros((slots, *shape), dtype)
                if buffers[j] is not None:
                    grown[: self.slot_capacity] = buffers[j]
                buffers[j] = grown
                mx.eval(grown)
        self.slot_capacity = slots

    def release(self) -> None:
        self.buffers = [[None] * len(layer.shapes) for layer in self.layers]
        self.slot_capacity = 0

    def reset(self, slot: int) -> None:
        """A newly admitted sequence starts from the state before any token."""
        for buffers in self.buffers:
            for j, buf in enumerate(buffers):
                buf[slot] = 0
                buffers[j] = buf

    def copy(self, src: int, dst: int) -> None:
        for buffers in self.buffers:
            for j, buf in enumerate(buffers):
                buf[dst] = buf[src]
                buffers[j] = buf

    def begin_pass(self, slots: Optional[mx.array], batch: int, num_real: list[int]) -> list["StateLayerCache"]:
        self._rows, self._batch = slots, batch
        self._real = None if all(n > 0 for n in num_real) else mx.array([n > 0 for n in num_real])
        for view in self._views:
            view.start()
        return self._views

    def end_pass(self) -> None:
        for i, view in enumerate(self._views):
            for j, new in view.written.items():
                self._write_back(i, j, new, view.read(j))

    def _write_back(self, layer: int, entry: int, new: mx.array, old: mx.array) -> None:
        buf = self.buffers[layer][entry]
        new = new.astype(buf.dtype)
        if self._real is not None:
            new = mx.where(self._real.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
        if self._rows is None:
            buf[: self._batch] = new
        else:
            buf[self._rows] = new
        self.buffers[layer][entry] = buf

    def _gather(self, layer: int, entry: int) -> mx.array:
        buf = self.buffers[layer][entry]
        return buf[: self._batch] if self._rows is None else buf[self._rows]


class StateLayerCache:
    """The face of one state layer that mlx-lm model code calls, like its `ArraysCache`:
    `cache[i]` reads and `cache[i] = x` replaces the pass's rows of state array i."""

    lengths = None  # no padding in a pass (BatchedStateCache's invariants)
    left_padding = None

    def __init__(self, parent: BatchedStateCache, layer: int):
        self._parent = parent
        self._layer = layer
        self.written: dict[int, mx.array] = {}
        self._read: dict[int, mx.array] = {}

    def start(self) -> None:
        self.written, self._read = {}, {}

    def read(self, entry: int) -> mx.array:
        """The pass's rows as they were before the model touched them (gathered once per pass)."""
        if entry not in self._read:
            self._read[entry] = self._parent._gather(self._layer, entry)
        return self._read[entry]

    def __getitem__(self, entry: int) -> mx.array:
        return self.written[entry] if entry in self.written else self.read(entry)

    def __setitem__(self, entry: int, value: mx.array) -> None:
        self.read(entry)  # keep the old rows: idle rows are written back unchanged
        self.written[entry] = value

    def make_mask(self, N: int, **kwargs) -> None:
        return None

    def advance(self, N: int) -> None:
        pass

    def empty(self) -> bool:
        return False
