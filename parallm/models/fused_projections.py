"""One matmul for the projections of a block that share an input: q/k/v, and gate/up.

On a CUDA GPU a small model's decode step is bound by the host queuing kernels, not by FLOPs
(BENCHMARKS.md, seventh session: 60-70% of a 1B step is spent inside mx.async_eval). q_proj,
k_proj and v_proj all multiply the same input, as gate_proj and up_proj do; run as one matmul
against their concatenated weights, a Llama block launches 3 fewer matmuls. Measured with mlx-lm's
own forward (loadtests/bench_fused_projections.py, H200, bf16, batch 64): 1.12-1.16x per decode
step at the 1B shape, 1.21x at SmolLM2-135M's, the same logits; through parallm's server only
1.02x so far (BENCHMARKS.md, ninth session), which is why the engine leaves it off by default.

How, without touching the model's forward: each member linear becomes a `GroupedLinear` (still an
nn.Linear; a `GroupedQuantizedLinear` if quantized), its parameters views of its rows of the
group's concatenated ones (no second copy). The first member called with an input computes the
whole group's output once and cuts it with one mx.split (views, no copy); the others, called with
the same input object (as mlx-lm's attention and MLP do), take their piece of it. A member
called with any other input computes its own product, so the result is always that of the plain
layers. Members are grouped when they are all plain nn.Linear of one dtype and input size, all
with or all without bias, or all nn.QuantizedLinear of one group size, bit width and mode (the
quantized weight, scales and biases are all split along output rows); sharded layers are left as
they are.

Adapters: `dissolve` turns a group's members back into plain layers (their weights stay as they
are), and parallm.models.lora calls it before wrapping a member, so that the adapters'
own grouping (lora.SharedInputGroup) works as before.
"""
from __future__ import annotations

import itertools
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

# child names that take the same input in mlx-lm's blocks
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# the parameters a member may carry, all split along its output rows (axis 0)
_PARAMETERS = ("weight", "scales", "biases", "bias")


def share_rows(layers: list) -> dict[str, mx.array]:
    """Concatenate the layers' parameters (weight, and scales, biases, bias where present) along
    their output rows, then make each layer's own a view of its rows of the result, so that the
    group's product is one matmul and the weights are held once. Returns the concatenated ones."""
    wholes = {name: mx.concatenate([m[name] for m in layers], axis=0) for name in _PARAMETERS if name in layers[0]}
    mx.eval(*wholes.values())
    row = 0
    for m in layers:
        end = row + m["weight"].shape[0]
        for name, whole in wholes.items():
            m[name] = whole[row:end]  # rows are outputs in all four
        row = end
    mx.eval(*[m[name] for m in layers for name in wholes])  # the views hold the buffer; the originals can go
    return wholes


class ProjectionGroup:
    """The members' parameters as one matrix each ([sum of outs, ...]), and the last output."""

    def __init__(self, members: list):
        first = members[0]
        self.members = members
        self.base_class = type(first)  # nn.Linear or nn.QuantizedLinear
        self.quantized = self.base_class is nn.QuantizedLinear
        if self.quantized:
            self.group_size, self.bits, self.mode = first.group_size, first.bits, first.mode
        self.params = share_rows(members)
        self._views = [m["weight"] for m in members]  # as given, to see a later replacement
        for index, m in enumerate(members):
            m.__dict__["_group_index"] = index  # outside the parameter tree
        ends = list(itertools.accumulate(m["weight"].shape[0] for m in members))
        self._split_at = ends[:-1]  # where mx.split cuts the group's output into the members'
        self._input: Optional[mx.array] = None
        self._pieces: list = []
        self._served = 0

    def _product(self, x: mx.array) -> mx.array:
        p = self.params
        if self.quantized:
            out = mx.quantized_matmul(x, p["weight"], scales=p["scales"], biases=p.get("biases"), transpose=True,
                                      group_size=self.group_size, bits=self.bits, mode=self.mode)
            return out + p["bias"] if "bias" in p else out
        return mx.addmm(p["bias"], x, p["weight"].T) if "bias" in p else x @ p["weight"].T

    # The members run this once per layer per step, so it is kept to a few attribute reads: the
    # eighth session's version (a dict lookup by id() and an Ellipsis slice per member) added
    # ~0.4 ms of graph build to a 1B step on the H200, half of what the fused matmuls saved.
    def output(self, member: nn.Module, x: mx.array) -> mx.array:
        index = member.__dict__["_group_index"]
        if member["weight"] is not self._views[index]:  # its weight was replaced since: its own product
            return self.base_class.__call__(member, x)
        if x is not self._input:  # a new input: the whole group's product once, cut in one call
            self._input, self._served = x, 0
            self._pieces = mx.split(self._product(x), self._split_at, axis=-1)
        self._served += 1
        piece = self._pieces[index]
        if self._served == len(self._pieces):
            self.forget()  # all served: hold no activations (a long prefill's) past this layer
        return piece

    def forget(self) -> None:
        self._input = None
        self._pieces = []
        self._served = 0


