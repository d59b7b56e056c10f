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

Sliding-window layers keep a ring of `window` positions per slot (position p at index p % window)
plus one trash index that padding and idle rows write to, so their junk never lands on a position a
row still needs. A prefill pass attends [the ring as it was, the new tokens] and then writes the
new tokens' last `window` into the ring; a decode pass writes first and attends the ring. Masks
hide ring entries by the absolute position each holds, which follows from the row's offset.
Recurrent-state layers live in a BatchedStateCache (state_cache.py) beside the K/V buffers.

A forward pass is described by a `PassLayout` (which slots the batch rows are, where each row's
new tokens start, how many of them are real, how many positions to return). The model sees one
cache object per entry of its cache list: a `LayerCache` for attention, which speaks the interface
mlx-lm models call (`offset`, `update_and_fetch`, `make_mask`), or a `StateLayerCache`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from parallm.models.cache_layout import AttentionLayer, CacheLayout, StateLayer
from parallm.engine.layer_cache import LayerCache
from parallm.engine.pass_shapes import round_up
from parallm.engine.ring_positions import ring_mask, ring_write_index
from parallm.engine.state_cache import BatchedStateCache

POS_STEP = 256  # positions added per capacity growth
SLOT_STEP = 8  # slot capacity is a multiple of this, and at least doubles when it grows


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
    # real tokens per row (the rest is padding, or a decode pass's idle row: 0); None: all num_new
    num_real: Optional[list[int]] = None
    # decode pass on CUDA: rows write and attend through DecodeAttention's kernels (no mask, no
    # scatter); the model's attention call is routed to LayerCache.attend (decode_attention.py)
    use_kernels: bool = False


