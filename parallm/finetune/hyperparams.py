"""Hyperparameters: what a client asked for ("auto" allowed) -> a TrainingPlan of plain numbers.

The "auto" choices are tuned so that a small dataset is learnt in minutes on a CPU. Measured on
the default model (SmolLM2-135M) with mlx-lm's LoRA, 8 layers, batch 4, 30 iterations, 24 chat
rows teaching one fact: lr 1e-3 wrecked the model; lr 2e-4 learnt the fact in 56 s in f32.
Hence: lr 2e-4 x multiplier; batch min(4, rows); epochs so that a small set gets ~30 steps.

Every value is range-checked here, before a job is created: a job that could never finish (10^12
epochs), or one bound to diverge (a NaN multiplier), is a 400, not a queue blocked for weeks or a
NaN adapter served. Limits: n_epochs 1..50 and batch_size 1..256 (OpenAI's), the multiplier
finite in (0, 100], at most MAX_STEPS steps in all.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from parallm.engine.errors import InvalidRequest

BASE_LEARNING_RATE = 2e-4
MAX_EPOCHS = 50
MAX_BATCH_SIZE = 256
MAX_LR_MULTIPLIER = 100.0  # 2e-2: far past useful, but the tests teach a tiny model in a few steps with 50
MAX_STEPS = 100_000  # epochs x (rows // batch): a day or more on the machines this runs on
MAX_LORA_RANK = 256
MAX_LORA_SCALE = 1000.0
MAX_NUM_LAYERS = 1024
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


def _check_auto_or_number(name: str, value: Any, *, integer: bool, top: float) -> Any:
    if value is None or (isinstance(value, str) and value == "auto"):
        return "auto"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not 0 < value <= top:  # NaN fails the range too
        kind = f"an integer in 1..{top:g}" if integer else f"a number above 0, at most {top:g}"
        raise InvalidRequest(f"hyperparameters.{name} must be \"auto\" or {kind}, got {_shown(value)}.",
                             param=f"hyperparameters.{name}")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _section(parent: dict, key: str, where: str) -> dict:
    """parent[key] as an object ({} when absent); anything else is a 400 naming `where`."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be an object, got {_shown(value)}.", param=where)
    return value


def parse_hyperparameters(raw: Optional[dict]) -> RequestedHyperparameters:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise InvalidRequest("hyperparameters must be an object.", param="hyperparameters")
    unknown = set(raw) - set(HYPERPARAMETER_NAMES)
    if unknown:
        shown = sorted(_shown(k) for k in unknown)[:5]
        raise InvalidRequest(f"Unknown hyperparameters {shown}; accepted: {', '.join(HYPERPARAMETER_NAMES)}.",
                             param="hyperparameters")
    return RequestedHyperparameters(
        n_epochs=_check_auto_or_number("n_epochs", raw.get("n_epochs"), integer=True, top=MAX_EPOCHS),
        batch_size=_check_auto_or_number("batch_size", raw.get("batch_size"), integer=True, top=MAX_BATCH_SIZE),
        learning_rate_multiplier=_check_auto_or_number("learning_rate_multiplier", raw.get("learning_rate_multiplier"),
                                                       integer=False, top=MAX_LR_MULTIPLIER),
    )


def parse_method(method: Optional[dict], hyperparameters: Optional[dict]) -> RequestedMethod:
    """Accepts OpenAI's `{"type": "supervised", "supervised": {"hyperparameters": {...}}}`,
    parallm's `{"type": "lora"|"dora"|"full", "lora"?: {"rank", "scale", "num_layers"}}`, and the
    legacy top-level `hyperparameters`. Hyperparameters given in the method win."""
    method = method or {"type": "lora"}
    if not isinstance(method, dict):
        raise InvalidRequest("method must be an object with a 'type'.", param="method")
    mtype = method.get("type", "lora")
    if hyperparameters is not None and not isinstance(hyperparameters, dict):
        raise InvalidRequest("hyperparameters must be an object.", param="hyperparameters")
    hp = dict(hyperparameters or {})
    if mtype == "supervised":
        section = _section(method, "supervised", "method.supervised")
        hp.update(_section(section, "hyperparameters", "method.supervised.hyperparameters"))
        mtype = section.get("adapter", "lora")  # parallm extension inside OpenAI's shape
        where = "method.supervised.adapter"
    elif isinstance(mtype, str) and mtype in METHOD_TYPES:
        hp.update(_section(_section(method, mtype, f"method.{mtype}"), "hyperparameters",
                           f"method.{mtype}.hyperparameters"))
        where = "method.type"
    else:
        raise InvalidRequest(f"Unknown method type {_shown(mtype)}. Accepted: supervised, {', '.join(METHOD_TYPES)}.",
                             param="method.type")
    if not isinstance(mtype, str) or mtype not in METHOD_TYPES:
        raise InvalidRequest(f"Unknown adapter type {_shown(mtype)}. Accepted: {', '.join(METHOD_TYPES)}.",
                             param=where)
    lora = _section(method, "lora", "method.lora")
    rank, scale, layers = lora.get("rank", 8), lora.get("scale", 20.0), lora.get("num_layers")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_LORA_RANK:
        raise InvalidRequest(f"method.lora.rank must be an integer in 1..{MAX_LORA_RANK}.", param="method.lora.rank")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= MAX_LORA_SCALE:
        raise InvalidRequest(f"method.lora.scale must be a number above 0, at most {MAX_LORA_SCALE:g}.",
                             param="method.lora.scale")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int)
                               or not 1 <= layers <= MAX_NUM_LAYERS):
        raise InvalidRequest(f"method.lora.num_layers must be an integer in 1..{MAX_NUM_LAYERS}.",
                             param="method.lora.num_layers")
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
    if iters > MAX_STEPS:
        raise InvalidRequest(f"This job would train for {iters} steps ({epochs} epochs of {train_rows} examples in "
                             f"batches of {batch}); the limit is {MAX_STEPS}. Use fewer epochs or a larger batch_size.",
                             param="hyperparameters.n_epochs")
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