class GroupedLinear(nn.Linear):
    """A member of a ProjectionGroup: as nn.Linear, with its product taken from the group's."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.__dict__["_projection_group"].output(self, x)


class GroupedQuantizedLinear(nn.QuantizedLinear):
    """The same for nn.QuantizedLinear members."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.__dict__["_projection_group"].output(self, x)


_GROUPED = {nn.Linear: GroupedLinear, nn.QuantizedLinear: GroupedQuantizedLinear}


def concatenable(members: list, quantized: bool = False) -> bool:
    """Whether these linears' weights can be one matrix: plain dense nn.Linear layers of one dtype
    and input size, all with or all without bias (also what lora's adapter groups require); with
    `quantized`, also nn.QuantizedLinear layers of one group size, bit width and mode."""
    kinds = {type(m) for m in members}
    allowed = (nn.Linear, nn.QuantizedLinear) if quantized else (nn.Linear,)
    if len(kinds) != 1 or kinds.pop() not in allowed:
        return False
    first = members[0]
    same = [("bias" in m) == ("bias" in first) and m.weight.dtype == first.weight.dtype
            and m.weight.shape[1] == first.weight.shape[1] for m in members]
    if type(first) is nn.QuantizedLinear:
        same += [(m.group_size, m.bits, m.mode) == (first.group_size, first.bits, first.mode)
                 and ("biases" in m) == ("biases" in first) and m.scales.dtype == first.scales.dtype
                 for m in members]
    return all(same)


def fuse_projections(model: nn.Module) -> int:
    """Group every q/k/v and gate/up set of linears in `model` that `concatenable` allows, in
    place. Returns how many groups it made (0: nothing to fuse, e.g. a sharded model)."""
    made = 0
    for _, module in model.named_modules():
        for names in GROUPS:
            members = [module.get(n) for n in names]  # an nn.Module is a dict of its children
            if any(m is None for m in members) or not concatenable(members, quantized=True):
                continue
            group = ProjectionGroup(members)
            for m in members:
                m.__class__ = _GROUPED[group.base_class]
                m.__dict__["_projection_group"] = group  # outside the parameter tree
            made += 1
    return made


def dissolve(module: nn.Module) -> None:
    """If `module` is a grouped member, make every member of its group a plain layer again (an
    nn.Linear or nn.QuantizedLinear, whichever it was)."""
    group = module.__dict__.get("_projection_group") if isinstance(module, tuple(_GROUPED.values())) else None
    if group is None:
        return
    for m in group.members:
        m.__class__ = group.base_class
        m.__dict__.pop("_projection_group", None)
        m.__dict__.pop("_group_index", None)
    group.forget()


def grouped_count(model: nn.Module) -> int:
    return sum(isinstance(m, tuple(_GROUPED.values())) for _, m in model.named_modules())
