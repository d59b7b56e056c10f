"""Engine test helpers: the tiny model loaded once (with mlx-lm's loader)."""
from __future__ import annotations

import pytest
from tiny_models import TinyLoaded, load_tiny


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir) -> TinyLoaded:
    return load_tiny(tiny_model_dir)
