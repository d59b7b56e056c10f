"""Engine test helpers: the tiny model loaded once, a LoadedModel-like holder, a greedy reference."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class TinyLoaded:
    """Matches the field names of parallm.models.LoadedModel that the engine reads."""

    model: Any
    tokenizer: Any
    context_length: int = 2048
    name: str = "tiny"
    config: dict = field(default_factory=dict)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir) -> TinyLoaded:
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model_dir))
    return TinyLoaded(model, tokenizer, config={"vocab_size": 49152})
