"""Model loading: `load(spec)` returns a LoadedModel (model, tokenizer, config, memory estimate)."""
from parallm.models.load_errors import ModelLoadError
from parallm.models.loader import DEFAULT_MODEL_NAME, LoadedModel, load
from parallm.models.memory import MemoryEstimate

__all__ = ["load", "LoadedModel", "ModelLoadError", "DEFAULT_MODEL_NAME", "MemoryEstimate"]
