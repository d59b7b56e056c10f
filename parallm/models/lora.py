"""Multi-adapter LoRA layers: one base linear, many adapters, a different adapter per batch row.

A `MultiLoRALinear` wraps a base `nn.Linear` / `nn.QuantizedLinear` and computes, for every row b
of the batch,

    y_b = base(x_b) + (x_b @ A[s_b]) @ B[s_b]                         (LoRA)
    y_b = G[s_b] * (base(x_b) - bias + (x_b @ A[s_b]) @ B[s_b]) + bias (DoRA)

where s_b is the row's adapter *slot*. Slot 0 is "no adapter" and is all zeros (and gain 1).
A is stacked [n_slots, in, R], B is [n_slots, R, out] with mlx-lm's `scale` folded into B, and
R is the largest rank loaded (smaller ranks are zero padded: padded columns of A and rows of B
add exactly zero). Both products are one `mx.gather_mm` each, indexed by the per-row slot, so a
batch that mixes 8 adapters costs two thin batched matmuls per layer, not 8 passes.

DoRA at inference: mlx-lm's DoRALinear computes (m / ||W + s B^T A^T||_row) * (x W^T + s x A B)
+ bias. The per-output gain G = m / ||W + s B^T A^T||_row does not depend on x, so it is computed
once when the adapter is added (one [out, in] matmul-sized pass), not per step; per step DoRA
costs one extra gather and multiply over the output.

Rows are bound per forward: `LoRARowBinding.bind(slots)` is set by the adapter manager before
each model call, and every MultiLoRALinear of the model reads the same binding. When no row uses
an adapter (or no row uses one this layer carries), the layer is exactly `base(x)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import (AllToShardedLinear, QuantizedAllToShardedLinear,
                                       QuantizedShardedToAllLinear, ShardedToAllLinear)
from mlx.utils import tree_unflatten

from parallm.models.lora_group import SHARED_INPUT_SIBLINGS, SharedInputGroup
from parallm.models.lora_kernel import MAX_RANK, LoRADeltaKernel, fits, shared_kernel
from parallm.models.lora_sharding import SHARDED_TO_ALL, shard_lora, sharding_style

NO_ADAPTER_SLOT = 0

# Linears that can carry per-row adapters: whole ones, and the sharded ones mlx-lm's
# `model.shard(group)` installs (tensor parallel; see parallm/models/lora_sharding.py).
_QUANTIZED = (nn.QuantizedLinear, QuantizedAllToShardedLinear, QuantizedShardedToAllLinear)
ADAPTABLE_LINEARS = (nn.Linear, *_QUANTIZED, AllToShardedLinear, ShardedToAllLinear)


@dataclass
class LayerAdapterWeights:
    """One adapter's tensors for one linear, as mlx-lm stores them.

    a: [in, r]; b: [r, out]; scale: mlx-lm's `lora_parameters.scale`; magnitude: DoRA's `m` [out]
    (None for LoRA)."""

    a: mx.array
    b: mx.array
    scale: float
    magnitude: Optional[mx.array] = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])


class LoRARowBinding:
    """Which adapter slot each batch row uses in the next forward. Shared by all layers of a model.

    `slots` is None when no row uses an adapter: layers then skip the LoRA path entirely."""

    def __init__(self):
        self.slots: Optional[mx.array] = None  # [batch] uint32
        self.active: frozenset[int] = frozenset()  # the distinct non-zero slots in `slots`
        self.generation = 0  # changes with every bind: outputs kept for a sibling expire with it
        self.rows = 0  # len(slots), as a Python int (the hot path checks it per layer)

    def bind(self, slots: Iterable[int]) -> None:
        slots = [int(s) for s in slots]
        active = frozenset(s for s in slots if s != NO_ADAPTER_SLOT)
        self.active = active
        self.slots = mx.array(slots, dtype=mx.uint32) if active else None
        self.rows = len(slots)
        self.generation += 1

    def clear(self) -> None:
        self.slots = None
        self.active = frozenset()
        self.generation += 1


@dataclass
class _Stacks:
    """The stacked per-slot tensors of one layer, rebuilt when adapters come or go (never per step)."""

    a: mx.array  # [n_slots, in, R]
    b: mx.array  # [n_slots, R, out], scale folded in
    gain: Optional[mx.array]  # [n_slots, out], None when no DoRA adapter is in this layer


def local_dims(base: nn.Module) -> tuple[int, int]:
    """(in, out) of the weight this process holds (a sharded linear holds a slice)."""
    out_dims, in_dims = base.weight.shape
    if isinstance(base, _QUANTIZED):
        in_dims = in_dims * 32 // base.bits
    return int(in_dims), int(out_dims)


def full_dims(base: nn.Module) -> tuple[int, int]:
    """(in, out) of the whole, unsharded linear: what adapter files are written against."""
    in_dims, out_dims = local_dims(base)
    style = sharding_style(base)
    if style is None:
        return in_dims, out_dims
    size = base.group.size()
    return (in_dims * size, out_dims) if style == SHARDED_TO_ALL else (in_dims, out_dims * size)


def _dense_weight(base: nn.Module) -> mx.array:
    if isinstance(base, _QUANTIZED):
        return mx.dequantize(base.weight, base.scales, base.biases, group_size=base.group_size,
                             bits=base.bits, mode=base.mode)
    return base.weight


def _compute_dtype(base: nn.Module) -> mx.Dtype:
    return base.scales.dtype if isinstance(base, _QUANTIZED) else base.weight.dtype


class MultiLoRALinear(nn.Module):
    """A base linear plus any number of adapters, applied per row by slot (see module docstring).

    Adapters are held outside the module's parameter tree (plain attributes), so the model's
    `parameters()` and weight loading see only the base weights.

    Sharded bases (tensor parallel): `set_adapter` takes the *full* adapter tensors and keeps this
    rank's slice (`shard_lora`): all-to-sharded layers keep A whole and B's output columns of this
    rank; sharded-to-all layers keep A's input rows of this rank and all-reduce the small
    [tokens, R] product x_r @ A_r over the group before @ B (the base layer all-reduces its own
    output). Every rank must hold the same adapters at the same slots and bind the same rows, so
    that the extra all-reduce happens on all of them or on none. DoRA is refused on sharded bases
    (its per-output norm would span ranks for sharded-to-all layers)."""

    def __init__(self, base: nn.Module, binding: LoRARowBinding):
        super().__init__()
        if not isinstance(base, ADAPTABLE_LINEARS):
            raise TypeError(f"MultiLoRALinear wraps nn.Linear, nn.QuantizedLinear or their sharded "
                            f"versions, not {type(base).__name__}")
        self.base = base
        self._binding = binding
        self._style = sharding_style(base)
        self._group = base.group if self._style is not None else None
        self._reduce_xa = self._style == SHARDED_TO_ALL and base.group.size() > 1
        self.input_dims, self.output_dims = full_dims(base)  # what adapter tensors must match
        self._local_in, self._local_out = local_dims(base)
        self._adapters: dict[int, LayerAdapterWeights] = {}
        self._gains: dict[int, mx.array] = {}  # DoRA slots only
        self._stacks: Optional[_Stacks] = None
        self._kernel: Optional[LoRADeltaKernel] = None  # CUDA: the one-launch update (lora_kernel.py)
        self._launch = None  # _kernel prepared for this layer's stacks (PreparedLaunch), made on first use
        self._siblings: Optional[SharedInputGroup] = None  # q/k/v or gate/up of the same block

    # ---- adapters come and go between forwards ----
    def set_adapter(self, slot: int, weights: LayerAdapterWeights) -> None:
        if slot == NO_ADAPTER_SLOT:
            raise ValueError("slot 0 is reserved for 'no adapter'")
        want_a, want_b = (self.input_dims, weights.rank), (weights.rank, self.output_dims)
        if tuple(weights.a.shape) != want_a or tuple(weights.b.shape) != want_b:
            raise ValueError(f"adapter shapes lora_a {tuple(weights.a.shape)}, lora_b {tuple(weights.b.shape)} "
                             f"do not fit a linear of in={self.input_dims}, out={self.output_dims} "
                             f"(expected {want_a} and {want_b})")
        if weights.magnitude is not None and tuple(weights.magnitude.shape) != (self.output_dims,):
            raise ValueError(f"DoRA magnitude shape {tuple(weights.magnitude.shape)} does not fit "
                             f"out={self.output_dims}")
        if weights.magnitude is not None and self._style is not None:
            raise ValueError("DoRA adapters are not supported on a tensor-parallel (sharded) model; "
                             "serve LoRA adapters, or DoRA without --distributed")
        if self._style is not None:
            group = self._group
            part = shard_lora(weights.a, weights.b, self._style, group.rank(), group.size())
            weights = LayerAdapterWeights(a=part.a, b=part.b, scale=weights.scale)
        self._adapters[slot] = weights
        self._gains.pop(slot, None)
        if weights.magnitude is not None:
            self._gains[slot] = self._dora_gain(weights)
        self._restack()

    def remove_adapter(self, slot: int) -> None:
        if self._adapters.pop(slot, None) is not None:
            self._gains.pop(slot, None)
            self._restack()

    @property
    def slots(self) -> frozenset[int]:
        return frozenset(self._adapters)

    def _dora_gain(self, w: LayerAdapterWeights) -> mx.array:
        # mlx-lm DoRALinear: m / ||W + scale * B^T A^T|| per output row, in the weight's dtype.
        weight = _dense_weight(self.base)
        adapted = weight + ((w.scale * w.b.T) @ w.a.T).astype(weight.dtype)
        gain = w.magnitude / mx.linalg.norm(adapted, axis=1)
        mx.eval(gain)
        return gain

    def _restack(self) -> None:
        self._kernel = None
        self._launch = None
        if self._siblings is not None:
            self._siblings.forget()
        if not self._adapters:
            self._stacks = None
            return
        n_slots = max(self._adapters) + 1
        rank = max(w.rank for w in self._adapters.values())
        dtype = _compute_dtype(self.base)
        kernel = shared_kernel() if not self._gains and self._style is None and rank <= MAX_RANK else None
        if kernel is not None:
            # The kernel compiles one variant per rank: padding to a power of two (zeros, exact)
            # keeps a server with adapters of ranks 4, 6 and 8 at one compile.
            rank = max(8, 1 << (rank - 1).bit_length())
        a = mx.zeros((n_slots, self._local_in, rank), dtype=dtype)
        b = mx.zeros((n_slots, rank, self._local_out), dtype=dtype)
        for slot, w in self._adapters.items():
            a[slot, :, : w.rank] = w.a.astype(dtype)
            b[slot, : w.rank, :] = (w.scale * w.b).astype(dtype)
        gain = None
        if self._gains:
            gain = mx.ones((n_slots, self._local_out), dtype=dtype)
            for slot, g in self._gains.items():
                gain[slot] = g.astype(dtype)
        mx.eval(a, b, *([gain] if gain is not None else []))
        self._stacks = _Stacks(a=a, b=b, gain=gain)
        if kernel is not None and kernel.ensure_compiled(dtype, rank):
            self._kernel = kernel

    # ---- forward ----
    def __call__(self, x: mx.array) -> mx.array:
        siblings = self._siblings
        if siblings is not None and self._binding.slots is not None:
            out = siblings.take(self, x)
            if out is None:
                out = siblings.run(self, x)
            if out is not None:
                return out
        return self._add_delta(x, self.base(x))

    def _add_delta(self, x: mx.array, y: mx.array) -> mx.array:
        """y (the base output for x) plus the bound rows' adapter updates."""
        binding, stacks = self._binding, self._stacks
        if binding.slots is None or stacks is None or binding.active.isdisjoint(self._adapters):
            return y
        slots = binding.slots
        shape = x.shape
        if len(shape) < 2 or shape[0] != binding.rows:
            raise ValueError(f"adapter rows bound for a batch of {binding.rows}, "
                             f"but the layer got input of shape {tuple(shape)}")
        kernel = self._kernel
        if kernel is not None and fits(shape) and x.dtype == y.dtype == stacks.a.dtype:
            launch = self._launch
            if launch is None:
                launch = self._launch = kernel.prepare([stacks.a], [stacks.b], stacks.a.dtype)
            return launch(x, [y], slots)[0]  # one launch (lora_kernel.py)
        n_slots = stacks.a.shape[0]
        # Rows whose adapter has no tensors in this layer index past the stack: send them to slot 0.
        slots = mx.where(slots < n_slots, slots, NO_ADAPTER_SLOT)
        squeeze = x.ndim == 2
        xs = x[:, None, :] if squeeze else x  # [B, L, in]; gather_mm's batch dim is B
        xa = mx.gather_mm(xs.astype(stacks.a.dtype), stacks.a, rhs_indices=slots)
        if self._reduce_xa:  # x is this rank's input slice: x_r @ A_r is a partial sum over ranks
            xa = mx.distributed.all_sum(xa, group=self._group)
        delta = mx.gather_mm(xa, stacks.b, rhs_indices=slots)  # [B, L, out]
        if squeeze:
            delta = delta[:, 0, :]
        if stacks.gain is None:
            return y + delta.astype(y.dtype)
        gain = stacks.gain[slots]  # [B, out]
        gain = gain.reshape(gain.shape[0], *([1] * (y.ndim - 2)), gain.shape[-1])
        bias = self.base.bias if "bias" in self.base else None
        pre = (y - bias if bias is not None else y) + delta.astype(y.dtype)
        out = gain.astype(y.dtype) * pre
        return out + bias if bias is not None else out


