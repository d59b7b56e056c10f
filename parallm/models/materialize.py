"""materialize(model): evaluate every array a model holds, not only its parameters.

MLX streams belong to a thread: an array still lazy on the thread that built it cannot be evaluated
on another. Model code keeps arrays outside `parameters()` (scaled RoPE's `_freqs`, masks and
tables made in `__init__` or on a first call), so evaluating the parameters alone leaves those
lazy, and the engine's worker thread then fails on its first request. Whoever builds or runs a
model on one thread and hands it to another calls this first.
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


def arrays_held(root: Any) -> list[mx.array]:
    """Every mx.array reachable from `root` through modules, lists, tuples, dicts and plain objects'
    attributes (private ones included), each once."""
    found: list[mx.array] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, mx.array):
            found.append(obj)
        elif isinstance(obj, nn.Module):
            stack.extend(obj.values())  # arrays, submodules, lists and dicts live in the dict
            stack.extend(v for v in vars(obj).values() if _may_hold_arrays(v))
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif _may_hold_arrays(obj):
            stack.extend(vars(obj).values())
    return found


def materialize(model: Any) -> None:
    """Evaluate everything `model` holds, on the calling thread."""
    arrays = arrays_held(model)
    if arrays:
        mx.eval(arrays)


def _may_hold_arrays(value: Any) -> bool:
    """Containers and plain helper objects (a RoPE variant that is not an nn.Module, say); not
    functions, classes or modules, whose attributes are not the model's state."""
    if isinstance(value, (mx.array, nn.Module, dict, list, tuple)):
        return True
    if isinstance(value, type) or callable(value) and not hasattr(value, "__dict__"):
        return False
    module = type(value).__module__ or ""
    return hasattr(value, "__dict__") and module.startswith(("mlx_lm", "parallm", "mlx."))
