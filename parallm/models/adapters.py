"""Read and validate mlx-lm adapter directories (`adapter_config.json` + `adapters.safetensors`).

mlx-lm's trainer writes the whole training config as adapter_config.json; what matters here is
`fine_tune_type` ("lora" | "dora"; "full" is a fine-tuned model, not an adapter), `num_layers`
and `lora_parameters` {rank, scale, dropout, keys?}. The safetensors file holds, for every
converted linear at path P, `P.lora_a` [in, r], `P.lora_b` [r, out] and, for DoRA, `P.m` [out].

Every problem is an `AdapterError` whose message names the file, the tensor and what was
expected; `code` says which kind of problem it is so the server can pick the HTTP status.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

import mlx.core as mx
import mlx.nn as nn

from parallm.models.lora import (ADAPTABLE_LINEARS, LayerAdapterWeights, MultiLoRALinear, default_target_paths,
                                 full_dims)
from parallm.models.lora_sharding import sharding_style

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
ADAPTER_TYPES = ("lora", "dora")
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


class AdapterError(Exception):
    """An adapter cannot be loaded. `code` is one of:
    adapter_not_found (missing dir or file), adapter_invalid (corrupt file or config),
    adapter_not_lora (fine_tune_type 'full' or unknown), adapter_shape_mismatch (does not fit the
    base model), path_not_allowed (outside the adapters directory)."""

    def __init__(self, message: str, code: str = "adapter_invalid"):
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class AdapterConfig:
    fine_tune_type: str  # "lora" or "dora"
    rank: int
    scale: float
    num_layers: int
    keys: Optional[tuple[str, ...]]  # linears to convert, relative to a block; None = all linears


@dataclass
class AdapterWeights:
    """A validated adapter: per linear path (from the model root), its tensors."""

    path: Path
    config: AdapterConfig
    layers: dict[str, LayerAdapterWeights] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        total = 0
        for w in self.layers.values():
            total += w.a.nbytes + w.b.nbytes + (w.magnitude.nbytes if w.magnitude is not None else 0)
        return total

    @property
    def max_rank(self) -> int:
        return max((w.rank for w in self.layers.values()), default=0)


def resolve_under(base_dir: str | os.PathLike, user_path: str) -> Path:
    """The real path of `user_path` (relative to base_dir, or absolute), if it lies inside
    base_dir after following symlinks. Raises AdapterError(code='path_not_allowed') for `..`
    components, URL-encoded or NUL characters, and anything that resolves outside base_dir."""
    if not isinstance(user_path, str) or not user_path.strip():
        raise AdapterError("The adapter path is empty.", "path_not_allowed")
    if "\x00" in user_path:
        raise AdapterError("The adapter path contains a NUL character.", "path_not_allowed")
    if unquote(user_path) != user_path:
        raise AdapterError(f"URL-encoded adapter paths are not accepted: {user_path!r}. "
                           "Give the path as plain text.", "path_not_allowed")
    parts = user_path.replace("\\", "/").split("/")
    if ".." in parts:
        raise AdapterError(f"The adapter path {user_path!r} contains '..'; give a path inside the "
                           "adapters directory.", "path_not_allowed")
    base = Path(base_dir).resolve()
    candidate = Path(user_path) if os.path.isabs(user_path) else base / user_path
    real = candidate.resolve()  # follows symlinks, so a link pointing out is caught below
    if real != base and base not in real.parents:
        raise AdapterError(f"The adapter path {user_path!r} is outside the adapters directory. Only "
                           "adapters under that directory (--adapters-dir) can be loaded.", "path_not_allowed")
    return real


def first_outside(base_dir: str | os.PathLike, target: str | os.PathLike) -> Optional[Path]:
    """The first entry of `target` (itself, or anything under it if a directory) whose real path
    lies outside `base_dir`, or None. Confining a directory is not enough: a file in it can be a
    symlink to anywhere. Linked folders that stay inside are walked too; each real folder once."""
    base = Path(base_dir).resolve()

    def outside(p: Path) -> bool:
        real = p.resolve()
        return real != base and base not in real.parents

    target = Path(target)
    if outside(target):
        return target
    pending, seen = [target], set()
    while pending:
        folder = pending.pop()
        if not folder.is_dir() or folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        try:
            entries = sorted(folder.iterdir())
        except OSError:  # unreadable: nothing in it can be loaded either
            continue
        for entry in entries:
            if outside(entry):
                return entry
            pending.append(entry)
    return None


def check_files_inside(base_dir: str | os.PathLike, adapter_dir: Path, user_path: str) -> None:
    """AdapterError(path_not_allowed) if a file of the adapter directory resolves outside base_dir."""
    escape = first_outside(base_dir, adapter_dir)
    if escape is not None:
        inner = escape.relative_to(adapter_dir) if escape != adapter_dir else Path(".")
        raise AdapterError(f"The adapter path {user_path!r} holds {str(inner)!r}, a link to a place outside the "
                           "adapters directory. Only files under that directory can be loaded.", "path_not_allowed")


def read_adapter_config(adapter_dir: Path) -> AdapterConfig:
    config_path = adapter_dir / CONFIG_FILE
    if not adapter_dir.is_dir():
        raise AdapterError(f"The adapter directory {str(adapter_dir)!r} does not exist.", "adapter_not_found")
    if not config_path.is_file():
        raise AdapterError(f"{str(config_path)!r} is missing: an mlx-lm adapter directory holds "
                           f"{CONFIG_FILE} and {WEIGHTS_FILE}.", "adapter_not_found")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{str(config_path)!r} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{str(config_path)!r} must hold a JSON object.")
    kind = raw.get("fine_tune_type", "lora")  # mlx-lm's default when the field is absent
    if kind == "full":
        raise AdapterError(f"{str(adapter_dir)!r} is a full fine-tune (fine_tune_type 'full'), not an "
                           "adapter: load it as a base model instead.", "adapter_not_lora")
    if kind not in ADAPTER_TYPES:
        raise AdapterError(f"fine_tune_type {kind!r} in {str(config_path)!r} is not supported; accepted: "
                           f"{', '.join(ADAPTER_TYPES)}.", "adapter_not_lora")
    params = raw.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterError(f"{str(config_path)!r} has no 'lora_parameters' object (rank, scale).")
    try:
        rank, scale = int(params["rank"]), float(params["scale"])
        num_layers = int(raw["num_layers"])
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{str(config_path)!r} needs integer 'num_layers' and lora_parameters with integer "
                           f"'rank' and numeric 'scale' (problem with {e}).") from None
    if rank < 1:
        raise AdapterError(f"lora_parameters.rank must be >= 1, got {rank}.")
    keys = params.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise AdapterError("lora_parameters.keys must be a list of module names such as 'self_attn.q_proj'.")
    return AdapterConfig(fine_tune_type=kind, rank=rank, scale=scale, num_layers=num_layers,
                         keys=tuple(keys) if keys is not None else None)


def _base_of(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, MultiLoRALinear) else module


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of the whole linear; for a sharded one (tensor parallel) the unsharded shape,
    which is what adapter files are written against (each rank slices them at install)."""
    return full_dims(_base_of(module))


