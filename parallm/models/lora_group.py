"""SharedInputGroup: wrapped linears of one block that take the same input (q/k/v, gate/up) and
share one LoRA kernel launch (and, on CUDA, one base matmul) instead of one each.

Used by parallm/models/lora.py's MultiLoRALinear (`_siblings`); `link_siblings` there builds the
groups. Everything here is an optimization: a member that cannot take the shared path computes
alone and gets the same result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import mlx.core as mx

from parallm.models.lora_kernel import LoRADeltaKernel, fits

if TYPE_CHECKING:
    from parallm.models.lora import MultiLoRALinear

_PARAMETERS = ("weight", "bias")  # a dense linear's parameters, both split along output rows


def concatenable(layers: list) -> bool:
    """Whether these linears' weights can be one matrix: plain dense nn.Linear layers of one dtype
    and input size, all with or all without bias."""
    import mlx.nn as nn

    if any(type(m) is not nn.Linear for m in layers):
        return False
    first = layers[0]
    return all(("bias" in m) == ("bias" in first) and m.weight.dtype == first.weight.dtype
               and m.weight.shape[1] == first.weight.shape[1] for m in layers)


def share_rows(layers: list) -> dict[str, mx.array]:
    """Concatenate the layers' parameters along their output rows, then make each layer's own a
    view of its rows of the result, so that the group's product is one matmul and the weights are
    held once. Returns the concatenated ones."""
    wholes = {name: mx.concatenate([m[name] for m in layers], axis=0) for name in _PARAMETERS if name in layers[0]}
    mx.eval(*wholes.values())
    row = 0
    for m in layers:
        end = row + m["weight"].shape[0]
        for name, whole in wholes.items():
            m[name] = whole[row:end]
        row = end
    mx.eval(*[m[name] for m in layers for name in wholes])  # the views hold the buffer; the originals can go
    return wholes


# Linears of one block that mlx-lm's models call on the same input, one right after another.
SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class _GroupPlan:
    """Which members of a SharedInputGroup take the shared launch for one set of active slots."""

    members: list  # MultiLoRALinear, in the group's order
    ids: frozenset  # id() of each member
    a: list  # their A stacks
    b: list  # their B stacks
    dtype: mx.Dtype  # what x and every base output must be for the kernel
    kernel: LoRADeltaKernel
    fused: Optional["_FusedBase"] = None  # members are the whole group and one matmul gives their base outputs
    launch: object = None  # kernel.prepare(a, b, dtype, fused): the group's one launch

    def __post_init__(self):
        self.launch = self.kernel.prepare(self.a, self.b, self.dtype, fused=self.fused is not None)


class _FusedBase:
    """The group's base weights as ONE [sum of outs, in] matrix, each member's own weight a view of
    its rows (no second copy): the group's base outputs are one matmul, and the LoRA kernel reads
    them from its result (`apply_fused`). On a GPU each tiny decode matmul costs tens of
    microseconds of dispatch, so q/k/v take 2 launches (matmul + kernel) instead of 4.

    Built only for plain dense linears of one dtype and input size, all with or all without bias.
    If a member's weight is later replaced (a reload, an update), `valid()` is False and the group
    falls back to per-member base calls, which stay correct."""

    def __init__(self, members: list):
        whole = share_rows([m.base for m in members])
        self.weight, self.bias = whole["weight"], whole.get("bias")
        self._views = [m.base["weight"] for m in members]
        self._bases = [m.base for m in members]

    @staticmethod
    def possible(members: list) -> bool:
        return concatenable([m.base for m in members])

    def valid(self) -> bool:
        # dict lookups, not attribute access: nn.Module's __getattr__ is Python, and this runs per call
        return all(base["weight"] is v for base, v in zip(self._bases, self._views))

    def __call__(self, x: mx.array) -> mx.array:
        if self.bias is not None:
            return mx.addmm(self.bias, x, self.weight.T)
        return x @ self.weight.T


class SharedInputGroup:
    """Wrapped linears called on the same x (a block's q/k/v, or gate/up): the first one called
    computes every member's output with ONE kernel launch (lora_kernel.apply_group) and keeps the
    others' outputs until they are called with that same x. On a GPU a decode step of a small
    model is bound by launches and by Python per layer: this takes a block from 7 LoRA launches
    to 4, and the members that can share a launch are worked out once per set of active adapters
    (a plan), not per call.

    A kept output is used only by its own layer, only for the identical input array, and only
    within the same row binding (`generation`); anything else recomputes, so a model that calls
    its linears differently still gets the right result, just without the saving."""

    def __init__(self, members: list[MultiLoRALinear]):
        self.members = members
        self._kept: dict[int, tuple[mx.array, int, mx.array]] = {}  # id(member) -> (x, generation, out)
        self._plans: dict[frozenset, Optional[_GroupPlan]] = {}  # binding.active -> plan
        self._fused: Optional[_FusedBase] = None
        self._stand_ins: dict = {}  # (id(member), rank, dtype) -> zero (A, B) stacks of one slot

    def fuse_base(self) -> bool:
        """Put the members' base weights into one matrix (see _FusedBase); True if done."""
        if not _FusedBase.possible(self.members):
            return False
        self._fused = _FusedBase(self.members)
        self._plans.clear()
        return True

    def forget(self) -> None:
        """Adapters came or went: kept outputs and plans are stale."""
        self._kept.clear()
        self._plans.clear()

    def take(self, member: MultiLoRALinear, x: mx.array) -> Optional[mx.array]:
        kept = self._kept.pop(id(member), None)
        if kept is not None and kept[0] is x and kept[1] == member._binding.generation:
            return kept[2]
        return None

    def _plan(self, active: frozenset) -> Optional[_GroupPlan]:
        carrying = [m for m in self.members if m._stacks is not None and not active.isdisjoint(m._adapters)]
        ready = [m for m in carrying if m._kernel is not None]
        if not ready:
            return None
        first = ready[0]._stacks.a
        ready = [m for m in ready if m._stacks.a.shape[-1] == first.shape[-1] and m._stacks.a.dtype == first.dtype]
        fused = self._fused
        if (fused is not None and len(ready) == len(carrying) and fused.valid()
                and fused.weight.dtype == first.dtype):
            # Every member takes the launch: those with no adapter for these rows get one-slot
            # zero stacks, so the kernel copies their base output unchanged.
            ready_ids = {id(m) for m in ready}
            plan_a, plan_b = [], []
            for m in self.members:
                if id(m) in ready_ids:
                    plan_a.append(m._stacks.a)
                    plan_b.append(m._stacks.b)
                else:
                    a, b = self._stand_in(m, int(first.shape[-1]), first.dtype)
                    plan_a.append(a)
                    plan_b.append(b)
            return _GroupPlan(list(self.members), frozenset(id(m) for m in self.members), plan_a, plan_b,
                              first.dtype, ready[0]._kernel, fused)
        if len(ready) < 2:
            return None
        return _GroupPlan(ready, frozenset(id(m) for m in ready), [m._stacks.a for m in ready],
                          [m._stacks.b for m in ready], first.dtype, ready[0]._kernel)

    def _stand_in(self, member: MultiLoRALinear, rank: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        key = (id(member), rank, dtype)
        if key not in self._stand_ins:
            a = mx.zeros((1, member._local_in, rank), dtype)
            b = mx.zeros((1, rank, member._local_out), dtype)
            mx.eval(a, b)
            self._stand_ins[key] = (a, b)
        return self._stand_ins[key]

    def run(self, caller: MultiLoRALinear, x: mx.array) -> Optional[mx.array]:
        """The caller's output after computing (and keeping) its siblings', or None when this
        input cannot take the shared launch (the caller then computes alone)."""
        binding = caller._binding
        active = binding.active
        plan = self._plans.get(active, False)
        if plan is False:
            if len(self._plans) >= 64:  # one entry per mix of adapters seen: keep it bounded
                self._plans.clear()
            plan = self._plans[active] = self._plan(active)
        if plan is None or id(caller) not in plan.ids:
            return None
        shape = x.shape
        if not fits(shape) or shape[0] != binding.rows or x.dtype != plan.dtype:
            return None
        if plan.fused is not None:
            if not plan.fused.valid():  # a member's weight was replaced: per-member calls from now on
                self._fused = None
                self._plans.clear()
                return None
            outs = plan.launch(x, [plan.fused(x)], binding.slots)
            return self._keep(caller, plan, x, binding.generation, outs)
        ys = [m.base(x) for m in plan.members]
        dtype = plan.dtype
        if any(y.dtype != dtype for y in ys):  # the kernel writes in the input's dtype
            outs = [m._add_delta(x, y) for m, y in zip(plan.members, ys)]
        else:
            outs = plan.launch(x, ys, binding.slots)
        return self._keep(caller, plan, x, binding.generation, outs)

    def _keep(self, caller, plan: _GroupPlan, x: mx.array, generation: int, outs: list) -> mx.array:
        mine = None
        kept = self._kept
        for m, out in zip(plan.members, outs):
            if m is caller:
                mine = out
            else:
                kept[id(m)] = (x, generation, out)
        return mine