def link_siblings(model: nn.Module) -> None:
    """Group the wrapped linears of each block that share an input (SHARED_INPUT_SIBLINGS)."""
    wrapped = multi_lora_layers(model)
    parents = set()
    for path, layer in wrapped.items():
        layer._siblings = None
        parents.add(path.rpartition(".")[0])
    for parent in parents:
        for names in SHARED_INPUT_SIBLINGS:
            members = [wrapped[f"{parent}.{n}"] for n in names if f"{parent}.{n}" in wrapped]
            if len(members) > 1:
                group = SharedInputGroup(members)
                for m in members:
                    m._siblings = group
                if shared_kernel() is not None:  # CUDA: the group's base outputs in one matmul
                    group.fuse_base()


def find_module(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule at a dotted path (as in model.named_modules()), or None."""
    return dict(model.named_modules()).get(path)


def attach_multi_lora(model: nn.Module, module_paths: Iterable[str],
                      binding: Optional[LoRARowBinding] = None) -> LoRARowBinding:
    """Replace the linears at `module_paths` (full dotted paths from the model root, e.g.
    'model.layers.3.self_attn.q_proj') by MultiLoRALinear in place. Idempotent: a path already
    wrapped is left as is. Returns the binding all wrapped layers share (the model's existing one
    if any layer is already wrapped)."""
    modules = dict(model.named_modules())
    if binding is None:
        existing = [m for m in modules.values() if isinstance(m, MultiLoRALinear)]
        binding = existing[0]._binding if existing else LoRARowBinding()
    replacements = []
    for path in module_paths:
        module = modules.get(path)
        if module is None:
            raise KeyError(f"the model has no module '{path}'")
        if isinstance(module, MultiLoRALinear):
            continue
        if not isinstance(module, ADAPTABLE_LINEARS):
            raise TypeError(f"'{path}' is a {type(module).__name__}; only Linear and QuantizedLinear "
                            "layers (and their sharded versions) can carry per-row adapters")
        replacements.append((path, MultiLoRALinear(module, binding)))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
        link_siblings(model)
    return binding


def multi_lora_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """All wrapped layers by path (the path of the layer, not of its `.base`)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def default_target_paths(model: nn.Module, num_layers: int, keys: Optional[Iterable[str]]) -> list[str]:
    """The linears mlx-lm's `linear_to_lora_layers` would convert: within the last `num_layers`
    transformer blocks (all blocks when num_layers <= 0, as mlx-lm's `layers[-max(n, 0):]` gives),
    the modules named by `keys` (relative to a block), or every Linear/QuantizedLinear when keys
    is None. Returned as full paths from the model root."""
    block_prefix = _blocks_prefix(model)
    blocks = list(model.layers)
    start = len(blocks) - max(num_layers, 0) if num_layers > 0 else 0
    paths = []
    wanted = set(keys) if keys is not None else None
    for i in range(start, len(blocks)):
        for rel, m in blocks[i].named_modules():
            if not isinstance(m, (*ADAPTABLE_LINEARS, MultiLoRALinear)):
                continue
            if (wanted is None and rel and not rel.endswith(".base")) or (wanted is not None and rel in wanted):
                paths.append(f"{block_prefix}.{i}.{rel}")
    return paths


def _blocks_prefix(model: nn.Module) -> str:
    """Where `model.layers` lives in the module tree ('model.layers' for mlx-lm's Llama)."""
    first = model.layers[0]
    for path, m in model.named_modules():
        if m is first:
            return path.rsplit(".", 1)[0]
    raise ValueError("cannot locate model.layers in the module tree")


def install_adapter(model: nn.Module, slot: int, layers: dict[str, LayerAdapterWeights]) -> LoRARowBinding:
    """Wrap the linears an adapter needs (if not yet wrapped) and put its tensors at `slot`.
    Call only between forwards. Returns the model's row binding."""
    binding = attach_multi_lora(model, layers.keys())
    wrapped = multi_lora_layers(model)
    for path, weights in layers.items():
        wrapped[path].set_adapter(slot, weights)
    return binding


def uninstall_adapter(model: nn.Module, slot: int) -> None:
    """Drop `slot` from every wrapped layer (wrappers stay; with no adapters they are plain base calls)."""
    for layer in multi_lora_layers(model).values():
        layer.remove_adapter(slot)