class BatchedKVCache:
    def __init__(self, layout: CacheLayout, max_slots: int, kernels=None):
        self.layout = layout
        self.kernels = kernels  # DecodeAttention, or None where its kernels do not apply
        self.max_slots = max_slots
        self.specs: list[AttentionLayer] = layout.attention
        n = len(self.specs)
        # a sliding-window layer's ring size (positions kept), None for full layers
        self.rings: list[Optional[int]] = [spec.window for spec in self.specs]
        self.keys: list[Optional[mx.array]] = [None] * n
        self.values: list[Optional[mx.array]] = [None] * n
        states = [layer for layer in layout.layers if isinstance(layer, StateLayer)]
        self.state = BatchedStateCache(states) if states else None
        self.slot_capacity = 0
        self.capacity = 0  # positions of the full-attention buffers
        self.lengths = [0] * max_slots  # valid positions per slot (host copy)
        self.in_use = [False] * max_slots
        # each layout layer -> ("attention" | "state", its index among those of its kind)
        self._kinds: list[tuple[str, int]] = []
        a = st = 0
        for layer in layout.layers:
            if isinstance(layer, AttentionLayer):
                self._kinds.append(("attention", a))
                a += 1
            else:
                self._kinds.append(("state", st))
                st += 1
        self.layers = [LayerCache(self, i) for i in range(n)]
        self._pass: Optional[PassLayout] = None
        self._offsets_arr: Optional[mx.array] = None
        self._slots_arr: Optional[mx.array] = None
        self._row_index: Optional[mx.array] = None
        self._pos_index: Optional[mx.array] = None
        self._same_offset: Optional[int] = None
        self._written: list[Optional[mx.array]] = [None] * n  # kernel mode only
        self._exact_length = False
        self._max_offset = 0
        self._per_pass: dict = {}  # ring write indices and masks, shared by the layers of a pass

    @property
    def shares_prompt_rows(self) -> bool:
        """True when a slot's first n positions stay valid as it grows, so they can be copied to
        another slot (n > 1) or stored for the prefix cache. Rings and states do not keep them."""
        return self.state is None and not any(self.rings)

    # ---- slots -------------------------------------------------------------------------------
    def admit(self, slot: int) -> None:
        """A sequence takes `slot`: no valid positions, and its recurrent state starts at zero."""
        self.in_use[slot] = True
        self.lengths[slot] = 0
        if self.state is not None:
            self.ensure(slot + 1, 0)
            self.state.reset(slot)

    def free_slot(self, slot: int) -> None:
        self.in_use[slot] = False
        self.lengths[slot] = 0
        if not any(self.in_use):
            self.release()

    def release(self) -> None:
        """Drop the buffers (only valid when no slot is in use)."""
        self.keys = [None] * len(self.specs)
        self.values = [None] * len(self.specs)
        if self.state is not None:
            self.state.release()
        self.slot_capacity = 0
        self.capacity = 0

    def highest_active_slot(self) -> int:
        """-1 when empty. The decode pass runs over slots [0, highest + 1)."""
        for i in range(self.max_slots - 1, -1, -1):
            if self.in_use[i]:
                return i
        return -1

    @property
    def nbytes(self) -> int:
        """Bytes the buffers actually hold (allocated, not just used)."""
        total = 0
        for spec, ring in zip(self.specs, self.rings):
            total += self.slot_capacity * self._positions(ring) * spec.bytes_per_position
        return total + (self.state.nbytes if self.state is not None else 0)

    def _positions(self, ring: Optional[int]) -> int:
        """Positions a layer's buffer holds per slot: the ring and its trash index, or capacity."""
        if ring is not None:
            return ring + 1 if self.slot_capacity else 0
        return self.capacity

    # ---- capacity ----------------------------------------------------------------------------
    def ensure(self, slots_needed: int, positions_needed: int) -> None:
        """Grow the buffers so slots [0, slots_needed) and positions [0, positions_needed) exist."""
        new_slots = self.slot_capacity
        if slots_needed > new_slots:
            new_slots = min(self.max_slots, max(round_up(slots_needed, SLOT_STEP), 2 * new_slots))
            new_slots = max(new_slots, slots_needed)
        new_cap = self.capacity
        if positions_needed > new_cap and not all(self.rings):
            new_cap = round_up(positions_needed, POS_STEP)
        if (new_slots, new_cap) == (self.slot_capacity, self.capacity):
            return
        for i, (spec, ring) in enumerate(zip(self.specs, self.rings)):
            old_positions = self._positions(ring)
            positions = ring + 1 if ring is not None else new_cap
            if self.keys[i] is not None and (new_slots, positions) == (self.slot_capacity, old_positions):
                continue
            k = mx.zeros((new_slots, spec.n_kv_heads, positions, spec.k_head_dim), spec.dtype)
            v = mx.zeros((new_slots, spec.n_kv_heads, positions, spec.v_head_dim), spec.dtype)
            if self.keys[i] is not None:
                k[: self.slot_capacity, :, :old_positions] = self.keys[i]
                v[: self.slot_capacity, :, :old_positions] = self.values[i]
            self.keys[i], self.values[i] = k, v
            mx.eval(k, v)  # one layer at a time keeps the peak at old + one new layer
        if self.state is not None:
            self.state.ensure(new_slots)
        self.slot_capacity, self.capacity = new_slots, new_cap

    # ---- row copies (prefix cache, n > 1) -----------------------------------------------------
    def copy_rows(self, src_slot: int, dst_slot: int, num_tokens: int) -> None:
        """Copy positions [0, num_tokens) of one slot into another (n > 1 shares its prompt).
        Only where every position stays (shares_prompt_rows): the source may be further along."""
        if not self.shares_prompt_rows:
            raise RuntimeError("rows of sliding-window or recurrent-state layers cannot be copied by position")
        self.ensure(max(src_slot, dst_slot) + 1, num_tokens)
        for i in range(len(self.specs)):
            self.keys[i][dst_slot, :, :num_tokens] = self.keys[i][src_slot, :, :num_tokens]
            self.values[i][dst_slot, :, :num_tokens] = self.values[i][src_slot, :, :num_tokens]
        self.lengths[dst_slot] = num_tokens

    def read_rows(self, slot: int, num_tokens: int) -> list[mx.array]:
        """Copies of what a slot holds for its first num_tokens: per full layer K and V [H, T, D];
        per ring the whole ring and per state layer its arrays, which describe the first
        num_tokens only while the slot's length is exactly num_tokens."""
        rows = []
        for k, v, ring in zip(self.keys, self.values, self.rings):
            end = ring + 1 if ring is not None else num_tokens
            rows += [_copy(k[slot, :, :end]), _copy(v[slot, :, :end])]
        if self.state is not None:
            rows += [_copy(buf[slot]) for buffers in self.state.buffers for buf in buffers]
        return rows

    def write_rows(self, slot: int, rows: list[mx.array], num_tokens: int) -> None:
        """Put read_rows' copies into a slot, whose length becomes num_tokens."""
        self.ensure(slot + 1, num_tokens)
        it = iter(rows)
        for i, ring in enumerate(self.rings):
            end = ring + 1 if ring is not None else num_tokens  # a stored prefix may be longer
            self.keys[i][slot, :, :end] = next(it)[:, :end]
            self.values[i][slot, :, :end] = next(it)[:, :end]
        if self.state is not None:
            for buffers in self.state.buffers:
                for buf in buffers:
                    buf[slot] = next(it)
        self.lengths[slot] = num_tokens

    # ---- forward passes ----------------------------------------------------------------------
    def begin_pass(self, layout: PassLayout) -> list:
        """Prepare for one model call; returns the per-entry caches to hand to the model."""
        rows_end = max(layout.slots) + 1
        self.ensure(rows_end, max(layout.kv_len, max(layout.offsets) + layout.num_new))
        if layout.num_real is None:
            layout.num_real = [layout.num_new] * len(layout.slots)
        self._pass = layout
        self._per_pass = {}
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
        states = (self.state.begin_pass(self._slots_arr, B, layout.num_real)
                  if self.state is not None else [])
        leaves = [self.layers[i] if kind == "attention" else states[i] for kind, i in self._kinds]
        return [tuple(leaves[i] for i in entry) if isinstance(entry, tuple) else leaves[entry]
                for entry in self.layout.structure]

    def end_pass(self, lengths_after: dict[int, int]) -> None:
        """Record the new valid lengths of the rows that really computed tokens."""
        for slot, n in lengths_after.items():
            self.lengths[slot] = n
        if self.state is not None:
            self.state.end_pass()
        self._pass = None
        self._per_pass = {}

    def _update(self, layer: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        p = self._pass
        if self.rings[layer] is not None:
            return self._update_ring(layer, keys, values)
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

    def _update_ring(self, layer: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """A sliding-window layer: decode writes, then attends the ring; prefill attends the ring
        as it was plus the new tokens, then keeps their last `ring` in it."""
        B, _, N, _ = keys.shape
        kbuf, vbuf = self.keys[layer], self.values[layer]
        index = self._ring_write_index(self.rings[layer])
        rows = self._row_index
        if N == 1:
            kbuf[rows, :, index] = keys[:, :, 0]
            vbuf[rows, :, index] = values[:, :, 0]
            out_k, out_v = self._gather_rows(kbuf), self._gather_rows(vbuf)
        else:
            out_k = mx.concatenate([self._gather_rows(kbuf), keys], axis=2)
            out_v = mx.concatenate([self._gather_rows(vbuf), values], axis=2)
            kbuf[rows[:, None], :, index] = keys.transpose(0, 2, 1, 3)
            vbuf[rows[:, None], :, index] = values.transpose(0, 2, 1, 3)
        self.keys[layer], self.values[layer] = kbuf, vbuf
        return out_k, out_v

    def _gather_rows(self, buf: mx.array) -> mx.array:
        return buf[: len(self._pass.slots)] if self._pass.contiguous else buf[self._slots_arr]

    def _ring_write_index(self, ring: int) -> mx.array:
        key = ("write", ring)
        if key not in self._per_pass:
            p = self._pass
            self._per_pass[key] = ring_write_index(self._offsets_arr, p.num_real, p.num_new, ring)
        return self._per_pass[key]

    def _attend(self, layer: int, queries: mx.array, scale: float) -> mx.array:
        return self.kernels.attend(queries, self.keys[layer], self.values[layer], self._offsets_arr,
                                   self._written[layer], scale, self._max_offset)

    def _mask(self, layer: int, N: int, window_size: Optional[int]) -> Optional[mx.array]:
        ring = self.rings[layer]
        if ring is not None:
            return self._ring_mask(N, window_size or ring, ring)
        return self._full_mask(N, window_size)

    def _full_mask(self, N: int, window: Optional[int]) -> Optional[mx.array]:
        """[B, 1, N, kv_len] bool: query i of row b (at position offset_b + i) sees key j iff
        j <= offset_b + i (causal, which also hides everything past the row's valid length)."""
        p = self._pass
        if p.use_kernels:
            if window:
                raise RuntimeError("a windowed attention layer cannot run through the decode kernels")
            return None  # the kernels attend each row's own length
        if self._exact_length and window is None:
            return None  # exact-length attention has nothing to hide
        key = ("full", N, window)
        if key not in self._per_pass:
            q_pos = self._offsets_arr[:, None] + mx.arange(N)[None]  # [B, N]
            k_pos = mx.arange(p.kv_len)
            mask = k_pos[None, None, :] <= q_pos[:, :, None]
            if window is not None:
                mask = mask & (k_pos[None, None, :] > q_pos[:, :, None] - window)
            self._per_pass[key] = mask[:, None]
        return self._per_pass[key]

    def _ring_mask(self, N: int, window: int, ring: int) -> mx.array:
        key = ("ring", N, window, ring)
        if key not in self._per_pass:
            self._per_pass[key] = ring_mask(self._offsets_arr, N, window, ring)
        return self._per_pass[key]


def _copy(view: mx.array) -> mx.array:
    """A copy that owns its memory: a stored row must not be a view of a slot buffer, or every
    later in-place update of that buffer would have to copy it whole."""
    return view + mx.zeros((), view.dtype)
