"""One matmul for the projections of a block that share an input: q/k/v, and gate/up.

On a CUDA GPU a small model's decode step is bound by the host queuing kernels, not by FLOPs
(BENCHMARKS.md, seventh session: 60-70% of a 1B step is spent inside mx.async_eval). q_proj,
k_proj and v_proj all multiply the same input, as gate_proj and up_proj do; run as one matmul
against their concatenated weights, a Llama block launches 3 fewer matmuls. Measured with mlx-lm's
own forward (loadtests/bench_fused_projections.py, H200, bf16, batch 64): 1.12x per decode step at
the 1B shape, 1.15x at SmolLM2-135M's, the same logits.

How, without touching the model's forward: each member linear becomes a `GroupedLinear` (still an
nn.Linear, its weight a view of its rows of the group's concatenated weight, so no second copy).
The first member called with an input computes the whole group's output once; the others, called
with the same input object (as mlx-lm's attention and MLP do), take their slice of it. A member
called with any other input computes its own product, so the result is always that of the plain
layers. Only plain dense nn.Linear members of one dtype and input size, all with or all without
bias, are grouped (quantized and sharded layers are left as they are).

Adapters: `dissolve` turns a group's members back into plain nn.Linear layers (their weights stay
as they are), and parallm.models.lora calls it before wrapping a member, so that the adapters'
own grouping (lora.SharedInputGroup) works as before.
"""
from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

# child names that take the same input in mlx-lm's blocks
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class ProjectionGroup:
    """The members' weights (and biases) as one [sum of outs, in] matrix, and the last output."""

    def __init__(self, members: list[nn.Linear]):
        weights = [m.weight for m in members]
        self.weight = mx.concatenate(weights, axis=0)
        self.bias = mx.concatenate([m.bias for m in members], axis=0) if "bias" in members[0] else None
        mx.eval(self.weight, *([self.bias] if self.bias is not None else []))
        self.members = members
        self._spans: dict[int, tuple[int, int]] = {}  # id(member) -> its rows
        self._views: dict[int, mx.array] = {}  # id(member) -> the weight it was given
        row = 0
        for m, w in zip(members, weights):
            end = row + w.shape[0]
            m.weight = self._views[id(m)] = self.weight[row:end]
            if self.bias is not None:
                m.bias = self.bias[row:end]
            self._spans[id(m)] = (row, end)
            row = end
        mx.eval(*[m.weight for m in members])  # views of the group's buffer; the old weights can go
        self._input: Optional[mx.array] = None
        self._output: Optional[mx.array] = None
        self._taken: set[int] = set()

    def output(self, member: nn.Linear, x: mx.array) -> mx.array:
        if member["weight"] is not self._views[id(member)]:  # its weight was replaced since: its own product
            return nn.Linear.__call__(member, x)
        if x is not self._input:  # a new input: the whole group's product, once
            out = mx.addmm(self.bias, x, self.weight.T) if self.bias is not None else x @ self.weight.T
            self._input, self._output, self._taken = x, out, set()
        start, end = self._spans[id(member)]
        piece = self._output[..., start:end]
        self._taken.add(id(member))
        if len(self._taken) == len(self.members):
            self.forget()  # all served: hold no activations (a long prefill's) past this layer
        return piece

    def forget(self) -> None:
        self._input = self._output = None
        self._taken = set()


class GroupedLinear(nn.Linear):
    """A member of a ProjectionGroup: as nn.Linear, with its product taken from the group's."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.__dict__["_projection_group"].output(self, x)


def concatenable(members: list) -> bool:
    """Whether these linears' weights can be one matrix: plain dense nn.Linear layers of one dtype
    and input size, all with or all without bias (also what lora's adapter groups require)."""
    if any(type(m) is not nn.Linear for m in members):
        return False
    first = members[0].weight
    with_bias = "bias" in members[0]
    return all(m.weight.dtype == first.dtype and m.weight.shape[1] == first.shape[1]
               and ("bias" in m) == with_bias for m in members)


def fuse_projections(model: nn.Module) -> int:
    """Group every q/k/v and gate/up set of plain linears in `model`, in place. Returns how many
    groups it made (0: nothing to fuse, e.g. a quantized model)."""
    made = 0
    for _, module in model.named_modules():
        for names in GROUPS:
            members = [module.get(n) for n in names]  # an nn.Module is a dict of its children
            if any(m is None for m in members) or not concatenable(members):
                continue
            group = ProjectionGroup(members)
            for m in members:
                m.__class__ = GroupedLinear
                m.__dict__["_projection_group"] = group  # outside the parameter tree
            made += 1
    return made


def dissolve(module: nn.Module) -> None:
    """If `module` is a GroupedLinear, make every member of its group a plain nn.Linear again."""
    group = module.__dict__.get("_projection_group") if isinstance(module, GroupedLinear) else None
    if group is None:
        return
    for m in group.members:
        m.__class__ = nn.Linear
        m.__dict__.pop("_projection_group", None)
    group.forget()


def grouped_count(model: nn.Module) -> int:
    return sum(isinstance(m, GroupedLinear) for _, m in model.named_modules())
