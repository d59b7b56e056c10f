"""BatchedKVCache: one slot per running sequence, each row at its own position.

Layout, per layer: K and V buffers shaped [slot_capacity, n_kv_heads, capacity, head_dim].
A sequence owns one slot (a row of those buffers) from the moment it is admitted until it
finishes; joining or leaving never copies another row (mlx-lm's BatchKVCache.extend/filter copy
the whole cache, which is the cost this avoids).

Invariants
- A slot's *length* is the number of valid positions in that row: positions [0, length) hold the
  K/V of the sequence's first `length` tokens. Positions >= length may hold junk (padding of a
  prefill, or the dummy token of a hole in the decode range) and are never attended: every mask
  this cache makes hides them, and every position is written before it becomes valid.
- Lengths live on the host (the scheduler's `num_computed_tokens` is the source of truth; the
  runner passes them in through `begin_pass`). Nothing here reads an mx.array back to the host.
- Buffers grow in steps (slots at least double, positions by POS_STEP); growth copies every layer
  once (and waits for it), so a burst of admissions grows the slots a few times, not once per 8.
  When no slot is in use the buffers are dropped, so KV memory returns to zero.

A forward pass is described by a `PassLayout` (which slots the batch rows are, where each row's
new tokens start, how many positions to return). The model sees one `LayerCache` per layer, which
speaks the interface mlx-lm models call: `offset`, `update_and_fetch`, `make_mask`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from parallm.engine.pass_shapes import round_up

POS_STEP = 256  # positions added per capacity growth
SLOT_STEP = 8  # slot capacity is a multiple of this, and at least doubles when it grows


@dataclass(frozen=True)
class KVShape:
    """What one token costs in every layer; learned from the model by `probe_kv_shape`."""

    num_layers: int
    n_kv_heads: int
    k_head_dim: int
    v_head_dim: int
    dtype: mx.Dtype

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.n_kv_heads * (self.k_head_dim + self.v_head_dim) * self.dtype.size


def probe_kv_shape(model) -> KVShape:
    """Run one token through the model with mlx-lm's own caches to read K/V shapes and dtype."""
    from mlx_lm.models.cache import make_prompt_cache

    caches = make_prompt_cache(model)
    model(mx.array([[0]]), cache=caches)
    first = caches[0]
    if not hasattr(first, "keys") or first.keys is None:
        raise ValueError(f"{type(first).__name__} is not a standard KV cache; the engine needs one")
    mx.eval(first.keys, first.values)
    _, h, _, dk = first.keys.shape
    dv = first.values.shape[3]
    return KVShape(len(caches), h, dk, dv, first.keys.dtype)


@dataclass
class PassLayout:
    """One forward pass: batch row b is slot `slots[b]`, its new tokens start at `offsets[b]`.

    `contiguous` means the rows are exactly slots 0..B-1 (the decode pass), so K/V are returned as
    a cheap slice instead of a gather. `kv_len` is how many positions attention sees (at least the
    largest offset + number of new tokens)."""

    slots: list[int]
    offsets: list[int]
    num_new: int  # tokens per row in this pass (the padded width)
    kv_len: int
    contiguous: bool
    window_size: Optional[int] = None
    # decode pass on CUDA: rows write and attend through DecodeAttention's kernels (no mask, no
    # scatter); the model's attention call is routed to LayerCache.attend (decode_attention.py)
    use_kernels: bool = False