def _allowed_targets(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """The linears mlx-lm's load_adapters would convert for this config, by full path."""
    modules = dict(model.named_modules())
    paths = default_target_paths(model, config.num_layers, config.keys)
    if config.keys is not None:  # mlx-lm also converts model-level modules named in keys
        paths += [k for k in config.keys if k in modules]
    linear_types = (*ADAPTABLE_LINEARS, MultiLoRALinear)
    return {p: modules[p] for p in paths if isinstance(modules.get(p), linear_types)}


@dataclass
class AdapterFiles:
    """An adapter directory read from disk, not yet checked against a model."""

    path: Path
    config: AdapterConfig
    tensors: dict[str, mx.array]


def read_adapter_files(adapter_dir: str | os.PathLike) -> AdapterFiles:
    """Read and parse the two files (the slow part; touches no model)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(f"{str(weights_path)!r} is missing.", "adapter_not_found")
    try:
        tensors = mx.load(str(weights_path))
        mx.eval(list(tensors.values()))  # read now, not lazily on the engine's thread
    except Exception as e:  # mlx raises RuntimeError/ValueError with a parser message
        raise AdapterError(f"{str(weights_path)!r} is not a readable safetensors file: {e}") from None
    if not isinstance(tensors, dict) or not tensors:
        raise AdapterError(f"{str(weights_path)!r} holds no tensors.")
    return AdapterFiles(path=adapter_dir, config=config, tensors=tensors)


def read_adapter(adapter_dir: str | os.PathLike, model: nn.Module) -> AdapterWeights:
    """Read an mlx-lm adapter directory and check every tensor against `model` (the base model,
    with or without MultiLoRALinear layers attached). Nothing in the model changes."""
    return check_adapter(read_adapter_files(adapter_dir), model)


def check_adapter(files: AdapterFiles, model: nn.Module) -> AdapterWeights:
    """Match the tensors to the model's linears (fast; reads the model's structure only)."""
    adapter_dir, config, tensors = files.path, files.config, files.tensors
    targets = _allowed_targets(model, config)
    grouped: dict[str, dict[str, mx.array]] = {}
    problems = []
    for name, t in tensors.items():
        path, _, leaf = name.rpartition(".")
        if leaf not in ADAPTER_LEAVES or (leaf == "m" and config.fine_tune_type != "dora"):
            problems.append(f"{name}: not an adapter tensor for fine_tune_type {config.fine_tune_type!r}")
        elif path not in targets:
            problems.append(f"{name}: no linear '{path}' among the base model's adapter targets "
                            f"(num_layers={config.num_layers}, keys={list(config.keys) if config.keys else 'all'})")
        else:
            grouped.setdefault(path, {})[leaf] = t
    if config.fine_tune_type == "dora" and any(sharding_style(_base_of(targets[p])) for p in grouped):
        raise AdapterError(f"The adapter at {str(adapter_dir)!r} is a DoRA adapter; DoRA is not supported on a "
                           "tensor-parallel (--distributed) model yet. Serve LoRA adapters there, or serve "
                           "this adapter without --distributed.", "adapter_invalid")
    layers: dict[str, LayerAdapterWeights] = {}
    for path, parts in sorted(grouped.items()):
        in_dims, out_dims = _linear_dims(targets[path])
        a, b, m = parts.get("lora_a"), parts.get("lora_b"), parts.get("m")
        if a is None or b is None:
            problems.append(f"{path}: has {sorted(parts)} but needs both lora_a and lora_b")
            continue
        if config.fine_tune_type == "dora" and m is None:
            problems.append(f"{path}: a DoRA adapter needs the magnitude tensor '{path}.m'")
            continue
        want = {"lora_a": (in_dims, config.rank), "lora_b": (config.rank, out_dims), "m": (out_dims,)}
        bad = [f"{path}.{leaf} has shape {tuple(t.shape)}, the base model needs {want[leaf]}"
               for leaf, t in parts.items() if tuple(t.shape) != want[leaf]]
        if bad:
            problems += bad
            continue
        if not all(mx.issubdtype(t.dtype, mx.floating) for t in parts.values()):
            problems.append(f"{path}: adapter tensors must be floating point")
            continue
        layers[path] = LayerAdapterWeights(a=a, b=b, scale=config.scale, magnitude=m)
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        code = "adapter_shape_mismatch" if any("shape" in p or "no linear" in p for p in problems) else "adapter_invalid"
        raise AdapterError(f"The adapter at {str(adapter_dir)!r} does not fit the base model:\n  "
                           + "\n  ".join(shown), code)
    return AdapterWeights(path=adapter_dir, config=config, layers=layers)
