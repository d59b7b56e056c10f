"""Fixtures of the reliability suite: a tiny model with a short context, and the full app."""
from __future__ import annotations

import pytest

from tiny_models import write_tiny_llama

from .live import start_full_server

SHORT_CONTEXT = 96  # tokens: bounds every generation a fuzzer can ask for, and makes "too long" cheap


@pytest.fixture(scope="session")
def short_model_dir(tmp_path_factory):
    """The tiny random Llama with a 96-token context (generations stay short whatever is asked)."""
    return write_tiny_llama(tmp_path_factory.mktemp("short-llama"), max_position_embeddings=SHORT_CONTEXT)


@pytest.fixture(scope="module")
def full_server(short_model_dir, tmp_path_factory):
    server = start_full_server(short_model_dir, tmp_path_factory.mktemp("full-server"))
    yield server
    server.stop()
