"""Cheap checks on weight files before MLX reads them, so that bad files get a message that names
the problem instead of a terse error (or a crash) from deep inside a reader."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from parallm.models.load_errors import ModelLoadError

ACCEPTED = ("Accepted: an mlx-lm model directory (config.json + *.safetensors + tokenizer files), a "
            "Hugging Face repo id (org/name), or a GGUF file (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or "
            "the K-quants Q2_K to Q6_K).")


def check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header naming each tensor's byte
    range, then the data. Raise if the header is unreadable or the data ends early."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path}: truncated or not a safetensors file ({size} bytes). {ACCEPTED}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise ModelLoadError(f"{path}: truncated or not a safetensors file (header of {n} bytes "
                                 f"in a {size}-byte file). {ACCEPTED}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelLoadError(f"{path}: not a safetensors file (its header is not JSON). {ACCEPTED}") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and "data_offsets" in t]
    needed = 8 + n + max(ends, default=0)
    if size < needed:
        raise ModelLoadError(f"{path}: truncated safetensors file: {size} bytes, but its header "
                             f"describes {needed}. Re-download or re-convert the model.")


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e}). {ACCEPTED}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"{path}: has no model_type, so this is not a Hugging Face / mlx-lm "
                             f"model config. {ACCEPTED}")
    return config
