"""The one error the loader raises for bad input."""
from __future__ import annotations


class ModelLoadError(Exception):
    """A model spec could not be loaded. The message names the problem and what is accepted; callers
    (CLI, server) show it as is, without a traceback."""
