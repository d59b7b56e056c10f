"""Shared fixtures. The model builders live in tests/tiny_models.py (import them from there:
`from tiny_models import write_tiny_llama`; a module named conftest is ambiguous across folders)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tiny_models import TOKENIZER_DIR, VOCAB_SIZE, write_tiny_llama  # noqa: F401  re-exported for fixtures


# Servers started by tests (in process or as `parallm serve` subprocesses, which inherit this) keep
# their files and fine-tuning jobs in a throwaway folder, never in the user's ~/.local/share/parallm.
os.environ.setdefault("PARALLM_DATA_DIR", tempfile.mkdtemp(prefix="parallm-test-data-"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny fp32 Llama directory, written once per test session."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
