"""Hyperparameters: what a client asked for ("auto" allowed) -> a TrainingPlan of plain numbers.

The "auto" choices are tuned so that a small dataset is learnt in minutes on a CPU. Measured on
the default model (SmolLM2-135M) with mlx-lm's LoRA, 8 layers, batch 4, 30 iterations, 24 chat
rows teaching one fact: lr 1e-3 wrecked the model; lr 2e-4 learnt the fact in 56 s in f32.
Hence: lr 2e-4 x multiplier; batch min(4, rows); epochs so that a small set gets ~30 steps.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from parallm.engine.errors import InvalidRequest

BASE_LEARNING_RATE = 2e-4
AUTO_TARGET_EXAMPLES = 120  # example visits aimed at for a small set (30 steps of batch 4)
MAX_AUTO_EPOCHS = 25
AUTO_LORA_LAYERS = 8
METHOD_TYPES = ("lora", "dora", "full")
HYPERPARAMETER_NAMES = ("n_epochs", "batch_size", "learning_rate_multiplier")


@dataclass(frozen=True)
class TrainingPlan:
    """Everything the worker needs to know about how to train; stored with the job."""

    method: str  # lora | dora | full
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    iters: int
    num_layers: int  # trailing transformer blocks that get adapters (or are unfrozen, for full)
    lora_rank: int
    lora_scale: float
    lora_dropout: float
    checkpoint_every: int  # steps between checkpoints
    max_seq_length: int
    train_rows: int

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingPlan":
        return cls(**d)


@dataclass(frozen=True)
class RequestedHyperparameters:
    n_epochs: Any = "auto"
    batch_size: Any = "auto"
    learning_rate_multiplier: Any = "auto"


@dataclass(frozen=True)
class RequestedMethod:
    type: str  # lora | dora | full
    hyperparameters: RequestedHyperparameters
    lora_rank: int = 8
    lora_scale: float = 20.0
    num_layers: Optional[int] = None


def _check_auto_or_number(name: str, value: Any, *, integer: bool) -> Any:
    if value == "auto" or value is None:
        return "auto"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise InvalidRequest(f"hyperparameters.{name} must be \"auto\" or {kind}, got {value!r}.",
                             param=f"hyperparameters.{name}")
    return value


def parse_hyperparameters(raw: Optional[dict]) -> RequestedHyperparameters:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise InvalidRequest("hyperparameters must be an object.", param="hyperparameters")
    unknown = set(raw) - set(HYPERPARAMETER_NAMES)
    if unknown:
        raise InvalidRequest(f"Unknown hyperparameters {sorted(unknown)}; accepted: {', '.join(HYPERPARAMETER_NAMES)}.",
                             param="hyperparameters")
    return RequestedHyperparameters(
        n_epochs=_check_auto_or_number("n_epochs", raw.get("n_epochs"), integer=True),
        batch_size=_check_auto_or_number("batch_size", raw.get("batch_size"), integer=True),
        learning_rate_multiplier=_check_auto_or_number("learning_rate_multiplier",
                                                       raw.get("learning_rate_multiplier"), integer=False),
    )


def parse_method(method: Optional[dict], hyperparameters: Optional[dict]) -> RequestedMethod:
    """Accepts OpenAI's `{"type": "supervised", "supervised": {"hyperparameters": {...}}}`,
    parallm's `{"type": "lora"|"dora"|"full", "lora"?: {"rank", "scale", "num_layers"}}`, and the
    legacy top-level `hyperparameters`. Hyperparameters given in the method win."""
    method = method or {"type": "lora"}
    if not isinstance(method, dict):
        raise InvalidRequest("method must be an object with a 'type'.", param="method")
    mtype = method.get("type", "lora")
    hp = dict(hyperparameters or {})
    if mtype == "supervised":
        section = method.get("supervised") or {}
        hp.update(section.get("hyperparameters") or {})
        mtype = section.get("adapter", "lora")  # parallm extension inside OpenAI's shape
    elif mtype in METHOD_TYPES:
        hp.update((method.get(mtype) or {}).get("hyperparameters") or {})
    else:
        raise InvalidRequest(f"Unknown method type '{mtype}'. Accepted: supervised, {', '.join(METHOD_TYPES)}.",
                             param="method.type")
    if mtype not in METHOD_TYPES:
        raise InvalidRequest(f"Unknown adapter type '{mtype}'. Accepted: {', '.join(METHOD_TYPES)}.",
                             param="method")
    lora = method.get("lora") or {}
    rank, scale, layers = lora.get("rank", 8), lora.get("scale", 20.0), lora.get("num_layers")
    if not isinstance(rank, int) or not 1 <= rank <= 256:
        raise InvalidRequest("method.lora.rank must be an integer in 1..256.", param="method.lora.rank")
    if layers is not None and (not isinstance(layers, int) or layers < 1):
        raise InvalidRequest("method.lora.num_layers must be a positive integer.", param="method.lora.num_layers")
    return RequestedMethod(mtype, parse_hyperparameters(hp), rank, float(scale), layers)


def resolve_plan(requested: RequestedMethod, *, train_rows: int, model_layers: Optional[int],
                 context_length: int = 2048, checkpoint_every: Optional[int] = None) -> TrainingPlan:
    """Turn "auto" into numbers for a dataset of `train_rows` examples."""
    hp = requested.hyperparameters
    batch = min(4, train_rows) if hp.batch_size == "auto" else hp.batch_size
    if batch > train_rows:
        raise InvalidRequest(f"batch_size {batch} is larger than the training file's {train_rows} examples.",
                             param="hyperparameters.batch_size")
    epochs = (min(MAX_AUTO_EPOCHS, max(1, math.ceil(AUTO_TARGET_EXAMPLES / train_rows)))
              if hp.n_epochs == "auto" else hp.n_epochs)
    multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else float(hp.learning_rate_multiplier)
    # every step sees `batch` rows; mlx-lm's batcher drops the remainder of an epoch
    iters = max(1, epochs * (train_rows // batch))
    layers = requested.num_layers or AUTO_LORA_LAYERS
    if model_layers:
        layers = min(layers, model_layers)
    every = checkpoint_every or max(1, math.ceil(iters / 5))
    return TrainingPlan(
        method=requested.type, n_epochs=epochs, batch_size=batch, learning_rate_multiplier=multiplier,
        learning_rate=BASE_LEARNING_RATE * multiplier, iters=iters, num_layers=layers,
        lora_rank=requested.lora_rank, lora_scale=requested.lora_scale, lora_dropout=0.0,
        checkpoint_every=every, max_seq_length=min(2048, context_length), train_rows=train_rows,
    )