class BatchedKVCache:
    def __init__(self, shape: KVShape, max_slots: int, kernels=None):
        self.shape = shape
        self.kernels = kernels  # DecodeAttention, or None where its kernels do not apply
        self.max_slots = max_slots
        self.keys: list[Optional[mx.array]] = [None] * shape.num_layers
        self.values: list[Optional[mx.array]] = [None] * shape.num_layers
        self.slot_capacity = 0
        self.capacity = 0
        self.lengths = [0] * max_slots  # valid positions per slot (host copy)
        self.in_use = [False] * max_slots
        self.layers = [LayerCache(self, i) for i in range(shape.num_layers)]
        self._pass: Optional[PassLayout] = None
        self._offsets_arr: Optional[mx.array] = None
        self._slots_arr: Optional[mx.array] = None
        self._row_index: Optional[mx.array] = None
        self._pos_index: Optional[mx.array] = None
        self._same_offset: Optional[int] = None
        self._written: list[Optional[mx.array]] = [None] * shape.num_layers  # kernel mode only
        self._exact_length = False
        self._max_offset = 0

    # ---- slots -------------------------------------------------------------------------------
    def allocate_slot(self) -> Optional[int]:
        """The lowest free slot (so holes fill first), or None when all max_slots are taken."""
        for i, used in enumerate(self.in_use):
            if not used:
                self.in_use[i] = True
                self.lengths[i] = 0
                return i
        return None

    def free_slot(self, slot: int) -> None:
        self.in_use[slot] = False
        self.lengths[slot] = 0
        if not any(self.in_use):
            self.release()

    def release(self) -> None:
        """Drop the buffers (only valid when no slot is in use)."""
        self.keys = [None] * self.shape.num_layers
        self.values = [None] * self.shape.num_layers
        self.slot_capacity = 0
        self.capacity = 0

    def num_active(self) -> int:
        return sum(self.in_use)

    def highest_active_slot(self) -> int:
        """-1 when empty. The decode pass runs over slots [0, highest + 1)."""
        for i in range(self.max_slots - 1, -1, -1):
            if self.in_use[i]:
                return i
        return -1

    @property
    def nbytes(self) -> int:
        """Bytes the K/V buffers actually hold (allocated, not just used)."""
        s = self.shape
        per_pos = s.n_kv_heads * (s.k_head_dim + s.v_head_dim) * s.dtype.size
        return s.num_layers * self.slot_capacity * self.capacity * per_pos

    def used_tokens(self) -> int:
        return sum(l for l, u in zip(self.lengths, self.in_use) if u)

    # ---- capacity ----------------------------------------------------------------------------
    def ensure(self, slots_needed: int, positions_needed: int) -> None:
        """Grow the buffers so slots [0, slots_needed) and positions [0, positions_needed) exist."""
        new_slots = self.slot_capacity
        if slots_needed > new_slots:
            new_slots = min(self.max_slots, max(round_up(slots_needed, SLOT_STEP), 2 * new_slots))
            new_slots = max(new_slots, slots_needed)
        new_cap = self.capacity
        if positions_needed > new_cap:
            new_cap = round_up(positions_needed, POS_STEP)
        if (new_slots, new_cap) == (self.slot_capacity, self.capacity):
            return
        s = self.shape
        for i in range(s.num_layers):
            k = mx.zeros((new_slots, s.n_kv_heads, new_cap, s.k_head_dim), s.dtype)
            v = mx.zeros((new_slots, s.n_kv_heads, new_cap, s.v_head_dim), s.dtype)
            if self.keys[i] is not None:
                k[: self.slot_capacity, :, : self.capacity] = self.keys[i]
                v[: self.slot_capacity, :, : self.capacity] = self.values[i]
            self.keys[i], self.values[i] = k, v
            mx.eval(k, v)  # one layer at a time keeps the peak at old + one new layer
        self.slot_capacity, self.capacity = new_slots, new_cap

    # ---- row copies (prefix cache, n > 1) -----------------------------------------------------
    def copy_rows(self, src_slot: int, dst_slot: int, num_tokens: int) -> None:
        """Copy positions [0, num_tokens) of one slot into another (n > 1 shares its prompt)."""
        self.ensure(max(src_slot, dst_slot) + 1, num_tokens)
        for i in range(self.shape.num_layers):
            self.keys[i][dst_slot, :, :num_tokens] = self.keys[i][src_slot, :, :num_tokens]
            self.values[i][dst_slot, :, :num_tokens] = self.values[i][src_slot, :, :num_tokens]
        self.lengths[dst_slot] = num_tokens

    def read_rows(self, slot: int, num_tokens: int) -> tuple[list[mx.array], list[mx.array]]:
        """Copies of positions [0, num_tokens) of a slot, per layer: ([H, T, Dk]..., [H, T, Dv]...)."""
        ks = [mx.contiguous(self.keys[i][slot, :, :num_tokens]) for i in range(self.shape.num_layers)]
        vs = [mx.contiguous(self.values[i][slot, :, :num_tokens]) for i in range(self.shape.num_layers)]
        return ks, vs

    def write_rows(self, slot: int, keys: list[mx.array], values: list[mx.array], num_tokens: int) -> None:
        self.ensure(slot + 1, num_tokens)
        for i in range(self.shape.num_layers):
            self.keys[i][slot, :, :num_tokens] = keys[i][:, :num_tokens]
            self.values[i][slot, :, :num_tokens] = values[i][:, :num_tokens]
        self.lengths[slot] = num_tokens

    # ---- forward passes ----------------------------------------------------------------------
    def begin_pass(self, layout: PassLayout) -> list["LayerCache"]:
        """Prepare for one model call; returns the per-layer caches to hand to the model."""
        rows_end = max(layout.slots) + 1
        self.ensure(rows_end, max(layout.kv_len, max(layout.offsets) + layout.num_new))
        self._pass = layout
        self._offsets_arr = mx.array(layout.offsets, dtype=mx.int32)
        self._max_offset = max(layout.offsets)
        self._slots_arr = None if layout.contiguous else mx.array(layout.slots, dtype=mx.int32)
        # index arrays shared by every layer of this pass (one op each, not one per layer)
        B, N = len(layout.slots), layout.num_new
        self._same_offset = layout.offsets[0] if len(set(layout.offsets)) == 1 else None
        # one position for every row (a single stream, say): attention over exactly the valid
        # positions needs no causal mask, which keeps MLX on its fused vector kernel
        self._exact_length = layout.contiguous and self._same_offset is not None and N == 1
        if self._exact_length:
            layout.kv_len = self._same_offset + 1
            layout.use_kernels = False
        self._row_index = mx.arange(B) if layout.contiguous else self._slots_arr
        self._pos_index = self._offsets_arr[:, None] + mx.arange(N)[None] if N > 1 else self._offsets_arr
        return self.layers

    def end_pass(self, lengths_after: dict[int, int]) -> None:
        """Record the new valid lengths of the rows that really computed tokens."""
        for slot, n in lengths_after.items():
            self.lengths[slot] = n
        self._pass = None

    def _update(self, layer: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        p = self._pass
        B, _, N, _ = keys.shape
        kbuf, vbuf = self.keys[layer], self.values[layer]
        o = self._same_offset
        if p.use_kernels:  # written in place; LayerCache.attend reads the buffers
            self._written[layer] = self.kernels.write(keys, values, kbuf, vbuf, self._offsets_arr)
            return keys, values
        if p.contiguous and o is not None:
            # every row writes at the same position: a plain slice update (what mlx-lm does)
            kbuf[:B, :, o:o + N] = keys
            vbuf[:B, :, o:o + N] = values
        elif N == 1:
            kbuf[self._row_index, :, self._pos_index] = keys[:, :, 0]
            vbuf[self._row_index, :, self._pos_index] = values[:, :, 0]
        else:
            rows = self._row_index[:, None]
            kbuf[rows, :, self._pos_index] = keys.transpose(0, 2, 1, 3)
            vbuf[rows, :, self._pos_index] = values.transpose(0, 2, 1, 3)
        self.keys[layer], self.values[layer] = kbuf, vbuf
        if p.contiguous:
            return kbuf[:B, :, : p.kv_len], vbuf[:B, :, : p.kv_len]
        return kbuf[self._slots_arr, :, : p.kv_len], vbuf[self._slots_arr, :, : p.kv_len]

    def _attend(self, layer: int, queries: mx.array, scale: float) -> mx.array:
        return self.kernels.attend(queries, self.keys[layer], self.values[layer], self._offsets_arr,
                                   self._written[layer], scale, self._max_offset)

    def _mask(self, N: int, window_size: Optional[int]) -> Optional[mx.array]:
        """[B, 1, N, kv_len] bool: query i of row b (at position offset_b + i) sees key j iff
        j <= offset_b + i (causal, which also hides everything past the row's valid length)."""
        p = self._pass
        window = window_size or p.window_size
        if p.use_kernels:
            if window:
                raise RuntimeError("a windowed attention layer cannot run through the decode kernels")
            return None  # the kernels attend each row's own length
        if self._exact_length and window is None:
            return None  # exact-length attention has nothing to hide
        q_pos = self._offsets_arr[:, None] + mx.arange(N)[None]  # [B, N]
        k_pos = mx.arange(p.kv_len)
        mask = k_pos[None, None, :] <= q_pos[:, :, None]
        if window is not None:
            mask = mask & (k_pos[None, None, :] > q_pos[:, :, None] - window)
        return mask[:, None]


class LayerCache:
    """The per-layer face of BatchedKVCache that mlx-lm model code calls."""

    def __init__(self, parent: BatchedKVCache, layer: int):
        self._parent = parent
        self._layer = layer

    @property
    def offset(self) -> mx.array:
        """Per-row positions of the first new token ([B] int32); RoPE accepts array offsets."""
        return self._parent._offsets_arr

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return self._parent._update(self._layer, keys, values)

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None, **kwargs):
        return self._parent._mask(N, window_size)

    def attend(self, queries: mx.array, scale: float, sinks=None) -> Optional[mx.array]:
        """The attention output when this pass attends through the kernels, else None (the caller
        then runs MLX's attention on what update_and_fetch returned)."""
        parent = self._parent
        if parent._pass is None or not parent._pass.use_kernels:
            return None
        if sinks is not None:
            raise RuntimeError("attention sinks are not supported by parallm's decode kernels")
        return parent._attend(self._layer, queries, scale)

    def is_trimmable(self) -> bool:
        return False

    def empty(self) -> bool:
        return self._parent.keys[self._layer] is None

    @property
    def nbytes(self) -> int:
        return self._parent.nbytes // max(1, self._parent.shape.num_layers)
